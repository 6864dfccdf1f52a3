"""A federation's client: each round it trains its part of the data with the normal trainer, from the global model.

The client's config is the federation's with `data.partition` set to its part, `training.init_from` to the global
model of the round, `training.epochs` to the local epochs (the config's own schedule, run over them), FedProx's
`training.proximal_mu`, and a seed of the round and the part. Its run directory, `clients/<part>/run` under the
federation's, holds the last round it trained (its log in `clients/<part>/train.log`).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from safetensors.torch import save_file

from scaleforge.config import config_from_dict
from scaleforge.federated import quiet_flower
from scaleforge.runs import read_weights
from scaleforge.training.curves import read_metrics
from scaleforge.training.trainer import train

PART = "partition-id"  # the node config's key (Flower's, in simulation and deployment)


def client_config(raw: dict[str, Any], part: int, settings: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The config (as data) client `part` trains a round with: `raw`, the client's config, with the round's
    `settings` from the server (partition, parts, split-seed, local-epochs, proximal-mu, server-round) and the
    global model in `folder`."""
    config = json.loads(json.dumps(raw))  # a deep copy of plain data
    config["seed"] = int(config.get("seed", 0)) + 1000 * int(settings["server-round"]) + part  # each its own order
    data, training = config.setdefault("data", {}), config.setdefault("training", {})
    split = {"scheme": str(settings["partition"]), "parts": int(settings["parts"]), "seed": int(settings["split-seed"])}
    data["partition"] = {**split, "index": part}  # the same cut on every client: the server's seed
    training.update(epochs=int(settings["local-epochs"]), max_steps=None, init_from=str(folder / "global.safetensors"))
    training["proximal_mu"] = float(settings.get("proximal-mu", 0.0))
    logging = config.setdefault("logging", {})
    logging.update(tensorboard=False, plot=False, progress="plain", prometheus_port=None)
    config.setdefault("checkpoint", {})["every_steps"] = 0  # a round is short: it is redone if the client dies
    return config


def train_round(message: Message, context: Context, raw: dict[str, Any], folder: Path) -> Message:
    """Train this client's part for a round from the global model in `message`, in `folder`; reply with the new
    weights and the samples they were trained on (FedAvg's weight)."""
    quiet_flower()
    part = int(context.node_config[PART])
    settings = dict(message.content["config"])
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    save_file(dict(message.content["arrays"].to_torch_state_dict()), str(folder / "global.safetensors"))
    config = config_from_dict(client_config(raw, part, settings, folder))
    with (folder / "train.log").open("w") as log, contextlib.redirect_stdout(log):
        summary = train(config, folder / "run", resume="never")
    trained = read_weights(folder / "run" / "final" / "model.safetensors")
    weights = {name: trained[name] for name in message.content["arrays"]}  # in the global model's order (the
    # safetensors file's is sorted), which differential privacy's clipping pairs by position
    logged = read_metrics(folder / "run")[0]  # the run's log lines, each with its training loss
    metrics = {
        "num-examples": int(summary["steps"]) * config.training.batch_size,
        "dp-weight": 1,  # under differential privacy every client weighs the same
        "steps": int(summary["steps"]),
        "partition": part,
        "train_loss": float(logged[-1]["loss"]) if logged else float("nan"),
    }
    return Message(RecordDict({"arrays": ArrayRecord(weights), "metrics": MetricRecord(metrics)}), reply_to=message)


def client_app(raw: dict[str, Any], folder_of: Callable[[int], Path]) -> ClientApp:
    """The Flower client app of config `raw` (as data); `folder_of(part)` is where a part's round is trained."""
    app = ClientApp()

    @app.query()
    def part(message: Message, context: Context) -> Message:  # which part this node trains: the server's order
        record = ConfigRecord({PART: int(context.node_config[PART])})
        return Message(RecordDict({"part": record}), reply_to=message)

    @app.train()
    def train_(message: Message, context: Context) -> Message:
        return train_round(message, context, raw, folder_of(int(context.node_config[PART])))

    return app
