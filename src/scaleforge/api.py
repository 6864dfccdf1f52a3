"""The Python API: train, reopen and evaluate runs from a script or a notebook.

The `scaleforge` command calls these same functions, so a config trained through `fit` and through `scaleforge
train` ends with the same weights, bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from scaleforge.config import (
    RunConfig,
    apply_override,
    build_config,
    config_data,
    dump_yaml,
    load_config,
    mapping_data,
    rebuild_data,
    set_value,
)
from scaleforge.errors import ScaleforgeError, UsageError
from scaleforge.runs import TOKENIZER, TRUSTED, UNTRUSTED, Trust, find_final, load_run, open_run, run_config

if TYPE_CHECKING:
    from torch import nn

    from scaleforge.distributed.launch import LaunchOptions
    from scaleforge.training.callbacks import Callback

ConfigSource = str | Path | Mapping[str, Any] | RunConfig | None
Overrides = Sequence[str] | Mapping[str, Any]

__all__ = ["Run", "WorkersFailed", "evaluate", "fit", "load_run", "resolve_config"]


@dataclass(frozen=True)
class Run:
    """A run `fit` trained: where it is, its summary (`summary.json`) and the config it was trained from."""

    run_dir: Path
    summary: dict[str, Any] = field(repr=False)
    config: RunConfig = field(repr=False)

    def model(self) -> nn.Module:
        """The trained model, rebuilt from `final/` (checked against its manifest), in eval mode on the CPU."""
        return open_run(self.run_dir, self.trust()).model

    def trust(self) -> Trust:
        """A run this process trained runs its config's code (`imports:`, `module:Attr`), which is the caller's own:
        as long as `final/config.yaml` is still the config it was trained from. Otherwise it is opened as data."""
        try:
            saved = yaml.safe_load((self.run_dir / "final" / "config.yaml").read_text())
        except (OSError, yaml.YAMLError):
            return UNTRUSTED  # opening it reports what is wrong
        return TRUSTED if saved == self.config.to_dict() else UNTRUSTED


class WorkersFailed(ScaleforgeError):
    """The launched workers failed; the launcher has reported why."""

    def __init__(self, exit_code: int) -> None:
        super().__init__(f"the workers failed (exit code {exit_code})")
        self.exit_code = exit_code


def resolve_config(config: ConfigSource = None, overrides: Overrides = ()) -> RunConfig:
    """The validated config: `config` a YAML path, a mapping in the file format, a loaded `RunConfig` or None (the
    embedded default); `overrides` `"key=value"` strings (values parsed as YAML) or a mapping of dotted keys to
    values, applied on top."""
    if isinstance(config, RunConfig):
        if not overrides:
            return config
        raw, origins = rebuild_data(config)
    elif isinstance(config, Mapping):
        raw, origins = mapping_data(config, "fit(config=...)")
    else:
        raw, origins = config_data(config)
    if isinstance(overrides, str):
        raise UsageError(f"overrides: a list of 'key=value' strings or a mapping, not the string {overrides!r}")
    if isinstance(overrides, Mapping):
        for key, value in overrides.items():
            set_value(raw, origins, key, value, f"fit(overrides={{{key!r}: ...}})", f"{key}={value!r}")
    else:
        for item in overrides:
            apply_override(raw, origins, item)
    return build_config(raw, origins)


def fit(
    config: ConfigSource = None,
    overrides: Overrides = (),
    run_dir: str | Path | None = None,
    nproc: int = 1,
    *,
    resume: str = "auto",
    callbacks: Sequence[Callback] = (),
    launch: LaunchOptions | None = None,
) -> Run:
    """Train the model `config` (with `overrides`) describes and return the run.

    `run_dir`: where results go (default `runs/<name>-<time>`). `nproc`: processes on this machine; with more
    than one, workers are launched as `scaleforge train --nproc N` launches them (and `callbacks`, objects of this
    process, are refused). `resume`: `auto` continues from the newest good checkpoint in `run_dir`, `never` starts
    afresh, a path starts from that checkpoint. `launch` gives every launcher option (nodes, rendezvous,
    restarts) in place of `nproc`.
    """
    from scaleforge.distributed.launch import LaunchOptions

    if launch is not None and nproc != 1:
        raise UsageError("fit: give the processes either as nproc or in launch, not both")
    resolved = resolve_config(config, overrides)
    options = launch or LaunchOptions(nproc=nproc)
    if options.needs_launcher:
        if callbacks:
            raise UsageError(
                "fit: callbacks run in this process; with nproc > 1 register them and name them in the config"
            )
        return _fit_launched(resolved, _as_given(config, overrides), run_dir, resume, options)
    from scaleforge.training.trainer import train

    summary = train(resolved, Path(run_dir) if run_dir is not None else None, callbacks=callbacks, resume=resume)
    return Run(Path(summary["run_dir"]), summary, resolved)


def evaluate(
    run: Run | str | Path,
    *,
    trust_code: bool = False,
    signing_key_env: str | None = None,
    device: str | None = None,
    data: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> dict[str, float]:
    """A finished run's metrics on the validation split of the data it was trained on, or of other data: `data`, a
    config file whose `data` section stands in for the run's, and `overrides`, `data.KEY=VALUE` items on top (such
    as another task's `data.classes`). A path is opened as data (`trust_code` lets its config's own code run); a
    `Run` that `fit` returned is this process's own."""
    from scaleforge.evaluation import evaluate_model

    trust = run.trust() if isinstance(run, Run) else Trust(trust_code, signing_key_env)
    path = run.run_dir if isinstance(run, Run) else run
    opened = open_run(path, trust)
    config = opened.config
    outside = [item for item in overrides if not item.startswith("data.")]
    if outside:
        raise UsageError(f"{outside[0]}: evaluation takes data.KEY=VALUE overrides only (the model is the run's)")
    if data is not None:
        config = dataclasses.replace(config, data=load_config(data, overrides).data)
    elif overrides:
        config = dataclasses.replace(config, data=run_config(find_final(path), trust, overrides).data)
    tokenizer_file = find_final(path) / TOKENIZER
    tokenizer = tokenizer_file if tokenizer_file.is_file() else None
    return evaluate_model(opened.model, config, device, tokenizer, expected=opened.info)


