"""`scaleforge federate CONFIG --clients N --rounds R` (its options are `FederationOptions`' fields)."""

from __future__ import annotations

import argparse

from scaleforge.cli.arguments import Parser, config_argument, split_config_args

DESCRIPTION = (
    "Federated learning on Flower: N clients, each training its part of the data with the normal trainer, and a "
    "server aggregating their weights each round with a Flower strategy. The run directory holds the global model "
    "(final/), a line a round in metrics.jsonl and a checkpoint a round: running the command again on it continues "
    "from its last round."
)


def add_parser(commands: argparse._SubParsersAction) -> None:
    commands.add_parser(
        "federate",
        help="federated learning on Flower: clients train their parts of the data, a server aggregates",
        description=DESCRIPTION,
        populate=_arguments,
    ).set_defaults(handler=cmd_federate)


def _arguments(parser: Parser) -> None:
    from scaleforge.extras import require

    require("federated", "scaleforge federate")
    from scaleforge.cli.fields import add_fields
    from scaleforge.federated.options import FederationOptions

    config_argument(parser)
    add_fields(parser, FederationOptions, exclude=("config", "overrides"))


def cmd_federate(args: argparse.Namespace) -> int:
    from scaleforge.cli.fields import settings_from
    from scaleforge.federated.options import FederationOptions
    from scaleforge.federated.simulation import federate

    path, overrides = split_config_args(args.config)
    federate(settings_from(FederationOptions, args, config=path, overrides=tuple(overrides)))
    return 0
