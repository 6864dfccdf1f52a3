"""Quantization to int8. `dynamic-int8`: every `nn.Linear` computes in int8, its weight quantized once per output
channel and its input per row as it comes (no calibration), int8 x int8 summed in int32 by `torch._int_mm`.
`static-int8`: the current PT2E flow (torch.export, then torchao's x86 quantizer, calibration, conversion) for
convolutions as well as Linear layers, activations quantized with ranges fixed by calibration.

The tensors are plain `torch.int8` and float: no quantized dtypes (`torch.qint8` and the eager `torch.ao`
modules built on it are deprecated since torch 2.13, pytorch/pytorch#184982, which points to this pattern), so a
quantized model's state is ordinary safetensors and loads back exactly into the structure `dynamic_int8` builds.
Measured against the alternatives on this machine's CPU (1024-wide MLP, batch 32, 1 thread): float 2.14 ms,
torchao's `Int8DynamicActivationInt8WeightConfig` run eagerly 3.17 ms (it needs torch.compile to be fast),
torch.ao's deprecated fbgemm modules 0.54 ms; `scaleforge bench compress` measures this module. A unidirectional
`nn.LSTM` becomes an `Int8DynamicLSTM` of the same int8 layers; against the float LSTM's fused kernel (the `lstm`
model on 8 steps, 2 threads, timed by `median_ms`) it is 1.8-2.0x faster at 1024 units and 0.2-0.9x as fast at
64-256, where its Python step loop costs more than the matmuls it saves.
"""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from scaleforge.data.base import DataInfo
from scaleforge.errors import ConfigError, UsageError, describe_export_error, first_line
from scaleforge.extras import require
from scaleforge.registry import FORMATS, register_preparation
from scaleforge.runs import example_inputs, load_weights, read_weights

if TYPE_CHECKING:
    from scaleforge.training.preparations import PreparationContext

INT8_MAX = 127  # symmetric: [-127, 127], so that negating a value never overflows
MAX_BATCH = 4096  # the largest batch a static-int8 model's exported graph takes


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


class Int8DynamicLSTM(nn.Module):
    """A unidirectional `nn.LSTM` in int8, built from `Int8DynamicLinear`s: per layer, the input projection of every
    time step at once (one int8 matmul, both float biases folded into it) and the recurrent projection of each
    step's hidden state. Gates in `nn.LSTM`'s order (input, forget, cell, output); its `(output, (h_n, c_n))`."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, batch_first: bool = False) -> None:
        super().__init__()
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.batch_first = batch_first
        widths = [input_size] + [hidden_size] * num_layers
        self.inputs = nn.ModuleList(Int8DynamicLinear(width, 4 * hidden_size) for width in widths[:-1])
        self.recurrent = nn.ModuleList(
            Int8DynamicLinear(hidden_size, 4 * hidden_size, bias=False) for _ in range(num_layers)
        )

    @classmethod
    def from_float(cls, lstm: nn.LSTM) -> Int8DynamicLSTM:
        quantized = cls(lstm.input_size, lstm.hidden_size, lstm.num_layers, lstm.batch_first)
        for layer in range(lstm.num_layers):
            weight_ih, weight_hh = getattr(lstm, f"weight_ih_l{layer}"), getattr(lstm, f"weight_hh_l{layer}")
            inputs = nn.Linear(weight_ih.shape[1], weight_ih.shape[0], bias=lstm.bias)
            recurrent = nn.Linear(weight_hh.shape[1], weight_hh.shape[0], bias=False)
            with torch.no_grad():
                inputs.weight.copy_(weight_ih)
                recurrent.weight.copy_(weight_hh)
                if lstm.bias:
                    inputs.bias.copy_(getattr(lstm, f"bias_ih_l{layer}") + getattr(lstm, f"bias_hh_l{layer}"))
            quantized.inputs[layer] = Int8DynamicLinear.from_float(inputs)
            quantized.recurrent[layer] = Int8DynamicLinear.from_float(recurrent)
        return quantized

    def dequantized(self) -> nn.LSTM:
        """The float `nn.LSTM` this one stands for."""
        lstm = nn.LSTM(self.input_size, self.hidden_size, self.num_layers, batch_first=self.batch_first)
        with torch.no_grad():
            for layer, (inputs, recurrent) in enumerate(zip(self.inputs, self.recurrent, strict=True)):
                getattr(lstm, f"weight_ih_l{layer}").copy_(inputs.dequantized_weight())
                getattr(lstm, f"weight_hh_l{layer}").copy_(recurrent.dequantized_weight())
                getattr(lstm, f"bias_ih_l{layer}").copy_(inputs.bias)
                getattr(lstm, f"bias_hh_l{layer}").zero_()
        return lstm

    def forward(
        self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        x = x if self.batch_first else x.transpose(0, 1)  # (B, T, F)
        batch, steps = x.shape[0], x.shape[1]
        final_h, final_c = [], []
        for layer, (inputs, recurrent) in enumerate(zip(self.inputs, self.recurrent, strict=True)):
            gates_of_inputs = inputs(x)  # (B, T, 4H)
            if state is None:
                h = c = x.new_zeros(batch, self.hidden_size)
            else:
                h, c = state[0][layer], state[1][layer]
            outputs = []
            for step in range(steps):
                gates = gates_of_inputs[:, step] + recurrent(h)  # (B, 4H)
                in_gate, forget_gate, cell_gate, out_gate = gates.chunk(4, dim=1)
                c = torch.sigmoid(forget_gate) * c + torch.sigmoid(in_gate) * torch.tanh(cell_gate)
                h = torch.sigmoid(out_gate) * torch.tanh(c)  # (B, H)
                outputs.append(h)
            x = torch.stack(outputs, dim=1)  # (B, T, H)
            final_h.append(h)
            final_c.append(c)
        output = x if self.batch_first else x.transpose(0, 1)
        return output, (torch.stack(final_h), torch.stack(final_c))

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, batch_first={self.batch_first}"


def _quantizable_lstm(module: nn.Module) -> bool:
    """A plain LSTM: one direction, no projection (what `Int8DynamicLSTM` computes); others stay float."""
    return isinstance(module, nn.LSTM) and not module.bidirectional and module.proj_size == 0


def dynamic_int8(model: nn.Module) -> nn.Module:
    """`model` with every `nn.Linear` replaced by an `Int8DynamicLinear` and every unidirectional `nn.LSTM` by an
    `Int8DynamicLSTM` quantized from it, in place (and in eval mode). Built on a freshly constructed model it is
    also the structure a saved quantized state loads into."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear):
            setattr(model, name, Int8DynamicLinear.from_float(child))
        elif _quantizable_lstm(child):
            setattr(model, name, Int8DynamicLSTM.from_float(child))
        else:
            dynamic_int8(child)
    return model.eval()


