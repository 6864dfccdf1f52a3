"""The `scaleforge` command: the parser of every command group, and how errors become exit codes.

User errors print one line on stderr and exit with code 2; unexpected failures exit 1 with a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Sequence
from typing import NoReturn

from scaleforge.cli import ab, bench, compress, data, federate, generate, inspect, search, serve, stream, train
from scaleforge.cli.arguments import Parser
from scaleforge.errors import AgreedError, ScaleforgeError, ScaleforgeWarning
from scaleforge.training.signals import Interrupted

# in the order `--help` lists them
COMMAND_GROUPS = (train, data, compress, generate, inspect, serve, ab, stream, search, federate, bench)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line."""
    from scaleforge import __version__

    parser = Parser(prog="scaleforge", description="Train, evaluate and benchmark models from one YAML config.")
    parser.add_argument("--version", action="version", version=f"scaleforge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for group in COMMAND_GROUPS:
        group.add_parser(commands)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """argparse, with `KEY=VALUE` overrides accepted anywhere on the line (`train cfg.yaml --nproc 2 seed=1`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["search", "show"]:
        return search.build_show_parser().parse_args(argv[2:])
    if argv[:1] == ["federate"] and argv[1:2] and argv[1] in federate.SUBCOMMANDS:
        parser = federate.build_sub_parser(argv[1])
        argv = argv[2:]
    args, extra = parser.parse_known_args(argv)
    overrides = [item for item in extra if "=" in item and not item.startswith("-")]
    unknown = [item for item in extra if item not in overrides]
    if unknown or (overrides and not hasattr(args, "config")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    if overrides:
        args.config = [*args.config, *overrides]
    return args


def _format_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001 - warnings' hook
    if issubclass(category, ScaleforgeWarning):
        return f"warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


_python_format_warning = warnings.formatwarning


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    warnings.formatwarning = _format_warning
    try:
        args = parse_args(build_parser(), argv)
        return args.handler(args)
    except ScaleforgeError as error:
        return _user_error(error)
    except Interrupted as stop:
        if _is_main_process():
            print(stop, file=sys.stderr)
        return stop.exit_code
    except Exception as error:
        code = _peer_failure(error)
        if code is None:
            raise
        return code
    except KeyboardInterrupt:  # under the launcher, the launcher says it
        from scaleforge.distributed.launch import is_launched_worker

        if _is_main_process() and not is_launched_worker():
            print("interrupted", file=sys.stderr)
        return 130


def _user_error(error: ScaleforgeError) -> int:
    """Say a user error once and return its exit code. Workers leave their errors for the launcher, which prints
    one. Under torchrun, which reports failed workers its own way, rank 0 also says its error."""
    from scaleforge.distributed.env import record_error
    from scaleforge.distributed.launch import is_launched_worker

    if _is_main_process() and not is_launched_worker():
        print(error.one_line(), file=sys.stderr)
    rank = int(os.environ.get("RANK", 0))
    if "RANK" in os.environ:  # an error other processes did not share names its rank
        shared = rank == 0 or isinstance(error, AgreedError)
        record_error(error.one_line() if shared else f"rank {rank}: {error.one_line()}")
    return error.exit_code


def _peer_failure(error: Exception) -> int | None:
    """The exit code of a failure caused by another process of the job (a hung or lost peer); None for any other
    failure, which is the process's own."""
    from scaleforge.distributed.env import PEER_FAILED_EXIT, PEER_FAILED_GRACE_S, PeerHung, lost_peer, record_error
    from scaleforge.distributed.launch import is_launched_worker, restarts_left
    from scaleforge.distributed.peer_watch import BEAT_S, ENDPOINT_VAR, SILENT_AFTER_S

    if isinstance(error, PeerHung):
        # the launcher says it when the job fails; a worker about to be restarted says why itself
        if not is_launched_worker() or restarts_left():
            print(error, file=sys.stderr)
        record_error(str(error))
        return error.exit_code
    if is_launched_worker() and lost_peer(error):  # the launcher reports the peer's failure instead
        # across nodes, long enough for the peer watch to name a peer that went (it ends the process then)
        watched = os.environ.get(ENDPOINT_VAR) is not None
        time.sleep(PEER_FAILED_GRACE_S + (SILENT_AFTER_S + 2 * BEAT_S if watched else 0))
        return PEER_FAILED_EXIT
    return None


def run() -> NoReturn:
    """The `scaleforge` command as a process: `main`, then exit without the final garbage collection of every
    object torch has made, which takes about 1 s of each process's exit (`python -c "import torch._dynamo"`:
    4.4 s, 3.5 s with `gc.freeze()` at its end). Open files and threads are closed by then; only the collection
    of unreachable cycles is skipped, as the process ends anyway."""
    import gc

    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    gc.freeze()
    sys.exit(code)


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", 0)) == 0
