"""WiSE-FT (Wortsman et al. 2022): the weights ``(1 - A) * base + A * fine_tuned``, evaluated
with no further training. ``A = 0`` is the base model, ``A = 1`` the fine-tuned one, exactly
(``torch.lerp`` returns its end points as they are).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["interpolate"]


@torch.no_grad()
def interpolate(model: nn.Module, base: nn.Module, alpha: float) -> None:
    """Move ``model``'s weights (the fine-tuned ones) to ``(1 - alpha) * base + alpha * model``,
    in place; tied tensors are visited once.

    Raises:
        ValueError: ``alpha`` outside [0, 1], or the two models differ in names or shapes.
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    start = base.state_dict()
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, tensor in tensors:
        if name not in start or start[name].shape != tensor.shape:
            raise ValueError(f"the base model has no tensor {name} of shape {tuple(tensor.shape)}")
    for name, tensor in tensors:
        if tensor.is_floating_point():
            tensor.copy_(torch.lerp(start[name].to(tensor), tensor, alpha))
