"""Reading a finished run directory back: the contract between training and everything after it.

`final/` holds `model.safetensors`, `config.yaml` and `data_info.json`, and `manifest.json` (the size and SHA-256
of each, written last) in runs written since it was introduced. A compressed run also holds `compression.json`,
whose `format` says how its tensors map onto the model the config builds (see `scaleforge.compress`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scaleforge.config import RunConfig, load_config
from scaleforge.data.base import DataInfo
from scaleforge.errors import UsageError

FINAL_FILES = ("model.safetensors", "config.yaml", "data_info.json")
MANIFEST = "manifest.json"
COMPRESSION = "compression.json"
INT8_FORMATS = ("dynamic-int8", "static-int8", "qat-int8")  # compression.json formats whose weights are int8


@dataclass(frozen=True)
class LoadedRun:
    """A trained model with the config it was trained from and its dataset's description."""

    config: RunConfig
    model: nn.Module
    info: DataInfo


def find_final(path: str | Path) -> Path:
    """The `final/` folder of a run directory (or the folder itself if it is one)."""
    path = Path(path)
    final = path / "final" if (path / "final").is_dir() else path
    missing = [name for name in FINAL_FILES if not (final / name).is_file()]
    if missing:
        raise UsageError(f"{path} is not a finished run: {', '.join(missing)} missing in {final}")
    return final


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(final: Path) -> None:
    """`final/manifest.json`: the size and SHA-256 of every other file of `final/`; written last."""
    files = {
        path.name: {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
        for path in sorted(final.iterdir())
        if path.is_file() and path.name != MANIFEST
    }
    (final / MANIFEST).write_text(json.dumps({"files": files}, indent=1) + "\n")


def verify_final(path: str | Path) -> Path:
    """`find_final`, and every file checked against `manifest.json` where the run has one (`UsageError` naming the
    file that does not match)."""
    final = find_final(path)
    manifest = final / MANIFEST
    if not manifest.is_file():
        return final  # written before manifests: nothing to check against
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as error:
        raise UsageError(f"{manifest} cannot be read: {error}") from error
    for name, expected in files.items():
        file = final / name
        if not file.is_file():
            raise UsageError(f"{final} is damaged: {name} is missing")
        if file.stat().st_size != expected["bytes"] or sha256_of(file) != expected["sha256"]:
            raise UsageError(f"{final} is damaged: {name} does not match its SHA-256 in {MANIFEST}")
    return final


def compression_of(final: Path) -> dict[str, Any] | None:
    """`final/compression.json` of a compressed run (None for a trained one)."""
    path = final / COMPRESSION
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise UsageError(f"{path} is damaged: {error}") from error


def load_description(path: str | Path) -> tuple[RunConfig, DataInfo]:
    """A finished run's config and its dataset's description, without its weights."""
    final = find_final(path)
    config = load_config(final / "config.yaml")
    try:
        info = DataInfo.from_json(json.loads((final / "data_info.json").read_text()))
    except (ValueError, TypeError) as error:
        raise UsageError(f"{final / 'data_info.json'} is damaged: {error}") from error
    return config, info


def load_run(path: str | Path) -> LoadedRun:
    """Rebuild a run's model from `final/config.yaml` and load `final/model.safetensors` into it (no pickle); a
    compressed run's model is rebuilt in its compressed form (`compression.json`)."""
    from scaleforge.components import build_model

    final = find_final(path)
    config, info = load_description(final)
    model = build_model(config.model, info)
    fmt = (compression_of(final) or {}).get("format")
    file = final / "model.safetensors"
    if fmt in ("static-int8", "qat-int8"):
        from scaleforge.compress.quantize import load_int8

        model = load_int8(model, example_inputs(info, 2), read_weights(file), qat=fmt == "qat-int8")
    else:
        if fmt == "dynamic-int8":
            from scaleforge.compress.quantize import dynamic_int8

            model = dynamic_int8(model)  # the int8 structure, which the saved int8 tensors fill
        load_weights(model, file)
    model.eval()
    return LoadedRun(config=config, model=model, info=info)


def example_inputs(info: DataInfo, rows: int, seed: int = 0) -> torch.Tensor:
    """A batch of `rows` inputs shaped as the model takes them (token ids for a language model)."""
    generator = torch.Generator().manual_seed(seed)
    if info.task == "language_modeling":
        return torch.randint(info.vocab_size or 2, (rows, info.seq_len or 1), generator=generator)
    return torch.randn(rows, *info.input_shape, generator=generator)


def read_weights(file: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; `UsageError` when it cannot be read as one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as error:
        raise UsageError(f"{file} does not hold this model's weights: {_first_line(error)}") from error


def load_weights(model: nn.Module, file: Path) -> None:
    """Load a safetensors file into `model` (every tensor, under the model's names); `UsageError` otherwise."""
    state = read_weights(file)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise UsageError(f"{file} does not hold this model's weights: {_first_line(error)}") from error


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
