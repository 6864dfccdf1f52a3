"""`scaleforge config show`, `list`, `plot` and `runs`: looking at configs, components and runs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from scaleforge.cli.arguments import Parser, config_argument, json_argument, load_config_args

KINDS = ["models", "datasets", "optimizers", "schedulers", "losses", "metrics", "callbacks", "transforms"]


def add_parser(commands: argparse._SubParsersAction) -> None:
    """`config show`, `list`, `plot` and `runs` on `commands`."""
    config = commands.add_parser("config", help="inspect configs")
    config_commands = config.add_subparsers(dest="config_command", required=True, parser_class=Parser)
    show = config_commands.add_parser("show", help="print the resolved config as YAML")
    config_argument(show)
    show.add_argument("--explain", action="store_true", help="say where each value came from")
    show.set_defaults(handler=cmd_config_show)

    listing = commands.add_parser("list", help="list registered components")
    listing.add_argument("kind", nargs="?", choices=KINDS)
    listing.set_defaults(handler=cmd_list)

    plot = commands.add_parser(
        "plot",
        help="draw runs' loss, validation metrics, learning rate and throughput",
        description="Draw loss, validation metrics, learning rate and throughput against step and against wall "
        "time from each run's metrics.jsonl, several runs overlaid, into curves-step.png and curves-time.png.",
    )
    plot.add_argument("run_dirs", metavar="RUN_DIR", nargs="+", help="run directories, overlaid")
    plot.add_argument("--out", help="the folder for the PNGs (default: RUN_DIR/curves, or runs/curves for several)")
    plot.set_defaults(handler=cmd_plot)

    runs = commands.add_parser("runs", help="list run directories and where each stands")
    runs.add_argument("folder", metavar="DIR", nargs="?", default="runs", help="the folder of run directories")
    json_argument(runs)
    runs.set_defaults(handler=cmd_runs)


def cmd_config_show(args: argparse.Namespace) -> int:
    """Print the resolved config, or where each value came from."""
    from scaleforge.config import dump_yaml, explain_yaml

    config = load_config_args(args.config)
    sys.stdout.write(explain_yaml(config) if args.explain else dump_yaml(config))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """Print the registered components of each kind."""
    from scaleforge.registry import REGISTRIES

    kinds = [args.kind] if args.kind else list(REGISTRIES)
    for kind in kinds:
        print(f"{kind}: {', '.join(REGISTRIES[kind].names())}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    """Draw the runs' curves."""
    from scaleforge.training.curves import plot_runs

    run_dirs = [Path(path) for path in args.run_dirs]
    out = Path(args.out) if args.out else run_dirs[0] / "curves" if len(run_dirs) == 1 else Path("runs") / "curves"
    for path in plot_runs(run_dirs, out):
        print(f"wrote {path}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    """A table (or JSON) of the run directories in a folder."""
    from scaleforge.console import format_energy, print_table
    from scaleforge.training.curves import describe_runs

    rows = describe_runs(Path(args.folder))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no run directories in {args.folder}")
        return 0
    table = [
        [
            row["name"],
            str(row["model"]),
            str(row["strategy"] or "?"),
            str(row["processes"] or "?"),
            f"{row['steps']:,}",
            f"{row['best'][0].removeprefix('val_')} {row['best'][1]:.4f}" if row["best"] else "",
            f"{row['wall_time_s']:.1f}s" if row["wall_time_s"] is not None else "",
            format_energy(row["energy_j"], row["energy_source"]),
            row["status"],
        ]
        for row in rows
    ]
    columns = ["run", "model", "strategy", "processes", "steps", "best val", "wall time", "energy", "status"]
    print_table(f"runs in {args.folder}", columns, table)
    return 0