def float_twin(model: nn.Module) -> nn.Module:
    """A copy of a `dynamic_int8` model with `nn.Linear` and `nn.LSTM` layers holding the weights the int8 ones
    stand for."""
    twin = copy.deepcopy(model)
    for name in quantized_layers(twin):
        module = twin.get_submodule(name)
        if isinstance(module, Int8DynamicLSTM):
            float_module: nn.Module = module.dequantized()
        else:
            float_module = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            with torch.no_grad():
                float_module.weight.copy_(module.dequantized_weight())
                if module.bias is not None:
                    float_module.bias.copy_(module.bias)
        owner, _, attribute = name.rpartition(".")
        setattr(twin.get_submodule(owner), attribute, float_module)
    return twin.eval()


def quantized_layers(model: nn.Module) -> list[str]:
    """The names of the int8 layers of `model` (an int8 LSTM's own projections not counted apart)."""
    names: list[str] = []
    for name, module in model.named_modules():
        inside_lstm = any(name.startswith(f"{lstm}.") for lstm in names)
        if isinstance(module, Int8DynamicLinear | Int8DynamicLSTM) and not inside_lstm:
            names.append(name)
    return names


# ------------------------------------------------------------------------------------------- static int8

OBSERVERS = "observers."  # prefix of the calibration statistics in a static-int8 run's safetensors


def _pt2e() -> Any:
    """torchao's PT2E module and x86 quantizer, imported without the warnings its import logs about GPU kernels
    this machine does not load."""
    require("export", "static-int8 and qat quantization")  # also met when such a run is loaded (eval, serve, export)
    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        import torchao.quantization.pt2e as pt2e
        from torchao.quantization.pt2e import quantize_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer
    finally:
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)
    return pt2e, quantize_pt2e, x86_inductor_quantizer


def prepared_for_int8(model: nn.Module, example: torch.Tensor, *, qat: bool = False) -> nn.Module:
    """`model` exported (any batch size) with torchao's x86 quantizer's observers inserted: to calibrate
    (`static-int8`), or with `qat` fake-quantized, to train (`qat`; its `.train()` and `.eval()` work)."""
    pt2e, quantize_pt2e, x86 = _pt2e()
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    model.train(qat)  # QAT exports the training graph (BatchNorm as trained), calibration the inference one
    try:
        exported = torch.export.export(model, (example,), dynamic_shapes=({0: batch},)).module()
    except Exception as error:  # noqa: BLE001 - torch.export raises many kinds; each is the model's to fix
        method = "qat" if qat else "static-int8"
        raise UsageError(
            f"{method} needs a model torch.export can capture, and {type(model).__name__} fails"
            f"{describe_export_error(error)}; use dynamic-int8, which needs no export"
        ) from error
    quantizer = x86.X86InductorQuantizer()
    quantizer.set_global(x86.get_default_x86_inductor_quantization_config(is_qat=qat))
    if not qat:
        return quantize_pt2e.prepare_pt2e(exported, quantizer)
    prepared = quantize_pt2e.prepare_qat_pt2e(exported, quantizer)
    pt2e.allow_exported_model_train_eval(prepared)
    return prepared


