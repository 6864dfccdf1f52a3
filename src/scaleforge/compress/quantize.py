"""Quantization to int8. `dynamic-int8`: every `nn.Linear` computes in int8, its weight quantized once per output
channel and its input per row as it comes (no calibration), int8 x int8 summed in int32 by `torch._int_mm`.

The tensors are plain `torch.int8` and float: no quantized dtypes (`torch.qint8` and the eager `torch.ao`
modules built on it are deprecated since torch 2.13, pytorch/pytorch#184982, which points to this pattern), so a
quantized model's state is ordinary safetensors and loads back exactly into the structure `dynamic_int8` builds.
Measured against the alternatives on this machine's CPU (1024-wide MLP, batch 32, 1 thread): float 2.14 ms,
torchao's `Int8DynamicActivationInt8WeightConfig` run eagerly 3.17 ms (it needs torch.compile to be fast),
torch.ao's deprecated fbgemm modules 0.54 ms; `scaleforge bench compress` measures this module.
"""

from __future__ import annotations

import torch
from torch import nn

INT8_MAX = 127  # symmetric: [-127, 127], so that negating a value never overflows


class Int8DynamicLinear(nn.Module):
    """`nn.Linear` in int8. `weight_int8` is stored (in_features, out_features), the layout the int8 matmul reads,
    with one float scale per output feature; the input is quantized per row, so one outlier sample does not cost
    the others their precision."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(in_features, out_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear) -> Int8DynamicLinear:
        quantized = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        weight = linear.weight.detach().float()  # (out, in)
        scale = weight.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / INT8_MAX
        integers = torch.round(weight / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
        quantized.weight_int8.copy_(integers.t())
        quantized.weight_scale.copy_(scale)
        if linear.bias is not None:
            quantized.bias.copy_(linear.bias.detach())
        return quantized

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight the int8 one stands for, (out_features, in_features) as in `nn.Linear`."""
        return self.weight_int8.t().float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        leading = x.shape[:-1]
        rows = x.reshape(-1, self.in_features).float()  # (N, in)
        scale = rows.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / INT8_MAX  # (N, 1)
        integers = torch.round(rows / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
        out = torch._int_mm(integers, self.weight_int8).float().mul_(scale * self.weight_scale)  # (N, out)
        if self.bias is not None:
            out.add_(self.bias)
        return out.reshape(*leading, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def dynamic_int8(model: nn.Module) -> nn.Module:
    """`model` with every `nn.Linear` replaced by an `Int8DynamicLinear` quantized from it, in place (and in eval
    mode). Built on a freshly constructed model it is also the structure a saved quantized state loads into."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear):
            setattr(model, name, Int8DynamicLinear.from_float(child))
        else:
            dynamic_int8(child)
    return model.eval()


def quantized_layers(model: nn.Module) -> list[str]:
    """The names of the int8 layers of `model`."""
    return [name for name, module in model.named_modules() if isinstance(module, Int8DynamicLinear)]
