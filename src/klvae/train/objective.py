"""Backend-neutral parts of the objective: the loss weights and the discriminator's start schedule."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class LossWeights:
    l1_weight: float = 1.0
    l2_weight: float = 0.0
    chroma_weight: float = 0.0
    perceptual_weight: float = 0.0
    kl_weight: float = 1e-6
    disc_start: int = -1
    disc_weight: float = 0.5
    disc_factor: float = 1.0
    disc_loss: str = "hinge"
    adaptive_disc_weight: bool = True

    @classmethod
    def from_config(cls, loss_section) -> LossWeights:
        """From a TrainConfig's ``[loss]`` section."""
        return cls(**{f.name: getattr(loss_section, f.name) for f in fields(cls)})


def adopt_weight(weight: float, step: int, start: int) -> float:
    """``weight`` from step ``start`` on, 0 before (and always 0 when ``start`` < 0: GAN disabled)."""
    return 0.0 if start < 0 or step < start else weight
