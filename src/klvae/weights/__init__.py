"""Weight layouts and files (numpy only): the canonical diffusers layout, conversions, safetensors I/O."""