def _as_given(config: ConfigSource, overrides: Overrides) -> list[str] | None:
    """The command-line items that give the workers this config as the user gave it (so that `config show` names
    its file and lines), or None when it exists only in this process."""
    if isinstance(overrides, Mapping):
        return None
    if config is None:
        return list(overrides)
    if isinstance(config, str | Path) and "=" not in str(config):  # a path with "=" would read as an override
        return [str(config), *overrides]
    return None


def _fit_launched(
    config: RunConfig, items: list[str] | None, run_dir: str | Path | None, resume: str, options: LaunchOptions
) -> Run:
    """Check what can be checked here, then start the workers; each runs `scaleforge train` without launch flags."""
    from scaleforge.distributed.env import DistEnv, check_device_per_process
    from scaleforge.distributed.launch import launch
    from scaleforge.distributed.parallel_dims import ParallelDims
    from scaleforge.hardware import select_device
    from scaleforge.runs import run_signing_key
    from scaleforge.training.run_dir import default_run_dir, resume_point

    options.check()
    ParallelDims.resolve(config.parallel, options.world_size, options.nproc)
    for nodes in range(options.node_range[0], options.max_nodes):  # an elastic job must fit every node count
        ParallelDims.resolve(config.parallel, options.nproc * nodes, options.nproc)
    check_device_per_process(config.hardware.device, DistEnv(world_size=options.world_size))
    select_device(config.hardware.device)  # a device this node lacks
    # One run directory for every worker and every restart: nodes agree on it through the job's id.
    if run_dir is not None:
        chosen = Path(run_dir)
    elif options.max_nodes > 1:
        chosen = Path("runs") / f"{config.name}-{options.rdzv_id or 'multinode'}"
    else:
        chosen = default_run_dir(config)
    if options.node_rank == 0:
        resume_point(chosen, resume, run_signing_key(config))
    with tempfile.TemporaryDirectory(prefix="scaleforge-config-") as folder:
        if items is None:
            path = Path(folder) / "config.yaml"
            path.write_text(dump_yaml(config))
            items = [str(path)]
        code = launch(["train", *items, "--run-dir", str(chosen), "--resume", resume], options)
    if code != 0:
        raise WorkersFailed(code)
    summary_file = chosen / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    return Run(chosen, {**summary, "run_dir": str(chosen)}, config)
