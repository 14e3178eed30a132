"""An exponential moving average of a model's floating-point parameters and buffers."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """``shadow = decay_t * shadow + (1 - decay_t) * param`` after each optimiser step, with the warm-up
    ``decay_t = min(decay, (1 + n) / (10 + n))`` so early averages are not dominated by the initial weights."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].mul_(d).add_(v.detach().float(), alpha=1.0 - d)

    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model`` (other entries untouched)."""
        state = model.state_dict()
        with torch.no_grad():
            for k, v in self.shadow.items():
                state[k].copy_(v)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state does not match the model: {sorted(missing)[:10]}")
        self.decay, self.num_updates = state["decay"], state["num_updates"]
        self.shadow = {k: v.clone().float() for k, v in state["shadow"].items()}
