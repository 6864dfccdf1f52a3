"""Federated learning on Flower: `scaleforge federate` (docs/federated.md).

The server's loop (`server.Federation`) owns the rounds, so that each round's sample of clients, its aggregation
and the strategy's state are checkpointed and a killed federation resumes from its last round; Flower supplies the
transport (its simulation runtime on Ray for clients on one machine), the messages and the strategies that
aggregate (FedAvg, FedProx, FedAdam). Each client (`client.client_app`) trains its part of the data
(`data.partition`) with the normal trainer, starting from the global model, and replies with its weights.
"""

from __future__ import annotations

import logging
import os

# Set before Flower or Ray is imported: no usage reports, no update checks, and Ray's log deduplication off so a
# client's error reaches the log whole.
QUIET_ENVIRONMENT = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


def quiet_flower() -> None:
    """Telemetry off (in this process and those it starts) and Flower's per-message INFO lines out of the log."""
    os.environ.update(QUIET_ENVIRONMENT)
    logging.getLogger("flwr").setLevel(logging.ERROR)
