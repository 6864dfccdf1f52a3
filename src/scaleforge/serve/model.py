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

from scaleforge.errors import UsageError
from scaleforge.hardware import onnx_session
from scaleforge.runs import UNTRUSTED, Trust, find_final, load_description, open_run, run_tokenizer

MAX_IMAGE_PIXELS = 4096 * 4096  # larger uploads are refused before they are decoded
MAX_IMAGE_BYTES = 3 * MAX_IMAGE_PIXELS  # the largest image taken as an uncompressed 8-bit RGB file
JSON_BYTE_WIDTH = 6  # the most characters JSON spends on one byte of text: a control character as \u0001
# the longest number in JSON, "-2.2250738585072014e-308" (24 characters), with its ", " and a share of the brackets
JSON_NUMBER_BYTES = 32


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def compute_bound(batch_s: float, batch_size: int) -> bool:
    """Whether a model whose full batch takes `batch_s` is dominated by its compute: at least 0.5 ms an instance,
    several times what a request costs the server's event loop (a ResNet, not a small MLP)."""
    return batch_s >= 0.0005 * batch_size


def pick_threads(fewer_s: float, every_s: float, batch_size: int, cores: int) -> int:
    """`ServedModel.choose_threads`'s rule, from a full batch's seconds on one core fewer and on every core."""
    return cores if compute_bound(fewer_s, batch_size) and fewer_s > 1.3 * every_s else max(1, cores - 1)


class InvalidInput(ValueError):
    """A request whose inputs the model cannot take; the message says what is wrong (answered 422)."""


@dataclass(frozen=True)
class ModelCard:
    """What `GET /v1/models` says about the model."""

    name: str
    version: str
    task: str
    input_schema: dict[str, Any]
    created: int  # when the weights were written, in seconds since the epoch (OpenAI's `created`)


class OnnxRuntimeModel(torch.nn.Module):
    """An exported ONNX model run by ONNX Runtime on the CPU behind a module's call: a batch in, its outputs out.
    ONNX Runtime's own threads run it (`set_threads`), and it releases the interpreter while it does."""

    def __init__(self, path: Path, threads: int = 0) -> None:
        super().__init__()
        self.path = path
        self.set_threads(threads)
        batch = self.session.get_inputs()[0].shape[0]
        if not isinstance(batch, str):  # a fixed number: the export took one batch size only
            raise UsageError(
                f"{path} takes batches of {batch} only; export it with --dynamic-batch to serve it with batching"
            )

    def set_threads(self, threads: int) -> None:
        """Run on `threads` threads (0: ONNX Runtime's default)."""
        try:
            self.session = onnx_session(self.path, threads)
        except Exception as error:  # noqa: BLE001 - ONNX Runtime raises its own kinds for unreadable files
            raise UsageError(f"{self.path} is not an ONNX model ONNX Runtime can run: {error}") from error
        self._input = self.session.get_inputs()[0].name

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self._input: batch.numpy()})[0])


def onnx_file(final: Path, given: str | Path | None) -> Path:
    """The ONNX file to serve: `given`, or the run's `exported/model.onnx`; `UsageError` if it is not there."""
    path = Path(given) if given is not None else final.parent / "exported" / "model.onnx"
    if not path.is_file():
        raise UsageError(
            f"{path} does not exist; write it with `scaleforge export {final.parent} --format onnx --dynamic-batch`"
        )
    return path


