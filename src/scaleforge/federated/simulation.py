"""`scaleforge federate CONFIG --clients N --rounds R`: the whole federation on this machine, on Flower's
simulation runtime (its Ray backend: each client a task on an actor of one CPU, as many at once as the machine has
cores).

The rounds run in a host process that leads a process group of its own, with every process Ray starts: none
outlives the command, however it ends (host.py).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from scaleforge.errors import UsageError
from scaleforge.federated import quiet_flower
from scaleforge.federated.host import run_hosted
from scaleforge.federated.options import FederationOptions
from scaleforge.federated.server import Federation


def run_dir_of(options: FederationOptions, name: str) -> Path:
    return (
        Path(options.run_dir) if options.run_dir else Path("runs") / f"{name}-federated-{datetime.now():%Y%m%d-%H%M%S}"
    )


def prepared_run_dir(options: FederationOptions) -> tuple[Federation, Path]:
    """The federation's server side on its run directory (made, or resumed): every check before a process
    starts, of the config, the data and what the directory holds."""
    from scaleforge.config import load_config

    run_dir = run_dir_of(options, load_config(options.config, options.overrides).name)
    run_dir.mkdir(parents=True, exist_ok=True)
    return Federation(options, run_dir), run_dir


def federate(options: FederationOptions) -> dict[str, Any]:
    """Run (or continue) the federation `options` describes; returns its summary (with `run_dir`)."""
    quiet_flower()
    federation, run_dir = prepared_run_dir(options)
    check_client_config(federation)
    summary_file = run_dir / "summary.json"
    if federation.round >= options.rounds and summary_file.is_file():
        print(f"{run_dir} has run its {options.rounds} rounds already")
    else:
        where = f"round {federation.round}" if federation.round else "the start"
        print(
            f"federate {run_dir} | {options.clients} clients ({options.partition}) | {options.strategy} | "
            f"{options.rounds} rounds of {options.local_epochs} local epoch(s) | from {where}",
            flush=True,
        )
        run_hosted(options, run_dir)  # the rounds, in a process group of their own (host.py)
    summary = json.loads(summary_file.read_text())
    figures = " | ".join(f"{key} {value:.4f}" for key, value in summary.items() if key.startswith("val_"))
    print(f"done: {summary['rounds']} rounds | {figures} | {run_dir}")
    return {**summary, "run_dir": str(run_dir)}


def check_client_config(federation: Federation) -> None:
    """The config client 0 trains with, built and its data cut here, and every client's part against the batch
    size: a config error stops the command before any client starts (where it would fail every round)."""
    from scaleforge.config import config_from_dict
    from scaleforge.data.base import labels_of
    from scaleforge.data.partition import parse_scheme, part_indices
    from scaleforge.distributed.parallel_dims import ParallelDims
    from scaleforge.federated.client import client_config
    from scaleforge.training.trainer import build_data, with_earlier_tasks

    options = federation.options
    settings = {"server-round": 1, **federation.round_settings()}
    if options.strategy == "fedprox":  # the key FedProx's configure_train adds
        settings["proximal-mu"] = options.proximal_mu
    config = config_from_dict(client_config(federation.raw, 0, settings, federation.run_dir))
    with_earlier_tasks(build_data(config.data), config, ParallelDims.resolve(config.parallel, 1, 1))
    train, info = federation.data.train, federation.data.info
    iid = parse_scheme(options.partition)[0] == "iid"
    labels = np.zeros(len(train), dtype=np.int64) if iid else labels_of(train).numpy()  # type: ignore[arg-type]
    parts = part_indices(labels, options.partition, options.clients, federation.config.seed, info.num_classes)
    batch = config.training.batch_size
    small = [(index, len(part)) for index, part in enumerate(parts) if len(part) < batch]
    if small:
        index, size = small[0]
        raise UsageError(
            f"--partition {options.partition} gives client {index} {size} training samples, fewer than "
            f"training.batch_size {batch}: lower the batch size, or use fewer clients"
            + ("" if iid else " or a more even split")
        )