@register_preparation("quantization_aware")
def quantization_aware(model: nn.Module, enabled: bool, context: PreparationContext) -> nn.Module:
    """`training.quantization_aware`: the model exported and fake-quantized for int8 (PT2E QAT)."""
    if context.dims.strategy not in ("single", "ddp"):
        raise ConfigError(
            f"training.quantization_aware: runs on one process or under ddp, not {context.dims.strategy} (the "
            "exported, fake-quantized graph cannot be sharded or split)"
        )
    device = next(model.parameters()).device
    return prepared_for_int8(model, example_inputs(context.info, 2).to(device), qat=True)


def _converted(prepared: nn.Module) -> nn.Module:
    pt2e, quantize_pt2e, _ = _pt2e()
    pt2e.move_exported_model_to_eval(prepared)  # QAT's graph: BatchNorm with its running statistics
    converted = quantize_pt2e.convert_pt2e(prepared)
    _drop_unused_tensors(converted)
    pt2e.allow_exported_model_train_eval(converted)  # so that `.eval()` works on it as on any model (returning None)
    converted.eval()
    for module in converted.modules():  # that `eval` switches the graph's ops but leaves the flag others read
        module.training = False
    return converted


def _drop_unused_tensors(graph_module: Any) -> None:
    """Delete the tensors no node of the graph reads: conversion leaves the float weights it replaced with int8
    ones behind, which would otherwise be saved (and make the int8 file larger than the float one)."""
    read = {node.target for node in graph_module.graph.nodes if node.op == "get_attr"}
    for name in [name for name, _ in itertools.chain(graph_module.named_parameters(), graph_module.named_buffers())]:
        if name not in read:
            owner, _, attribute = name.rpartition(".")
            delattr(graph_module.get_submodule(owner), attribute)


def static_int8(
    model: nn.Module, example: torch.Tensor, calibration: Iterable[torch.Tensor]
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """`model` quantized to int8 by PT2E (torch.export, torchao's x86 quantizer: weights per channel, activations
    per tensor with ranges observed on the `calibration` batches), and its `int8_state`."""
    prepared = prepared_for_int8(model, example)
    with torch.no_grad():
        for batch in calibration:
            prepared(batch)
    return int8_state(prepared)


def int8_state(prepared: nn.Module) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A calibrated (or QAT-trained) prepared model converted to int8, with its state as plain tensors: the
    observers' statistics under `OBSERVERS`, then the int8 weights and scales, from which `load_int8` rebuilds
    it exactly."""
    observed = {
        f"{OBSERVERS}{k}": v.detach().clone()
        for k, v in prepared.state_dict().items()
        if "activation_post_process" in k
    }
    converted = _converted(prepared)
    return converted, {**observed, **converted.state_dict()}


def load_int8(model: nn.Module, example: torch.Tensor, state: dict[str, torch.Tensor], *, qat: bool) -> nn.Module:
    """The int8 model `int8_state` described, for a model built like `model`: the same export and observers (QAT's
    fake-quantized ones with `qat`), their saved statistics, then the saved int8 weights and scales."""
    observed = {k.removeprefix(OBSERVERS): v for k, v in state.items() if k.startswith(OBSERVERS)}
    prepared = prepared_for_int8(model, example, qat=qat)
    try:
        unknown = prepared.load_state_dict(observed, strict=False).unexpected_keys
        if unknown:
            raise RuntimeError(f"{OBSERVERS}{unknown[0]} is not an observer of this model")
        converted = _converted(prepared)
        converted.load_state_dict({k: v for k, v in state.items() if not k.startswith(OBSERVERS)})
    except RuntimeError as error:
        raise UsageError(f"the int8 weights do not fit this model: {first_line(error)}") from error
    return converted


# ------------------------------------------------------------------------------------------- int8 runs
# `load_run` finds these by the format a compressed run's compression.json names.


@FORMATS.register("dynamic-int8")
def load_dynamic_int8(model: nn.Module, file: Path, info: DataInfo) -> nn.Module:
    """A dynamic-int8 run's model: the int8 structure `dynamic_int8` builds on `model`, filled from `file`."""
    quantized = dynamic_int8(model)
    load_weights(quantized, file)
    return quantized


@FORMATS.register("static-int8")
def load_static_int8(model: nn.Module, file: Path, info: DataInfo) -> nn.Module:
    """A static-int8 run's model, rebuilt by `load_int8` from `file`."""
    return load_int8(model, example_inputs(info, 2), read_weights(file), qat=False)


@FORMATS.register("qat-int8")
def load_qat_int8(model: nn.Module, file: Path, info: DataInfo) -> nn.Module:
    """A qat-int8 run's model, rebuilt by `load_int8` from `file` with QAT's observers."""
    return load_int8(model, example_inputs(info, 2), read_weights(file), qat=True)