class ServedModel:
    """A trained run's model, loaded once from `final/` and answering batches of instances. With `weights=False`
    it only decodes requests (the model then runs in another process: `serve.worker`). With `onnx` (an exported
    ONNX file, or True for the run's `exported/model.onnx`) ONNX Runtime runs the model instead of torch."""

    def __init__(
        self,
        path: str | Path,
        device: str | torch.device = "cpu",
        *,
        weights: bool = True,
        onnx: str | Path | bool | None = None,
        trust: Trust = UNTRUSTED,
    ) -> None:
        """The run is opened with `trust`: checked against its manifest, its own code refused unless trusted."""
        started = time.perf_counter()
        final = find_final(path)
        self.device = torch.device(device)
        self._weights_file = final / "model.safetensors"
        if onnx:
            (config, self.info) = load_description(final, trust)
            self._weights_file = onnx_file(final, None if onnx is True else onnx)
            self.device = torch.device("cpu")  # ONNX Runtime's CPU provider
            self.model: torch.nn.Module | None = OnnxRuntimeModel(self._weights_file)
        elif weights:
            run = open_run(final, trust)
            config, self.info = run.config, run.info
            self.model = run.model.to(self.device)  # in eval mode, as `load_run` leaves it
        else:
            (config, self.info), self.model = load_description(final, trust), None
        self.tokenizer = run_tokenizer(final, config, self.info)  # text in and out of a language model
        self._final = final
        self._timed: dict[int, float] = {}  # rows -> seconds, of the batches `prepare` timed
        self._name = config.name if config.name != "default" else config.model.architecture
        self.load_seconds = time.perf_counter() - started

    @property
    def generates_text(self) -> bool:
        """Whether this is a language model on text, which serves `/v1/completions` too (from this process)."""
        return self.info.task == "language_modeling" and self.tokenizer is not None

    @functools.cached_property
    def card(self) -> ModelCard:
        """Name, version, task and input schema; read when first asked for (a model process never asks)."""
        # the weights' digest names this exact model: responses and cache keys carry it
        digest = hashlib.sha256()
        with self._weights_file.open("rb") as file:
            while chunk := file.read(2**24):
                digest.update(chunk)
        return ModelCard(
            name=self._name,
            version=digest.hexdigest()[:12],
            task=self.info.task,
            input_schema=self._input_schema(),
            created=int(self._weights_file.stat().st_mtime),
        )

    # ------------------------------------------------------------------------------------------- decode

    def _input_schema(self) -> dict[str, Any]:
        if self.info.task == "language_modeling":
            tokens: dict[str, Any] = {
                "instance": "a list of token ids",
                "min_length": 1,
                "max_length": self.info.seq_len,
                "vocab_size": self.info.vocab_size,
            }
            if self.tokenizer is not None:
                tokens["instance"] = "a list of token ids, or a text (its last max_length tokens are read)"
                tokens["tokenizer"] = self.tokenizer.kind
            return tokens
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

    def json_instance_bytes(self) -> int:
        """The most bytes one instance takes in a request's JSON, written as clients write it (no padding): every
        number at float64's full precision, or every token id at the vocabulary's widest, with separators; with a
        tokenizer, or a text of a full context of the longest tokens, each byte escaped."""
        if self.info.task == "language_modeling":
            widest = len(str(max(0, (self.info.vocab_size or 1) - 1)))
            ids = (self.info.seq_len or 1) * (widest + 2) + 2
            if self.tokenizer is None:
                return ids
            longest = int(self.tokenizer.token_bytes().max())
            return max(ids, (self.info.seq_len or 1) * longest * JSON_BYTE_WIDTH + 2)
        return math.prod(self.info.input_shape) * JSON_NUMBER_BYTES

    def decode(self, inputs: Any) -> list[np.ndarray]:
        """`{"inputs": [...]}`'s list as one array per instance (float32 shaped `input_schema["shape"]`, or int64
        token ids); `InvalidInput` says what is wrong."""
        if not isinstance(inputs, list) or not inputs:
            raise InvalidInput("inputs must be a non-empty list of instances")
        if self.info.task == "language_modeling":
            return [self._tokens(instance, i) for i, instance in enumerate(inputs)]
        shape = tuple(self.info.input_shape)
        if _numbers_only(inputs, len(shape) + 1):  # the usual case, checked at speed
            try:
                array = np.array(inputs, dtype=np.float64)  # exact for JSON's numbers: checked before the cast
            except (ValueError, OverflowError):  # ragged, or an integer beyond a float
                array = None
            # NaN fails both comparisons; and within these bounds float32 rounds to a finite number
            if (
                array is not None
                and array.shape[1:] == shape
                and -_FLOAT32_LIMIT < array.min() <= array.max() < _FLOAT32_LIMIT
            ):
                return list(array.astype(np.float32))
        return [self._numbers(instance, i) for i, instance in enumerate(inputs)]  # finds what is wrong, and where

    def decode_image(self, data: bytes) -> np.ndarray:
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
        return spec.normalise(pixels).view(tuple(self.info.input_shape)).numpy()

    def decode_frame(self, bgr: np.ndarray) -> np.ndarray:
        """A video frame ((H, W, 3) uint8, OpenCV's BGR order) as one instance, preprocessed exactly as an uploaded
        image is (`decode_image`), and so as the training images were."""
        from PIL import Image

        spec = self.info.image
        if spec is None:
            raise InvalidInput("this model does not take images")
        pixels = spec.pixels(Image.fromarray(np.ascontiguousarray(bgr[..., ::-1])))  # RGB, as Pillow reads files
        return spec.normalise(pixels).view(tuple(self.info.input_shape)).numpy()

    def _tokens(self, instance: Any, index: int) -> np.ndarray:
        vocab, max_length = self.info.vocab_size or 0, self.info.seq_len or 0
        if isinstance(instance, str):
            return self._text(instance, index, max_length)
        if not isinstance(instance, list) or not 1 <= len(instance) <= max_length:
            raise InvalidInput(f"inputs[{index}]: expected a list of 1 to {max_length} token ids")
        for position, token in enumerate(instance):
            if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < vocab:
                raise InvalidInput(f"inputs[{index}][{position}]: {token!r} is not a token id in [0, {vocab})")
        return np.array(instance, dtype=np.int64)

    def _text(self, text: str, index: int, max_length: int) -> np.ndarray:
        """A text's token ids by the run's tokenizer: its last `max_length` tokens, the model's context."""
        if self.tokenizer is None:
            raise InvalidInput(f"inputs[{index}]: this model takes lists of token ids, not text")
        tokens = self.tokenizer.encode(text)
        if not len(tokens):
            raise InvalidInput(f"inputs[{index}]: the text is empty")
        return tokens[-max_length:].astype(np.int64)

    def _numbers(self, instance: Any, index: int) -> np.ndarray:
        shape = tuple(self.info.input_shape)
        flat: list[float] = []
        _flatten(instance, shape, f"inputs[{index}]", flat)
        return np.array(flat, dtype=np.float32).reshape(shape)

    # ------------------------------------------------------------------------------------------- predict

    @torch.inference_mode()
    def predict(self, instances: list[np.ndarray]) -> torch.Tensor:
        """The batch's outputs, one row per instance (`decode`'s arrays): class probabilities, or the next
        token's probabilities."""
        if self.model is None:
            raise RuntimeError("this ServedModel was loaded without its weights")
        if self.info.task == "language_modeling":
            lengths = torch.tensor([len(tokens) for tokens in instances])
            # padded on the right: causal attention keeps each instance's last position blind to its padding
            sequences = [torch.from_numpy(tokens) for tokens in instances]
            tokens = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True).to(self.device)
            logits = self.model(tokens)  # (B, T, V)
            last = logits[torch.arange(len(instances)), lengths.to(self.device) - 1]  # (B, V)
            return last.float().softmax(-1).cpu()
        batch = torch.from_numpy(np.stack(instances))
        on_cpu = self.device.type == "cpu"  # then no copy, and no call that would only return its input
        outputs = self.model(batch if on_cpu else batch.to(self.device))  # (B, classes)
        if self.info.task == "classification":
            outputs = outputs.softmax(-1, dtype=torch.float32)
        elif outputs.dtype != torch.float32:
            outputs = outputs.float()
        return outputs if on_cpu else outputs.cpu()

    def prepare(self, threads: int, batch_size: int, *, time_batches: bool) -> tuple[int, list[tuple[int, float]]]:
        """Set torch's threads for serving (`threads`, or 0: `choose_threads`, or one core fewer with
        `time_batches`) and, with `time_batches` (a latency target), time batches of 1 and `batch_size` (rows,
        seconds) for the batcher's cost model."""
        if threads:
            self._set_threads(threads)
        elif time_batches:  # for a latency target: a core left to HTTP, whose work would stall every core's
            threads = max(1, cpu_cores() - 1)  # share of each batch (resnet18 at 3x capacity: p99 60 ms on
            self._set_threads(threads)  # 2 threads, 45-50 ms on 1, on these 2 cores)
        else:
            threads = self.choose_threads(batch_size, cpu_cores())
        timed = [(rows, self.time_batch(rows)) for rows in {1, batch_size}] if time_batches else []
        self._timed.update(timed)
        return threads, timed

    def is_compute_bound(self, batch_size: int) -> bool:
        """`compute_bound` for this model, from the full batch timed by `prepare` (or timed now)."""
        if batch_size not in self._timed:
            self._timed[batch_size] = self.time_batch(batch_size)
        return compute_bound(self._timed[batch_size], batch_size)

    def choose_threads(self, batch_size: int, cores: int) -> int:
        """torch threads for serving on `cores` CPU cores: all of them when the model's compute dominates (a
        full batch takes at least 0.5 ms an instance, several times what a request costs the event loop, as for
        a ResNet) and every core runs it at least 1.3x faster than one core fewer; else one core fewer, left to
        the event loop (a small model, whose requests cost more than its compute, and whose spare threads only
        spin: timed alone they can look faster, served they are not). On a GPU, one core fewer."""
        fewer = max(1, cores - 1)
        if cores <= 1 or self.device.type != "cpu":
            return fewer
        batch = self._zeros(batch_size)
        seconds = {fewer: math.inf, cores: math.inf}
        for round_ in range(4):  # interleaved, the best of three after a warm-up: a passing load skews neither
            for threads in seconds:
                self._set_threads(threads)
                started = time.perf_counter()
                self.predict(batch)
                if round_:
                    seconds[threads] = min(seconds[threads], time.perf_counter() - started)
        chosen = pick_threads(seconds[fewer], seconds[cores], batch_size, cores)
        self._set_threads(chosen)
        self._timed[batch_size] = seconds[chosen]
        return chosen

    def _set_threads(self, threads: int) -> None:
        torch.set_num_threads(threads)
        if isinstance(self.model, OnnxRuntimeModel):
            self.model.set_threads(threads)

    def time_batch(self, rows: int) -> float:
        """Seconds a batch of `rows` instances takes, after a warm-up run (kernels are made for each shape): the
        best of three, or one run for a batch over 50 ms."""
        batch = self._zeros(rows)
        started = time.perf_counter()
        self.predict(batch)
        runs = []
        for _ in range(3 if time.perf_counter() - started < 0.05 else 1):
            started = time.perf_counter()
            self.predict(batch)
            runs.append(time.perf_counter() - started)
        return min(runs)

    def _zeros(self, rows: int) -> list[np.ndarray]:
        """A batch of `rows` instances of zeros (token 0s at full length for a language model)."""
        if self.info.task == "language_modeling":
            return [np.zeros(self.info.seq_len or 1, dtype=np.int64)] * rows
        return [np.zeros(tuple(self.info.input_shape), dtype=np.float32)] * rows

    def answer(self, instances: list[np.ndarray]) -> list[dict[str, Any]]:
        """`predict` and `encode` together: what the model's thread runs for a batch."""
        return self.encode(self.predict(instances))

    # ------------------------------------------------------------------------------------------- encode

    def encode(self, outputs: torch.Tensor) -> list[dict[str, Any]]:
        """Each row's answer as JSON: the probabilities and the most probable class (or next token, with its text
        when the run has a tokenizer)."""
        array = outputs.numpy()
        rows = array.tolist()
        if self.info.task == "regression":
            return [{"values": values} for values in rows]
        tops = array.argmax(-1).tolist()
        if self.info.task == "language_modeling":
            answers = [
                {"next_token": top, "probability": values[top], "probabilities": values}
                for top, values in zip(tops, rows, strict=True)
            ]
            if self.tokenizer is not None:
                for answer in answers:
                    answer["next_text"] = self.tokenizer.decode([answer["next_token"]])
            return answers
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
# the smallest magnitude that float32 rounds to infinity: halfway between its largest finite value and 2**128
_FLOAT32_LIMIT = 2.0**128 - 2.0**103


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
