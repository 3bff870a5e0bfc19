"""Frozen bottom layers (``stage2.freeze_bottom``, a method's ``~freezeK``): the input
embeddings and the bottom K transformer blocks of every stack keep their pretrained weights
through stage 2.

The early layers are where fine-tuning breaks a model's alignment to task formats rather than
its knowledge ("spurious forgetting", ICLR 2025); freezing them is a mitigation people use.
A stack is each run of repeated blocks (a T5 has two, the encoder's and the decoder's; a
decoder-only model one); the embeddings of a model with tied input and output embeddings (the
T5s) are its output layer too, and stay frozen with it.
"""

from __future__ import annotations

from torch import nn

from multipromot.errors import UserError
from multipromot.train.distributed import transformer_blocks

__all__ = ["stacks", "freeze_bottom", "frozen_names"]


def stacks(model: nn.Module) -> list[list[nn.Module]]:
    """The model's stacks of repeated blocks, bottom first, in the order they are built."""
    blocks = {id(b) for b in transformer_blocks(model)}
    grouped: dict[str, list[nn.Module]] = {}
    for name, module in model.named_modules():
        if id(module) in blocks:
            grouped.setdefault(name.rpartition(".")[0], []).append(module)
    return list(grouped.values())


def frozen_names(model: nn.Module, k: int) -> set[str]:
    """The parameter names ``freeze_bottom(model, k)`` freezes.

    Raises:
        UserError: ``k`` is more than the shallowest stack's depth.
    """
    if k <= 0:
        return set()
    found = stacks(model)
    depth = min((len(s) for s in found), default=0)
    if k > depth:
        raise UserError(
            f"is {k}, but the model's stacks have {depth} blocks", key="stage2.freeze_bottom"
        )
    frozen = {id(p) for p in model.get_input_embeddings().parameters()}
    for stack in found:
        for block in stack[:k]:
            frozen |= {id(p) for p in block.parameters()}
    return {name for name, p in model.named_parameters() if id(p) in frozen}


def freeze_bottom(model: nn.Module, k: int) -> set[str]:
    """Freeze the embeddings and the bottom ``k`` blocks of every stack (``requires_grad``
    off: no gradient, no optimizer state, no weight decay); returns the names frozen."""
    names = frozen_names(model, k)
    for name, param in model.named_parameters():
        if name in names:
            param.requires_grad_(False)
    return names
