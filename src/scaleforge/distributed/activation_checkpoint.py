"""Activation checkpointing: each block keeps only its input in forward and recomputes its activations in
backward, trading compute for memory."""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from scaleforge.distributed.pipeline_parallel import present_blocks


def apply_ac(model: nn.Module) -> None:
    """Wrap every block of `model.blocks` in place. The wrapper strips its own name from state-dict keys, so
    saved tensor names stay those of the plain model."""
    for index, block in present_blocks(model):
        model.blocks[index] = checkpoint_wrapper(block, preserve_rng_state=True)  # type: ignore[index]
