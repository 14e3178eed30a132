"""Small sample data shipped with klvae (see README.md in this folder for sources and licences)."""

from __future__ import annotations

import os

#: A 451x300 RGB photograph (scikit-image's "chelsea", CC0). It is held out of the default model's training
#: set, so a round trip through the default model shows how it does on an image it never saw.
SAMPLE_IMAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chelsea.png")
