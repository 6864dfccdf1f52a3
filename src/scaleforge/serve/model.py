"""The served model's contract: loaded once from a run's `final/`, `decode` (one request's JSON to instances,
checked), `predict` (a batch of instances to one output row each) and `encode` (those rows to JSON answers);
`answer` is the last two, what the model's thread or process runs for a batch.

The HTTP layer only translates; the batcher only batches. A request is checked whole in `decode`, before it
joins a batch, so a bad one gets its own 422 and never touches its batch-mates.
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scaleforge.runs import find_final, load_description, load_run

MAX_IMAGE_PIXELS = 4096 * 4096  # larger uploads are refused before they are decoded


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def pick_threads(fewer_s: float, every_s: float, batch_size: int, cores: int) -> int:
    """`ServedModel.choose_threads`'s rule, from a full batch's seconds on one core fewer and on every core."""
    compute_bound = fewer_s >= 0.0005 * batch_size
    return cores if compute_bound and fewer_s > 1.3 * every_s else max(1, cores - 1)


class InvalidInput(ValueError):
    """A request whose inputs the model cannot take; the message says what is wrong (answered 422)."""


@dataclass(frozen=True)
class ModelCard:
    """What `GET /v1/models` says about the model."""

    name: str
    version: str
    task: str
    input_schema: dict[str, Any]


class ServedModel:
    """A trained run's model, loaded once from `final/` and answering batches of instances. With `weights=False`
    it only decodes requests (the model then runs in another process: `serve.worker`)."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", *, weights: bool = True) -> None:
        started = time.perf_counter()
        final = find_final(path)
        self.device = torch.device(device)
        if weights:
            run = load_run(final)
            config, self.info = run.config, run.info
            self.model: torch.nn.Module | None = run.model.to(self.device).eval()
        else:
            (config, self.info), self.model = load_description(final), None
        self._final = final
        self._name = config.name if config.name != "default" else config.model.architecture
        self.load_seconds = time.perf_counter() - started

    @functools.cached_property
    def card(self) -> ModelCard:
        """Name, version, task and input schema; read when first asked for (a model process never asks)."""
        # the weights' digest names this exact model: responses and cache keys carry it
        digest = hashlib.sha256()
        with (self._final / "model.safetensors").open("rb") as file:
            while chunk := file.read(2**24):
                digest.update(chunk)
        return ModelCard(
            name=self._name, version=digest.hexdigest()[:12], task=self.info.task, input_schema=self._input_schema()
        )

    # ------------------------------------------------------------------------------------------- decode

    def _input_schema(self) -> dict[str, Any]:
        if self.info.task == "language_modeling":
            return {
                "instance": "a list of token ids",
                "min_length": 1,
                "max_length": self.info.seq_len,
                "vocab_size": self.info.vocab_size,
            }
        schema: dict[str, Any] = {
            "instance": "numbers nested as the shape",
            "shape": list(self.info.input_shape),
            "dtype": "float32",
        }
        if self.info.class_names is not None:
            schema["classes"] = list(self.info.class_names)
        if self.info.image is not None:
            image = self.info.image
            mode = "grey" if image.channels == 1 else "RGB"
            schema["image"] = {"endpoint": "/v1/predict/image", "mode": mode, "size": image.size}
        return schema

    def decode(self, inputs: Any) -> list[torch.Tensor]:
        """`{"inputs": [...]}`'s list as one tensor per instance (shaped `input_schema["shape"]`, or token ids);
        `InvalidInput` says what is wrong."""
        if not isinstance(inputs, list) or not inputs:
            raise InvalidInput("inputs must be a non-empty list of instances")
        if self.info.task == "language_modeling":
            return [self._tokens(instance, i) for i, instance in enumerate(inputs)]
        shape = tuple(self.info.input_shape)
        if _numbers_only(inputs, len(shape) + 1):  # the usual case, checked at speed
            try:
                with np.errstate(over="ignore"):  # a number beyond float32 becomes inf: refused below
                    array = np.array(inputs, dtype=np.float32)
            except (ValueError, OverflowError):  # ragged, or an integer beyond float32
                array = None
            if array is not None and array.shape[1:] == shape and np.isfinite(array).all():
                return list(torch.from_numpy(array).unbind(0))
        return [self._numbers(instance, i) for i, instance in enumerate(inputs)]  # finds what is wrong, and where

    def decode_image(self, data: bytes) -> torch.Tensor:
        """An uploaded image file as one instance, preprocessed as the training images were (`DataInfo.image`)."""
        from PIL import Image

        spec = self.info.image
        if spec is None:
            raise InvalidInput("this model does not take images")
        if not data:
            raise InvalidInput("file: the upload is empty")
        try:
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise InvalidInput(f"file: the image is {width}x{height} pixels, more than 4096x4096")
                pixels = spec.pixels(image)
        except InvalidInput:
            raise
        except Exception as error:  # noqa: BLE001 - Pillow raises many kinds for damaged files; each is the upload's fault
            raise InvalidInput(f"file: not a readable image ({type(error).__name__}: {error})") from None
        return spec.normalise(pixels).view(tuple(self.info.input_shape))

    def _tokens(self, instance: Any, index: int) -> torch.Tensor:
        vocab, max_length = self.info.vocab_size or 0, self.info.seq_len or 0
        if not isinstance(instance, list) or not 1 <= len(instance) <= max_length:
            raise InvalidInput(f"inputs[{index}]: expected a list of 1 to {max_length} token ids")
        for position, token in enumerate(instance):
            if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < vocab:
                raise InvalidInput(f"inputs[{index}][{position}]: {token!r} is not a token id in [0, {vocab})")
        return torch.tensor(instance, dtype=torch.long)

    def _numbers(self, instance: Any, index: int) -> torch.Tensor:
        shape = tuple(self.info.input_shape)
        flat: list[float] = []
        _flatten(instance, shape, f"inputs[{index}]", flat)
        return torch.tensor(flat, dtype=torch.float32).view(shape)

    # ------------------------------------------------------------------------------------------- predict

    @torch.inference_mode()
    def predict(self, instances: list[torch.Tensor]) -> torch.Tensor:
        """The batch's outputs, one row per instance: class probabilities, or the next token's probabilities."""
        if self.model is None:
            raise RuntimeError("this ServedModel was loaded without its weights")
        if self.info.task == "language_modeling":
            lengths = torch.tensor([len(tokens) for tokens in instances])
            # padded on the right: causal attention keeps each instance's last position blind to its padding
            tokens = torch.nn.utils.rnn.pad_sequence(instances, batch_first=True).to(self.device)
            logits = self.model(tokens)  # (B, T, V)
            last = logits[torch.arange(len(instances)), lengths.to(self.device) - 1]  # (B, V)
            return last.float().softmax(-1).cpu()
        outputs = self.model(torch.stack(instances).to(self.device))  # (B, classes)
        if self.info.task == "classification":
            outputs = outputs.float().softmax(-1)
        return outputs.float().cpu()

    def prepare(self, threads: int, batch_size: int, *, time_batches: bool) -> tuple[int, list[tuple[int, float]]]:
        """Set torch's threads for serving (`threads`, or 0: `choose_threads`) and, with `time_batches`, time
        batches of 1 and `batch_size` (rows, seconds) for the batcher's cost model."""
        if threads:
            torch.set_num_threads(threads)
        else:
            threads = self.choose_threads(batch_size, cpu_cores())
        timed = [(rows, self.time_batch(rows)) for rows in {1, batch_size}] if time_batches else []
        return threads, timed

    def choose_threads(self, batch_size: int, cores: int) -> int:
        """torch threads for serving on `cores` CPU cores: all of them when the model's compute dominates (a
        full batch takes at least 0.5 ms an instance, several times what a request costs the event loop, as for
        a ResNet) and every core runs it at least 1.3x faster than one core fewer; else one core fewer, left to
        the event loop (a small model, whose requests cost more than its compute, and whose spare threads only
        spin: timed alone they can look faster, served they are not). On a GPU, one core fewer."""
        fewer = max(1, cores - 1)
        if cores <= 1 or self.device.type != "cpu":
            return fewer
        seconds = {}
        for threads in (fewer, cores):
            torch.set_num_threads(threads)
            seconds[threads] = self.time_batch(batch_size)
        chosen = pick_threads(seconds[fewer], seconds[cores], batch_size, cores)
        torch.set_num_threads(chosen)
        return chosen

    def time_batch(self, rows: int) -> float:
        """Seconds a batch of `rows` instances takes, after a warm-up run (kernels are made for each shape): the
        best of three, or one run for a batch over 50 ms."""
        if self.info.task == "language_modeling":
            batch = [torch.zeros(self.info.seq_len or 1, dtype=torch.long)] * rows
        else:
            batch = [torch.zeros(tuple(self.info.input_shape))] * rows
        started = time.perf_counter()
        self.predict(batch)
        runs = []
        for _ in range(3 if time.perf_counter() - started < 0.05 else 1):
            started = time.perf_counter()
            self.predict(batch)
            runs.append(time.perf_counter() - started)
        return min(runs)

    def answer(self, instances: list[torch.Tensor]) -> list[dict[str, Any]]:
        """`predict` and `encode` together: what the model's thread runs for a batch."""
        return self.encode(self.predict(instances))

    # ------------------------------------------------------------------------------------------- encode

    def encode(self, outputs: torch.Tensor) -> list[dict[str, Any]]:
        """Each row's answer as JSON: the probabilities and the most probable class (or next token)."""
        rows = outputs.tolist()
        if self.info.task == "regression":
            return [{"values": values} for values in rows]
        tops = outputs.argmax(-1).tolist()
        if self.info.task == "language_modeling":
            return [
                {"next_token": top, "probability": values[top], "probabilities": values}
                for top, values in zip(tops, rows, strict=True)
            ]
        names = self.info.class_names
        return [
            {"top_class": top, "label": names[top], "probability": values[top], "probabilities": values}
            if names is not None
            else {"top_class": top, "probability": values[top], "probabilities": values}
            for top, values in zip(tops, rows, strict=True)
        ]


