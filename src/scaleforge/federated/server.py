"""A federation's server: the rounds, the global model's evaluation, and a checkpoint after every round.

Each round: the clients sampled (from the seed and the round, `strategies.configure_round`) get the global model;
their replies, put in the order of their parts (so the sums are the same in every run), are aggregated by the
Flower strategy; the server evaluates the new global model on the validation split, appends the round's line to
metrics.jsonl and writes `checkpoints/round-NNNN/` (the global model, the strategy's state and the round, verified
by its manifest as `final/` is). Started again on the same run directory, it continues after the newest good
checkpoint, and the result is the one an uninterrupted federation gets.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid
from safetensors.torch import save

from scaleforge.config import RunConfig, config_data, dump_yaml, load_config
from scaleforge.errors import ConfigError, UsageError
from scaleforge.evaluation import evaluate_model
from scaleforge.federated.options import SAME_ON_RESUME, FederationOptions
from scaleforge.federated.strategies import (
    build_strategy,
    configure_round,
    load_strategy_state,
    privacy_spent,
    strategy_state,
)
from scaleforge.runs import ManifestMismatch, check_manifest, read_weights, run_signing_key, save_final
from scaleforge.training.preparations import PreparationContext, load_initial_weights
from scaleforge.training.trainer import build_data, build_model, seed_everything

CHECKPOINTS = "checkpoints"
STATE, STRATEGY = "federation.json", "strategy.safetensors"
KEEP = 2  # round checkpoints kept: the newest, and the one before in case the newest is damaged


class FederationFailed(Exception):
    """A round that cannot go on (fewer replies than it needs); the message says which clients failed and why."""


class Federation:
    """The server's side of `options`: built (and its config checked) before any client starts."""

    def __init__(self, options: FederationOptions, run_dir: Path) -> None:
        self.options, self.run_dir = options, run_dir
        self.config = load_config(options.config, options.overrides)
        self.raw, _ = config_data(options.config, options.overrides)
        self.data = build_data(self.config.data)
        seed_everything(self.config.seed)
        self.model = build_model(self.config.model, self.data.info)
        if self.config.training.init_from:
            load_initial_weights(self.model, self.config.training.init_from, PreparationContext(self.data.info, None))  # type: ignore[arg-type]
        if options.private and any(True for _ in self.model.buffers()):
            raise ConfigError(
                "model: differential privacy clips and noises every array the clients send, and this model has "
                "buffers (such as BatchNorm's running statistics), which cannot be clipped as weights: use a model "
                "without them"
            )
        self.strategy = build_strategy(options)
        self.round, self.history = 0, []
        self.noise_seed = secret_seed()  # differential privacy's noise: the server's secret
        self.resumed_from: int | None = None  # the round of the checkpoint this run continued from
        self.error: BaseException | None = None
        self._resume()  # refuses a run directory of other settings before anything is written to it
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_yaml(self.config))  # as a trained run's: `scaleforge runs` lists it

    # ---------------------------------------------------------------------------------------------- resume

    def _resume(self) -> None:
        """Continue after the newest checkpoint that matches its manifest, if the run directory has one."""
        for folder in reversed(round_folders(self.run_dir)):
            try:
                check_manifest(folder, run_signing_key(self.config))
            except ManifestMismatch as error:
                print(f"warning: {folder.name} is damaged ({error}); trying the one before")
                continue
            state = json.loads((folder / STATE).read_text())
            self._check_same({**state["settings"], "done": state["round"]})  # the config's digest among them
            self.model.load_state_dict(read_weights(folder / "model.safetensors"))
            load_strategy_state(self.strategy, read_weights(folder / STRATEGY))
            self.round, self.history = int(state["round"]), list(state["history"])
            self.noise_seed = int(state.get("noise_seed", self.noise_seed))
            self.resumed_from = self.round
            return

    def _check_same(self, settings: dict[str, Any]) -> None:
        mine = self.settings()
        if settings.get("config") != mine["config"]:
            raise UsageError(
                f"{self.run_dir} holds a federation of another config (its checkpoints' config.yaml): give another "
                f"--run-dir, or the same config and overrides to continue it"
            )
        if self.options.rounds < int(settings.get("done", 0)):
            raise UsageError(
                f"{self.run_dir} has run {settings['done']} rounds, more than --rounds {self.options.rounds}"
            )
        for name in SAME_ON_RESUME:
            if settings.get(name) != mine[name]:
                raise UsageError(
                    f"{self.run_dir} holds a federation with {name.replace('_', '-')} {settings.get(name)}, not "
                    f"{mine[name]}: give another --run-dir, or the same settings to continue it"
                )

    def round_settings(self) -> dict[str, Any]:
        """What every client is told each round besides the global model (FedProx adds its proximal-mu)."""
        options = self.options
        return {"local-epochs": options.local_epochs, "partition": options.partition, "parts": options.clients,
                "split-seed": self.config.seed}  # fmt: skip

    def settings(self) -> dict[str, Any]:
        """What a checkpoint records to check a resumed federation against: the options, and the resolved
        config's digest (its model, data, training and seed)."""
        return {**self.options.settings(), "config": hashlib.sha256(dump_yaml(self.config).encode()).hexdigest()}

    # ---------------------------------------------------------------------------------------------- rounds

    def main(self, grid: Grid, context: Context) -> None:
        """The ServerApp's body: every round left; an error is kept for the caller (Flower would only log it)."""
        try:
            self._rounds(grid)
        except BaseException as error:  # noqa: BLE001 - handed to the command, which reports it
            self.error = error

    def _rounds(self, grid: Grid) -> None:
        order = self._parts_in_order(grid)
        arrays = ArrayRecord(self.model.state_dict())
        if self.round == 0:
            self._record({"round": 0, **self._evaluate(), "clients": 0, "bytes_sent": 0, "bytes_received": 0})
        for server_round in range(self.round + 1, self.options.rounds + 1):
            started = time.perf_counter()
            settings = ConfigRecord(self.round_settings())
            self._wait_for_clients(grid, order, server_round)
            messages = configure_round(self.strategy, server_round, arrays, settings, grid, self.config.seed, order)
            replies = list(grid.send_and_receive(messages, timeout=self.options.round_timeout_s))
            good = self._good_replies(server_round, messages, replies)
            arrays = self._aggregate(server_round, good, arrays)
            line = {
                "round": server_round,
                "train_loss": _weighted_loss(good),
                **self._evaluate(),
                "clients": len(good),
                "client_steps": sum(int(m.content["metrics"]["steps"]) for m in good),
                "parts": sorted(int(m.content["metrics"]["partition"]) for m in good),
                "failed": len(messages) - len(good),
                "bytes_sent": len(messages) * arrays.count_bytes(),
                "bytes_received": sum(m.content["arrays"].count_bytes() for m in good),
                "round_s": round(time.perf_counter() - started, 3),
            }
            if self.options.private:
                line["dp_epsilon"] = privacy_spent(self.options, server_round)
            self.round = server_round
            self._record(line)
            self._checkpoint()

    def _aggregate(self, server_round: int, good: list[Message], arrays: ArrayRecord) -> ArrayRecord:
        """The next global model from the round's replies: the strategy's aggregate, held in the model's dtypes
        (FedAdam's step comes back in float64) as the checkpoint holds it. Differential privacy's noise is drawn
        from numpy's global generator: seeded for the call from the federation's secret seed (128 random bits kept
        in its checkpoints, on the server only: a seed anyone knew would let them subtract the noise) and the
        round, its state given back after."""
        saved = np.random.get_state()
        secret = np.random.SeedSequence([self.noise_seed, server_round])  # never sent, never logged
        np.random.set_state(np.random.RandomState(np.random.MT19937(secret)).get_state())
        try:
            aggregated, _ = self.strategy.aggregate_train(server_round, good)
        finally:
            np.random.set_state(saved)
        if aggregated is None:
            return arrays
        self.model.load_state_dict(aggregated.to_torch_state_dict())
        return ArrayRecord(self.model.state_dict())

    def _wait_for_clients(self, grid: Grid, order: list[int], server_round: int) -> None:
        """Until the round has the clients it needs connected (Flower's sampling would wait for them forever)."""
        self._connected(grid, self.options.needed(), set(order), f"round {server_round}: ")

    def _connected(self, grid: Grid, needed: int, among: set[int] | None = None, prefix: str = "") -> list[int]:
        """The connected nodes (of `among`, if given), once `needed` are; `FederationFailed` after
        `--round-timeout`."""
        timeout = self.options.round_timeout_s
        deadline = time.monotonic() + timeout
        while len(nodes := [n for n in grid.get_node_ids() if among is None or n in among]) < needed:
            if time.monotonic() > deadline:
                total = len(among) if among is not None else self.options.clients
                raise FederationFailed(
                    f"{prefix}{len(nodes)} of {total} clients connected within {timeout:g} s, {needed} needed"
                )
            time.sleep(0.5)
        return nodes

    def _parts_in_order(self, grid: Grid) -> list[int]:
        """Every client's node id, in the order of the parts they train (asked once, when all have connected)."""
        clients, timeout = self.options.clients, self.options.round_timeout_s
        nodes = self._connected(grid, clients)
        asks = [Message(RecordDict(), message_type=MessageType.QUERY, dst_node_id=node) for node in nodes]
        parts = {}
        for reply in grid.send_and_receive(asks, timeout=timeout):
            if not reply.has_error():
                parts[reply.metadata.src_node_id] = int(reply.content["part"]["partition-id"])
        if sorted(parts.values()) != list(range(clients)):
            raise FederationFailed(
                f"{len(parts)} of {clients} clients said which part they train ({sorted(parts.values())}); each "
                f"of 0 to {clients - 1} is needed"
            )
        return sorted(parts, key=parts.__getitem__)

    def _good_replies(self, server_round: int, messages: list[Message], replies: list[Message]) -> list[Message]:
        """The replies without error, in the order of their parts; `FederationFailed` when fewer than needed."""
        good = sorted((m for m in replies if not m.has_error()), key=lambda m: int(m.content["metrics"]["partition"]))
        if len(good) < self.options.needed():
            reasons = sorted({_first_sentence(m.error.reason) for m in replies if m.has_error()})
            missing = len(messages) - len(replies)
            raise FederationFailed(
                f"round {server_round}: {len(good)} of {len(messages)} clients replied, {self.options.needed()} needed"
                + (f" ({missing} gave no reply within {self.options.round_timeout_s:g} s)" if missing else "")
                + (f"; {'; '.join(reasons)}" if reasons else "")
            )
        return good

    def _evaluate(self) -> dict[str, float]:
        metrics = evaluate_model(self.model, self.config)
        return {f"val_{name}" if not name.startswith("val_") else name: value for name, value in metrics.items()}

    # ---------------------------------------------------------------------------------------------- records

    def _record(self, line: dict[str, Any]) -> None:
        self.history.append(line)
        shown = " | ".join(
            f"{key} {value:.4f}" for key, value in line.items() if key.startswith(("val_", "train_")) and value == value
        )
        print(
            f"round {line['round']}/{self.options.rounds} | {line['clients']} clients"
            + (f" ({line['failed']} failed)" if line.get("failed") else "")
            + f" | {shown}"
            + (f" | epsilon {line['dp_epsilon']:.2f} (delta {self.options.dp_delta:g})" if "dp_epsilon" in line else "")
            + (f" | {line['bytes_sent'] / 1e6:.2f} MB sent | {line['round_s']:.1f}s" if line["round"] else ""),
            flush=True,
        )

    def _checkpoint(self) -> None:
        """`checkpoints/round-NNNN/`, written atomically; the history rewritten to metrics.jsonl; older ones gone."""
        folder = self.run_dir / CHECKPOINTS / f"round-{self.round:04d}"
        state = {"round": self.round, "settings": self.settings(), "history": self.history,
                 "noise_seed": str(self.noise_seed)}  # fmt: skip
        extra = {STATE: json.dumps(state, indent=1).encode(), STRATEGY: save(strategy_state(self.strategy))}
        save_final(folder, self.model.state_dict(), self.config, self.data.info, extra=extra)
        self.write_metrics()
        for old in round_folders(self.run_dir)[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)

    def write_metrics(self) -> None:
        text = "".join(json.dumps(line) + "\n" for line in self.history)
        (self.run_dir / "metrics.jsonl").write_text(text)

    def finish(self, config: RunConfig | None = None) -> dict[str, Any]:
        """`final/` (the global model of the last round) and summary.json; returns the summary."""
        save_final(self.run_dir / "final", self.model.state_dict(), config or self.config, self.data.info)
        last = self.history[-1]
        summary = {
            "rounds": self.round,
            "clients": self.options.clients,
            "processes": self.options.clients,  # for `scaleforge runs`: a client is a process
            "steps": sum(line.get("client_steps", 0) for line in self.history),  # the clients' local steps in all
            "wall_time_s": sum(line.get("round_s", 0.0) for line in self.history),
            "strategy": self.options.strategy,
            "partition": self.options.partition,
            **{key: value for key, value in last.items() if key.startswith("val_")},
            "bytes_sent": sum(line["bytes_sent"] for line in self.history),
            "bytes_received": sum(line["bytes_received"] for line in self.history),
            "resumed_from_round": self.resumed_from,
            **(
                {
                    "dp_epsilon": last.get("dp_epsilon", 0.0),
                    "dp_delta": self.options.dp_delta,
                    "dp_noise": self.options.dp_noise,
                    "dp_clip": self.options.dp_clip,
                }
                if self.options.private
                else {}
            ),
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def secret_seed() -> int:
    """128 random bits from the operating system."""
    return secrets.randbits(128)


def round_folders(run_dir: Path) -> list[Path]:
    """The run's round checkpoints, oldest first (not a `.partial` one a killed write left)."""
    folders = (run_dir / CHECKPOINTS).glob("round-*")
    return sorted(folder for folder in folders if re.fullmatch(r"round-\d{4,}", folder.name))


def _first_sentence(reason: str) -> str:
    """The gist of a client's error: the first sentence of its last line (Ray's reasons run on for lines)."""
    lines = [line.strip() for line in reason.strip().splitlines() if line.strip()] or ["no reason given"]
    return lines[-1].split(". ")[0].rstrip(".'>")


def _weighted_loss(replies: list[Message]) -> float:
    pairs = [(float(m.content["metrics"]["train_loss"]), float(m.content["metrics"]["num-examples"])) for m in replies]
    total = sum(weight for _, weight in pairs)
    return sum(loss * weight for loss, weight in pairs) / total if total else float("nan")
