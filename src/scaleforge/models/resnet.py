"""ResNet-18/34/50 (He et al., 2015), with a small-image stem for inputs of 64 pixels or less.

The residual blocks of all four stages sit in one flat `blocks` list, so they can be cut into pipeline stages anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from scaleforge.models.attention import SpatialSelfAttention
from scaleforge.models.heads import PooledLinearHead
from scaleforge.registry import register_model

# Images up to this size get the CIFAR-style stem; the ImageNet stem would shrink them 4x before the first block.
SMALL_IMAGE_SIZE = 64


def conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    """A bias-free convolution with "same" padding followed by BatchNorm."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
    )


def shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """The identity, or a strided 1x1 conv + BN where the block changes the shape."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return conv_bn(in_channels, out_channels, kernel_size=1, stride=stride)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and a residual: relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv_bn(in_channels, planes, kernel_size=3, stride=stride)
        self.conv2 = conv_bn(planes, planes, kernel_size=3)
        self.shortcut = shortcut(in_channels, planes, stride)
        self.activation = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.activation(self.conv1(x))  # (B, planes, H/stride, W/stride)
        return self.activation(self.conv2(y) + self.shortcut(x))  # (B, planes, H/stride, W/stride)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand to `expansion * planes`, and a residual."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = conv_bn(in_channels, planes, kernel_size=1)
        self.conv2 = conv_bn(planes, planes, kernel_size=3, stride=stride)
        self.conv3 = conv_bn(planes, out_channels, kernel_size=1)
        self.shortcut = shortcut(in_channels, out_channels, stride)
        self.activation = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.activation(self.conv1(x))  # (B, planes, H, W)
        y = self.activation(self.conv2(y))  # (B, planes, H/stride, W/stride)
        return self.activation(self.conv3(y) + self.shortcut(x))  # (B, 4 * planes, H/stride, W/stride)


class ResNet(nn.Module):
    """A stem, four stages of residual blocks (`layers[i]` blocks of `width * 2**i` planes), pooled linear head."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        block: type[BasicBlock | Bottleneck],
        layers: Sequence[int],
        width: int = 64,
        attention_heads: int = 0,
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"ResNet needs images shaped (C, H, W), got input_shape={list(input_shape)}")
        if width < 1:
            raise ValueError(f"width must be at least 1, got {width}")
        if attention_heads < 0:
            raise ValueError(f"attention_heads must be 0 (no attention) or positive, got {attention_heads}")
        if len(layers) != 4 or any(n < 1 for n in layers):
            raise ValueError(f"layers must be four positive block counts, got {list(layers)}")
        in_channels, height, image_width = input_shape
        if min(height, image_width) <= SMALL_IMAGE_SIZE:
            self.embed = nn.Sequential(conv_bn(in_channels, width, kernel_size=3), nn.ReLU())
        else:
            self.embed = nn.Sequential(
                conv_bn(in_channels, width, kernel_size=7, stride=2),
                nn.ReLU(),
                nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            )
        blocks: list[nn.Module] = []
        channels = width
        for stage, num_blocks in enumerate(layers):
            planes = width * 2**stage
            for index in range(num_blocks):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(block(channels, planes, stride))
                channels = planes * block.expansion
        if attention_heads > 0:
            blocks.append(SpatialSelfAttention(channels, attention_heads))
        self.blocks = nn.ModuleList(blocks)
        self.head = PooledLinearHead(channels, num_classes)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)  # (B, width, H', W'): the stem
        for block in self.blocks:
            x = block(x)  # (B, C_i, H_i, W_i)
        return self.head(x)  # (B, num_classes)


@register_model("resnet18")
def resnet18(input_shape: Sequence[int], num_classes: int, width: int = 64, attention_heads: int = 0) -> ResNet:
    """ResNet-18: BasicBlocks in stages of [2, 2, 2, 2]."""
    return ResNet(input_shape, num_classes, BasicBlock, (2, 2, 2, 2), width=width, attention_heads=attention_heads)


@register_model("resnet34")
def resnet34(input_shape: Sequence[int], num_classes: int, width: int = 64, attention_heads: int = 0) -> ResNet:
    """ResNet-34: BasicBlocks in stages of [3, 4, 6, 3]."""
    return ResNet(input_shape, num_classes, BasicBlock, (3, 4, 6, 3), width=width, attention_heads=attention_heads)


@register_model("resnet50")
def resnet50(input_shape: Sequence[int], num_classes: int, width: int = 64, attention_heads: int = 0) -> ResNet:
    """ResNet-50: Bottleneck blocks (expansion 4) in stages of [3, 4, 6, 3]."""
    return ResNet(input_shape, num_classes, Bottleneck, (3, 4, 6, 3), width=width, attention_heads=attention_heads)
