"""Reading a finished run directory back: the contract between training and everything after it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from scaleforge.config import RunConfig, load_config
from scaleforge.data.base import DataInfo
from scaleforge.errors import UsageError

FINAL_FILES = ("model.safetensors", "config.yaml", "data_info.json")


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
    """Rebuild a run's model from `final/config.yaml` and load `final/model.safetensors` into it (no pickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from scaleforge.components import build_model

    final = find_final(path)
    config, info = load_description(final)
    model = build_model(config.model, info)
    try:
        state = load_file(str(final / "model.safetensors"))
        model.load_state_dict(state)
    except (SafetensorError, RuntimeError, OSError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"{final / 'model.safetensors'} does not hold this model's weights: {first_line}") from error
    model.eval()
    return LoadedRun(config=config, model=model, info=info)