def _numbers_only(inputs: list[Any], depth: int) -> bool:
    """Whether `inputs` is lists nested `depth` deep around numbers only (no bools, strings or nulls), checked a
    level at a time (the shape is checked after)."""
    level = inputs
    for _ in range(depth - 1):
        if not set(map(type, level)) <= _LIST:
            return False
        level = list(itertools.chain.from_iterable(level))
    return set(map(type, level)) <= _NUMBER


_LIST = {list}
_NUMBER = {float, int}  # type(True) is bool: not a number here


def _flatten(value: Any, shape: tuple[int, ...], where: str, out: list[float]) -> None:
    """Append `value`'s numbers to `out`, checking that it nests as `shape` and holds finite numbers only."""
    if not shape:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidInput(f"{where}: expected a number, got {type(value).__name__}")
        try:
            number = float(value)
        except OverflowError:
            raise InvalidInput(f"{where}: {value} is too large for a float") from None
        if not math.isfinite(number):
            raise InvalidInput(f"{where}: {value} is not a finite number")
        with np.errstate(over="ignore"):
            if not math.isfinite(np.float32(number)):  # the same rounding as the fast path's cast
                raise InvalidInput(f"{where}: {value} is too large for a float32")
        out.append(number)
        return
    if not isinstance(value, list) or len(value) != shape[0]:
        got = f"a list of {len(value)}" if isinstance(value, list) else type(value).__name__
        raise InvalidInput(f"{where}: expected a list of {shape[0]}, got {got}")
    for i, item in enumerate(value):
        _flatten(item, shape[1:], f"{where}[{i}]", out)
