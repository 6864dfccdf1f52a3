"""A Vision Transformer (Dosovitskiy et al., 2020): image patches as tokens, a class token, pre-norm encoder blocks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from scaleforge.models.attention import TransformerBlock, transformer_tp_plan
from scaleforge.registry import register_model


class PatchEmbedding(nn.Module):
    """Strided-conv patches as tokens, a class token in front, learned positions, dropout."""

    def __init__(self, in_channels: int, width: int, patch_size: int, num_patches: int, dropout_rate: float) -> None:
        super().__init__()
        self.patches = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, width))
        self.position = nn.Parameter(torch.zeros(1, num_patches + 1, width))
        self.dropout = nn.Dropout(dropout_rate)
        nn.init.trunc_normal_(self.class_token, std=0.02)
        nn.init.trunc_normal_(self.position, std=0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.patches(images).flatten(2).transpose(1, 2)  # (B, C, H/P, W/P) -> (B, N, C)
        class_token = self.class_token.expand(tokens.shape[0], -1, -1)  # (B, 1, C)
        return self.dropout(torch.cat([class_token, tokens], dim=1) + self.position)  # (B, N+1, C)


class ClassTokenHead(nn.Module):
    """Final LayerNorm, then a linear classifier on the class token."""

    def __init__(self, width: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.linear = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x[:, 0]))  # (B, N+1, C) -> (B, num_classes)


@register_model("vit")
class ViT(nn.Module):
    """Strided-conv patch embedding, class token, learned positions, `depth` encoder blocks, head on the class token."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        patch_size: int = 4,
        depth: int = 6,
        width: int = 192,
        heads: int = 3,
        mlp_ratio: float = 4.0,
        dropout_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"ViT needs images shaped (C, H, W), got input_shape={list(input_shape)}")
        in_channels, height, image_width = input_shape
        if patch_size < 1 or height % patch_size or image_width % patch_size:
            raise ValueError(f"image size {height}x{image_width} is not divisible by patch_size={patch_size}")
        if heads < 1 or width % heads:
            raise ValueError(f"width={width} is not divisible by heads={heads}")
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        if int(width * mlp_ratio) < 1:
            raise ValueError(f"mlp_ratio must give a hidden width of at least 1, got {mlp_ratio}")
        if not 0 <= dropout_rate < 1:
            raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
        num_patches = (height // patch_size) * (image_width // patch_size)
        self.embed = PatchEmbedding(in_channels, width, patch_size, num_patches, dropout_rate)
        self.blocks = nn.ModuleList(TransformerBlock(width, heads, mlp_ratio, dropout_rate) for _ in range(depth))
        self.head = ClassTokenHead(width, num_classes)
        self.apply(self._init_weights)

    def tp_plan(self, blocks: Sequence[int]) -> dict[str, str]:
        """How tensor parallelism splits the blocks at indices `blocks` (every block's `TransformerBlock.TP_PLAN`)."""
        return transformer_tp_plan(blocks)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)  # (B, C, H, W) -> (B, N+1, C)
        for block in self.blocks:
            x = block(x)  # (B, N+1, C)
        return self.head(x)  # (B, num_classes)
