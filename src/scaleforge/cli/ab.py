"""`scaleforge ab report URL_OR_LOG`: the A/B report of a served model's versions, from a running server
(`GET /v1/models/{name}/ab`) or from the feedback logs servers wrote (`--feedback-log`), several merged in time
order."""

from __future__ import annotations

import argparse
import contextlib
import heapq
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from scaleforge.cli.arguments import Parser, json_argument, positive_float, positive_int
from scaleforge.errors import UsageError

DESCRIPTION = (
    "The A/B report of a served model's versions: requests, outcomes, accuracy or mean reward with a 95% interval, "
    "the difference to the control with its fixed-horizon and always-valid (mSPRT) p-values, and a verdict "
    "(docs/ab-testing.md). From a server (its base URL, or the report's URL) or from its --feedback-log file."
)


def add_parser(commands: argparse._SubParsersAction) -> None:
    """`ab` and its subcommand on `commands`."""
    ab = commands.add_parser("ab", help="A/B tests of a served model's versions")
    subcommands = ab.add_subparsers(dest="ab_command", required=True, parser_class=Parser)
    report = subcommands.add_parser("report", help="the A/B report of a model's versions", description=DESCRIPTION)
    report.add_argument(
        "source",
        metavar="URL_OR_LOG",
        nargs="+",
        help="a server's URL (http://...), or one or more feedback log files (several servers' logs are merged in "
        "time order, as one server would have seen them)",
    )
    report.add_argument("--model", metavar="NAME", help="the model (default: the only one)")
    report.add_argument("--control", type=positive_int, metavar="VERSION", help="default: most requests")
    report.add_argument("--mde", type=positive_float, help="the minimum effect worth detecting (default: 0.02)")
    report.add_argument("--metric", choices=("accuracy", "reward"), help="default: the kind of outcome received")
    report.add_argument(
        "--look-every", type=positive_int, default=100, help="a log's outcomes between looks (default 100)"
    )
    report.add_argument("--api-key-env", metavar="VAR", help="send the key held by this environment variable")
    json_argument(report)
    report.set_defaults(handler=cmd_ab_report)


def cmd_ab_report(args: argparse.Namespace) -> int:
    """Print the report; exit 0."""
    urls = [source for source in args.source if source.startswith(("http://", "https://"))]
    if urls and len(args.source) > 1:
        raise UsageError(
            f"give one server's URL, or feedback logs; not {len(args.source)} sources with a URL among them"
        )
    report = _from_server(args, urls[0]) if urls else _from_logs(args)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    from scaleforge.console import print_table

    header, *rows = report["table"]
    metric = "accuracy" if report["metric"] == "accuracy" else "mean reward"
    title = f"{report['model']}: {metric}, control {report['control']}, mSPRT at alpha {report['alpha']:g}"
    print_table(f"{title}, MDE {report['mde']:g}", header, rows)
    return 0


def _from_server(args: argparse.Namespace, source: str) -> dict[str, Any]:
    url = source.rstrip("/")
    if "/v1/models/" not in url:
        model = args.model or _only_model(url, args)
        url = f"{url}/v1/models/{urllib.parse.quote(model)}/ab"
    query = {name: getattr(args, name) for name in ("mde", "control", "metric") if getattr(args, name) is not None}
    report: dict[str, Any] = _get(url + ("?" + urllib.parse.urlencode(query) if query else ""), args)
    return report


def _only_model(base: str, args: argparse.Namespace) -> str:
    names = [entry["id"] for entry in _get(f"{base}/v1/models", args)["data"]]
    if len(names) != 1:
        raise UsageError(f"{base} serves the models {names}: say which with --model")
    return str(names[0])


def _get(url: str, args: argparse.Namespace) -> Any:
    headers = {"Accept": "application/json"}
    if args.api_key_env is not None:
        key = os.environ.get(args.api_key_env, "")
        if not key:
            raise UsageError(f"--api-key-env {args.api_key_env}: that environment variable is unset or empty")
        headers["X-API-Key"] = key
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as response:  # noqa: S310 - http(s) only
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        detail = error.read().decode(errors="replace")[:300]
        raise UsageError(f"{url} answered {error.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as error:
        raise UsageError(f"{url}: cannot be reached ({getattr(error, 'reason', error)})") from None


def _from_logs(args: argparse.Namespace) -> dict[str, Any]:
    """The report of the feedback logs `args.source`, one server's each, their events merged in time order."""
    from scaleforge.serve.feedback import replay

    options = {"metric": args.metric, "control": args.control, "mde": args.mde}
    with contextlib.ExitStack() as stack:
        logs = []
        for source in args.source:
            path = Path(source)
            try:
                logs.append(_timed_lines(stack.enter_context(path.open(encoding="utf-8")), path))
            except OSError as error:
                raise UsageError(f"{path}: cannot be read as a feedback log ({error.strerror or error})") from None
        try:
            merged = (line for _, line in heapq.merge(*logs, key=lambda timed: timed[0]))
            feedback, model = replay(merged, args.model, look_every=args.look_every, **options)
        except (OSError, UnicodeDecodeError) as error:
            raise UsageError(f"{' '.join(args.source)}: cannot be read as feedback logs ({error})") from None
    report = feedback.report(model, **options)
    return {"model": model, **report.to_dict(), "table": report.table()}


def _timed_lines(lines: Iterator[str], path: Path) -> Iterator[tuple[float, str]]:
    """A log's lines with the time each event was written (a server writes them in time order), each checked."""
    from scaleforge.serve.feedback import read_event

    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            when = float(read_event(line)["time"])
        except (ValueError, KeyError, TypeError) as error:
            reason = str(error) if isinstance(error, ValueError) else type(error).__name__
            raise UsageError(f"{path}, line {number}: not an event of a feedback log ({reason})") from None
        yield when, line
