"""Reading a finished run directory back: the contract between training and everything after it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml
from torch import nn

from scaleforge.config import RunConfig, config_from_dict
from scaleforge.data.base import DataInfo
from scaleforge.errors import UsageError


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
    if not (final / "model.safetensors").is_file() or not (final / "config.yaml").is_file():
        raise UsageError(f"{path} is not a finished run: {final}/model.safetensors or config.yaml is missing")
    return final


def load_run(path: str | Path) -> LoadedRun:
    """Rebuild a run's model from `final/config.yaml` and load `final/model.safetensors` into it (no pickle)."""
    from safetensors.torch import load_file

    from scaleforge.train.trainer import build_model

    final = find_final(path)
    config = config_from_dict(yaml.safe_load((final / "config.yaml").read_text()), origin=str(final / "config.yaml"))
    info_data = json.loads((final / "data_info.json").read_text())
    info = DataInfo(**{k: tuple(v) if isinstance(v, list) else v for k, v in info_data.items()})
    model = build_model(config.model, info)
    model.load_state_dict(load_file(str(final / "model.safetensors")))
    model.eval()
    return LoadedRun(config=config, model=model, info=info)
