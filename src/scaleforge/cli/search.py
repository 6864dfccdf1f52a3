"""`scaleforge search` (its options are `SearchOptions`' fields) and `scaleforge search show`."""

from __future__ import annotations

import argparse
from pathlib import Path

from scaleforge.cli.arguments import Parser, config_argument, non_negative_int, split_config_args
from scaleforge.errors import UsageError

DESCRIPTION = (
    "Sample configs from a search space (dotted config keys mapped to distributions), train each as a normal run "
    "under the study's folder, prune hopeless trials, and report the best trial or, for several objectives, the Pareto "
    "front. Running the same command again continues the study. 'scaleforge search show STUDY' prints what a study "
    "found and writes its best config."
)


def add_parser(commands: argparse._SubParsersAction) -> None:
    """`search` on `commands`; `search show` is a parser of its own (`build_show_parser`)."""
    commands.add_parser(
        "search",
        help="search architectures and hyperparameters with Optuna; 'search show STUDY' reports one",
        description=DESCRIPTION,
        populate=_search_arguments,
    ).set_defaults(handler=cmd_search)


def _search_arguments(parser: Parser) -> None:
    from scaleforge.extras import require

    require("search", "scaleforge search")  # SearchOptions' module is the search's, which imports Optuna
    from scaleforge.cli.fields import add_fields
    from scaleforge.search.runner import SearchOptions

    config_argument(parser)
    add_fields(parser, SearchOptions, exclude=("config", "overrides", "objectives"))
    parser.add_argument(
        "--objective",
        action="append",
        metavar="NAME[,NAME...]",
        help="what to optimise, repeatable: val_loss (default), val_accuracy, val_<metric>:max|min, or a cost: "
        "params, latency_ms (batch 1), int8_size_kib (after dynamic-int8); several give a Pareto front",
    )


def build_show_parser() -> argparse.ArgumentParser:
    """`scaleforge search show STUDY`: a command of its own beside `search CONFIG` (which takes free arguments)."""
    parser = Parser(
        prog="scaleforge search show",
        description="Print a study's trials, its best trial or Pareto front and parameter importances, draw its "
        "plot, and write the best trial's config as a YAML file for 'scaleforge train'.",
    )
    parser.add_argument("study", metavar="STUDY", help="the study's folder, or its name under runs/search/")
    parser.add_argument("--storage", metavar="URL", help="read the study from this storage instead of its folder")
    parser.add_argument("--study-name", metavar="NAME", help="with --storage: which study (default: the only one)")
    parser.add_argument(
        "--trial",
        type=non_negative_int,
        help="write this trial's config (default: the best, or the Pareto front's best on the first objective)",
    )
    parser.add_argument("--out", help="where the config goes (default: STUDY/best.yaml)")
    parser.set_defaults(handler=cmd_search_show)
    return parser


def cmd_search(args: argparse.Namespace) -> int:
    """Run (or continue) a study."""
    from scaleforge.cli.fields import settings_from
    from scaleforge.search.objectives import parse_objective
    from scaleforge.search.runner import SearchOptions, run_search

    path, overrides = split_config_args(args.config)
    objectives = [parse_objective(part) for item in args.objective or ["val_loss"] for part in item.split(",")]
    options = settings_from(SearchOptions, args, config=path, overrides=tuple(overrides), objectives=tuple(objectives))
    run_search(options)
    return 0


def cmd_search_show(args: argparse.Namespace) -> int:
    """Report a study and write its best config."""
    from scaleforge.extras import require

    require("search", "scaleforge search show")
    from scaleforge.search.report import show
    from scaleforge.search.study import default_folder, load_existing, open_storage, read_study_file

    folder = Path(args.study)
    if not folder.is_dir() and default_folder(args.study).is_dir():
        folder = default_folder(args.study)
    if args.storage:
        name, url = args.study_name, args.storage
    elif folder.is_dir():
        name, url = read_study_file(folder)
    else:
        raise UsageError(
            f"{args.study}: no such study folder (nor {default_folder(args.study)}); or give --storage URL"
        )
    study = load_existing(name, open_storage(url, create=False), url)
    show(study, folder if folder.is_dir() else Path("."), trial=args.trial, out=Path(args.out) if args.out else None)
    return 0
