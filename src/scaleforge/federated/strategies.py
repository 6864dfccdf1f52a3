"""Flower's strategies as the federation uses them: built from the options, their state as tensors for the
round's checkpoint, and a sample of clients drawn from the seed and the round rather than Flower's unseeded one."""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

from scaleforge.federated.options import FederationOptions

UNIFORM = "dp-weight"  # a client's weight under differential privacy: 1, the same for all


def build_strategy(options: FederationOptions) -> Strategy:
    """The strategy `options.strategy` names; clients evaluate nothing (the server evaluates the global model)."""
    common: dict[str, Any] = {
        "fraction_train": options.fraction_fit,
        "fraction_evaluate": 0.0,
        "min_train_nodes": options.needed(),  # with clients gone, a round samples from those left
        "min_available_nodes": options.needed(),
    }
    if options.private:  # every client weighs the same: the noise is calibrated to a plain average
        common["weighted_by_key"] = UNIFORM
    if options.strategy == "fedprox":
        strategy: Strategy = FedProx(**common, proximal_mu=options.proximal_mu)
    elif options.strategy == "fedadam":
        strategy = FedAdam(**common, eta=options.server_lr)
    else:
        strategy = FedAvg(**common)
    if options.private:
        from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

        strategy = DifferentialPrivacyServerSideFixedClipping(
            strategy, noise_multiplier=options.dp_noise, clipping_norm=options.dp_clip,
            num_sampled_clients=options.sampled(),
        )  # fmt: skip
    return strategy


def privacy_spent(options: FederationOptions, rounds: int) -> float:
    """Epsilon at `options.dp_delta` after `rounds` rounds, from Opacus's RDP accountant: each round one Gaussian
    mechanism of noise multiplier z, with no amplification by sampling (sampling rate 1): which clients a round
    samples follows from the config's seed and is written to metrics.jsonl, so it is no secret to count on."""
    from opacus.accountants import RDPAccountant

    if rounds == 0:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = [(options.dp_noise, 1.0, rounds)]
    return float(accountant.get_epsilon(options.dp_delta))


def strategy_state(strategy: Strategy) -> dict[str, torch.Tensor]:
    """What the strategy carries from round to round: FedAdam's first and second moments (none for the others,
    whose rounds depend on the global model alone)."""
    state = {}
    inner = getattr(strategy, "strategy", strategy)  # a differential-privacy wrapper's
    for kind in ("m_t", "v_t"):
        for name, value in (getattr(inner, kind, None) or {}).items():
            state[f"{kind}.{name}"] = torch.from_numpy(np.array(value, copy=True))  # 0-d stays 0-d
    return state


def load_strategy_state(strategy: Strategy, state: dict[str, torch.Tensor]) -> None:
    """Give `strategy` the state `strategy_state` took."""
    for kind in ("m_t", "v_t"):
        values = {key.split(".", 1)[1]: t.numpy() for key, t in state.items() if key.startswith(f"{kind}.")}
        if values:
            setattr(strategy, kind, values)


class _InOrder:
    """A grid whose connected nodes are listed in the order of their parts, so that a seeded sample of them is the
    same clients in every run (Flower's node ids are random)."""

    def __init__(self, grid: Grid, order: list[int]) -> None:
        self._grid, self._order = grid, order

    def get_node_ids(self) -> list[int]:
        connected = set(self._grid.get_node_ids())
        return [node for node in self._order if node in connected]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def configure_round(
    strategy: Strategy, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid, seed: int,
    order: list[int],
) -> list[Message]:  # fmt: skip
    """The strategy's messages for `server_round`, to clients sampled with a generator seeded by `seed` and the
    round (Flower samples with the `random` module: its state is set for the call and given back after)."""
    saved = random.getstate()
    random.seed(seed * 1_000_003 + server_round)
    try:
        messages: Iterable[Message] = strategy.configure_train(server_round, arrays, config, _InOrder(grid, order))  # type: ignore[arg-type]
        return list(messages)
    finally:
        random.setstate(saved)
