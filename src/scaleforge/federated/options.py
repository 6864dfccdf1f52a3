"""What `scaleforge federate` was asked to do (its options are these fields, `cli.fields`)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, Literal

from scaleforge.data.partition import parse_scheme
from scaleforge.errors import ConfigError, UsageError

STRATEGIES = ("fedavg", "fedprox", "fedadam")
# What a resumed federation must share with the one it continues (the number of rounds may grow).
SAME_ON_RESUME = (
    "clients",
    "partition",
    "strategy",
    "local_epochs",
    "fraction_fit",
    "min_clients",
    "proximal_mu",
    "server_lr",
)


@dataclass(frozen=True)
class FederationOptions:
    config: str | None
    overrides: tuple[str, ...]
    clients: int = field(metadata={"help": "clients of the federation, each a part of the data", "range": "positive"})
    rounds: int = field(metadata={"help": "rounds of training, each ending with the global model", "range": "positive"})
    fraction_fit: float = field(
        default=1.0, metadata={"help": "share of the clients that train in a round", "range": "fraction"}
    )
    min_clients: int | None = field(
        default=None,
        metadata={
            "help": "replies a round needs to count (default: every client sampled); fewer lets a round go on "
            "without clients that failed",
            "range": "positive",
        },
    )
    partition: str = field(
        default="iid",
        metadata={"help": "how the training split is cut among the clients", "metavar": "iid|dirichlet:A|by-class:K"},
    )
    strategy: Literal["fedavg", "fedprox", "fedadam"] = field(
        default="fedavg", metadata={"help": "how the server aggregates the clients' weights (Flower's strategies)"}
    )
    local_epochs: int = field(
        default=1, metadata={"help": "epochs each client trains on its part in a round", "range": "positive"}
    )
    proximal_mu: float = field(
        default=0.01, metadata={"help": "fedprox: the proximal term's weight mu", "range": "non-negative"}
    )
    server_lr: float = field(
        default=0.01, metadata={"help": "fedadam: the server's learning rate (eta)", "range": "positive"}
    )
    dp_noise: float | None = field(
        default=None,
        metadata={
            "help": "differential privacy: the noise multiplier z (Gaussian noise of z * clip / clients sampled on "
            "the average of the clipped updates); with --dp-clip",
            "range": "positive",
            "metavar": "Z",
        },
    )
    dp_clip: float | None = field(
        default=None,
        metadata={"help": "differential privacy: the norm each client's update is clipped to", "range": "positive",
                  "metavar": "C"},
    )  # fmt: skip
    dp_delta: float = field(
        default=1e-5, metadata={"help": "differential privacy: the delta epsilon is reported at", "range": "fraction"}
    )
    round_timeout_s: float = field(
        default=600.0,
        metadata={"help": "how long a round waits for replies", "range": "positive", "flag": "--round-timeout"},
    )
    run_dir: str | None = field(
        default=None, metadata={"help": "the run directory (default: runs/<config>-federated-<time>); rerun to resume"}
    )

    def __post_init__(self) -> None:
        try:
            parse_scheme(self.partition)
        except ConfigError as error:
            raise UsageError(f"--partition: {str(error).split(': ', 1)[1]}") from error
        if self.min_clients is not None and self.min_clients > self.clients:
            raise UsageError(f"--min-clients {self.min_clients} is more than the {self.clients} clients")
        if self.sampled() < 1:
            raise UsageError(f"--fraction-fit {self.fraction_fit} of {self.clients} clients samples none")
        if (self.dp_noise is None) != (self.dp_clip is None):
            raise UsageError("differential privacy needs --dp-noise and --dp-clip together")
        if self.private and importlib.util.find_spec("opacus") is None:
            raise UsageError("--dp-noise needs Opacus (its privacy accountant): pip install 'scaleforge[federated]'")
        if self.private and self.strategy == "fedadam":
            raise UsageError(
                "--dp-noise: the noise is calibrated to an average of clipped updates, which fedadam's server step "
                "is not; use fedavg or fedprox"
            )
        if self.private and self.min_clients is not None and self.min_clients < self.sampled():
            raise UsageError(
                f"--min-clients {self.min_clients}: with differential privacy every client sampled ({self.sampled()}) "
                f"must reply, as the noise is calibrated to their number"
            )

    @property
    def private(self) -> bool:
        """Whether updates are clipped and noised (differential privacy)."""
        return self.dp_noise is not None

    def sampled(self) -> int:
        """The clients sampled each round: Flower's rule, the fraction rounded down, at least `min_clients`."""
        return max(int(self.clients * self.fraction_fit), self.min_clients or 0)

    def needed(self) -> int:
        """The replies a round needs."""
        return self.min_clients if self.min_clients is not None else self.sampled()

    def settings(self) -> dict[str, Any]:
        """What a checkpoint records of these options, to check a resumed federation against."""
        return {name: getattr(self, name) for name in ("rounds", *SAME_ON_RESUME)}
