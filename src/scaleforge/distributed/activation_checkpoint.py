"""Activation checkpointing: each block keeps only its input in forward and recomputes its activations in
backward, trading compute for memory."""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper


def apply_ac(model: nn.Module) -> None:
    """Wrap every block of `model.blocks` in place. The wrapper strips its own name from state-dict keys, so
    saved tensor names stay those of the plain model."""
    blocks: nn.ModuleList = model.blocks  # type: ignore[assignment]
    for index, block in enumerate(blocks):
        if any(True for _ in block.parameters()):  # pipeline stages leave parameter-free placeholders
            blocks[index] = checkpoint_wrapper(block, preserve_rng_state=True)
