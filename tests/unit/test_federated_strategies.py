"""Flower's strategies as a federation uses them: differential privacy's clipping, noise and accounted epsilon."""

from __future__ import annotations

import numpy as np
import pytest


def test_differential_privacy_clips_each_update_adds_noise_of_z_c_over_m_and_reports_epsilon() -> None:
    pytest.importorskip("flwr")
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from scaleforge.federated.options import FederationOptions
    from scaleforge.federated.strategies import build_strategy, configure_round, privacy_spent

    class Nodes:  # the one thing sampling asks of a grid
        def get_node_ids(self) -> list[int]:
            return [11, 12, 13, 14]

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1  # as a server's task sets them
    options = FederationOptions(None, (), clients=4, rounds=10, dp_noise=1.0, dp_clip=0.5)
    strategy = build_strategy(options)
    start = ArrayRecord({"w": Array(np.zeros(10_000, dtype=np.float32))})
    messages = configure_round(strategy, 1, start, ConfigRecord(), Nodes(), seed=0, order=[11, 12, 13, 14])  # type: ignore[arg-type]
    assert sorted(m.metadata.dst_node_id for m in messages) == [11, 12, 13, 14]
    replies = [
        Message(RecordDict({"arrays": ArrayRecord({"w": Array(np.full(10_000, 10.0 * (i + 1), np.float32))}),
                            "metrics": MetricRecord({"num-examples": 100 * (i + 1), "dp-weight": 1})}), reply_to=m)
        for i, m in enumerate(messages)
    ]  # fmt: skip
    np.random.seed(0)
    aggregated, _ = strategy.aggregate_train(1, replies)
    w = aggregated["w"].numpy()
    clipped = 0.5 / np.sqrt(10_000)  # every update clipped to norm 0.5, then averaged alike (not by samples)
    assert abs(w.mean() - clipped) < 4 * 0.125 / np.sqrt(10_000)
    assert w.std() == pytest.approx(1.0 * 0.5 / 4, rel=0.05)  # noise of z * C / m
    # epsilon from the RDP accountant: below the classical RDP-to-(epsilon, delta) bound of T Gaussian releases,
    # min over alpha of T * alpha / (2 z^2) + log(1 / delta) / (alpha - 1) (20.17 for T=10, z=1, delta=1e-5)
    epsilon = privacy_spent(options, 10)
    assert 15 < epsilon < 20.17
    assert privacy_spent(options, 5) < epsilon  # it grows with the rounds
    sampled_half = FederationOptions(None, (), clients=4, rounds=10, fraction_fit=0.5, dp_noise=1.0, dp_clip=0.5)
    assert privacy_spent(sampled_half, 10) == epsilon  # no amplification: the sample follows from a public seed
