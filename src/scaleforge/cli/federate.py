"""`scaleforge federate CONFIG --clients N --rounds R` on one machine (its options are `FederationOptions`'
fields), and across machines `scaleforge federate server ...` with `scaleforge federate client ...`."""

from __future__ import annotations

import argparse

from scaleforge.cli.arguments import Parser, config_argument, non_negative_int, positive_float, split_config_args

DESCRIPTION = (
    "Federated learning on Flower: N clients, each training its part of the data with the normal trainer, and a "
    "server aggregating their weights each round with a Flower strategy. The run directory holds the global model "
    "(final/), a line a round in metrics.jsonl and a checkpoint a round: running the command again on it continues "
    "from its last round. 'scaleforge federate server' and 'scaleforge federate client' run the server and each "
    "client as processes of their own, on any machines (Flower's deployment runtime)."
)
SUBCOMMANDS = ("server", "client")


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


def build_sub_parser(name: str) -> argparse.ArgumentParser:
    """`scaleforge federate server` or `scaleforge federate client`: parsers of their own beside `federate
    CONFIG` (which takes free arguments), as `search show` is."""
    from scaleforge.extras import require

    require("federated", f"scaleforge federate {name}")
    if name == "server":
        parser = Parser(
            prog="scaleforge federate server",
            description="Serve a federation: Flower's SuperLink on --listen, the rounds driven by this process, the "
            "run directory as 'scaleforge federate' writes it. Clients join with 'scaleforge federate client'.",
        )
        _arguments(parser)
        where = "where clients reach the server (default: 127.0.0.1:9092; 0.0.0.0:PORT for every interface)"
        parser.add_argument("--listen", default="127.0.0.1:9092", metavar="HOST:PORT", help=where)
        for flag, what in (("ca-certfile", "certificate authority"), ("certfile", "certificate"), ("keyfile", "key")):
            parser.add_argument(f"--ssl-{flag}", metavar="PEM", help=f"TLS: the server's {what} (all three, or none)")
        parser.set_defaults(handler=cmd_federate_server)
        return parser
    parser = Parser(
        prog="scaleforge federate client",
        description="Join a federation served by 'scaleforge federate server': train part I of the server's split "
        "of this config's data each round, until the server says the federation is over.",
    )
    config_argument(parser)
    parser.add_argument("--server", required=True, metavar="HOST:PORT", help="the server's --listen address")
    parser.add_argument(
        "--partition", required=True, type=non_negative_int, metavar="I", help="the part this client trains"
    )
    parser.add_argument("--root-certificates", metavar="PEM", help="TLS: the certificate authority of the server")
    parser.add_argument("--run-dir", help="where this client trains (default: runs/<config>-client<I>-<time>)")
    parser.add_argument("--max-wait", type=positive_float, default=120.0, metavar="S",
                        help="how long to try reaching the server before giving up (default: 120)")  # fmt: skip
    parser.set_defaults(handler=cmd_federate_client)
    return parser


def cmd_federate(args: argparse.Namespace) -> int:
    from scaleforge.cli.fields import settings_from
    from scaleforge.federated.options import FederationOptions
    from scaleforge.federated.simulation import federate

    path, overrides = split_config_args(args.config)
    federate(settings_from(FederationOptions, args, config=path, overrides=tuple(overrides)))
    return 0


def cmd_federate_server(args: argparse.Namespace) -> int:
    from scaleforge.cli.fields import settings_from
    from scaleforge.federated.deployment import federate_server, tls_of
    from scaleforge.federated.options import FederationOptions

    path, overrides = split_config_args(args.config)
    options = settings_from(FederationOptions, args, config=path, overrides=tuple(overrides))
    federate_server(
        options, args.listen, tls_of(args.ssl_ca_certfile, args.ssl_certfile, args.ssl_keyfile, server=True)
    )
    return 0


def cmd_federate_client(args: argparse.Namespace) -> int:
    from scaleforge.federated.deployment import federate_client, tls_of

    path, overrides = split_config_args(args.config)
    tls = tls_of(args.root_certificates, server=False)
    federate_client(path, tuple(overrides), args.server, args.partition, args.run_dir, tls, args.max_wait)
    return 0
