"""Backend-neutral training pieces: the training config, image datasets and the default-model recipe.

The PyTorch trainer lives in :mod:`klvae.torch.train`, the JAX one in :mod:`klvae.flax.train`; both read the
same :class:`TrainConfig`.
"""

from klvae.train.config import TrainConfig as TrainConfig
from klvae.train.config import load_train_config as load_train_config

__all__ = ["TrainConfig", "load_train_config"]
