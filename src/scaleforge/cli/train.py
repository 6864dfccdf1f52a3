"""`scaleforge train`, `distill`, `eval` and `continual report`."""

from __future__ import annotations

import argparse

from scaleforge.cli.arguments import (
    Parser,
    config_argument,
    json_argument,
    load_config_args,
    run_dir_arguments,
    split_config_args,
    trust_arguments,
)


def add_parser(commands: argparse._SubParsersAction) -> None:
    """`train`, `distill` and `eval` on `commands`."""
    train = commands.add_parser(
        "train", help="train a model", description="Train the model a config describes.", populate=_train_arguments
    )
    train.set_defaults(handler=cmd_train)
    commands.add_parser(
        "distill",
        help="train a student on a trained teacher's softened outputs",
        description="Train the student a config describes on TEACHER_RUN's softened outputs and the labels (the "
        "distillation loss: training.loss.temperature and training.loss.soft_weight set the mix), with every "
        "option of `train`.",
        populate=_distill_arguments,
    ).set_defaults(handler=cmd_distill)
    evaluate = commands.add_parser(
        "eval",
        help="evaluate a trained run on its validation split, or on other data",
        description="Print a trained run's validation metrics: on the data it was trained on, or with --data and "
        "data.KEY=VALUE overrides on other data of the same shape (another task of a class-incremental sequence, "
        "say: data.classes=[0,1,2,3,4]).",
    )
    run_dir_arguments(evaluate)
    evaluate.add_argument(
        "overrides", nargs="*", metavar="data.KEY=VALUE", help="changes to the data section evaluated on"
    )
    evaluate.add_argument("--data", metavar="CONFIG.yaml", help="a config whose data section stands in for the run's")
    evaluate.set_defaults(handler=cmd_eval)
    continual = commands.add_parser("continual", help="tasks learned one after another: what was kept")
    actions = continual.add_subparsers(dest="continual_command", required=True, parser_class=Parser)
    report = actions.add_parser(
        "report",
        help="the accuracy of each run of a task sequence on every task, average accuracy and forgetting",
        description="Evaluate each run of a sequence (RUN_1 trained on task 1, RUN_2 from RUN_1 on task 2, ...) on "
        "the validation data of every task (each run's own data section): the accuracy matrix, the average "
        "accuracy over the tasks seen so far, and how much of each task the last run forgot.",
    )
    report.add_argument("runs", nargs="+", metavar="RUN_DIR", help="the runs, in the order the tasks were learned")
    trust_arguments(report)
    json_argument(report)
    report.set_defaults(handler=cmd_continual_report)


def _train_arguments(parser: Parser) -> None:
    """The config, run directory, resume and process options of `train` (and `distill`)."""
    from scaleforge.cli.fields import add_fields
    from scaleforge.distributed.launch import LaunchOptions

    config_argument(parser)
    parser.add_argument("--run-dir", help="where results go (default: runs/<name>-<time>)")
    parser.add_argument(
        "--resume",
        default="auto",
        metavar="auto|never|PATH",
        help="auto (default): continue from the newest good checkpoint in --run-dir, if any; never: start afresh; "
        "PATH: start from that checkpoint folder",
    )
    add_fields(parser.add_argument_group("processes (as torchrun's flags)"), LaunchOptions)


def _distill_arguments(parser: Parser) -> None:
    parser.add_argument("teacher", metavar="TEACHER_RUN")
    _train_arguments(parser)
    parser.add_argument(
        "--trust-code", action="store_true", help="build the teacher even if its run's config names code (imports:)"
    )


def cmd_train(args: argparse.Namespace) -> int:
    """Train through `scaleforge.api.fit`, under the launcher when more than one process is asked for."""
    from scaleforge.api import WorkersFailed, fit
    from scaleforge.cli.fields import settings_from
    from scaleforge.console import format_energy
    from scaleforge.distributed.env import DistEnv
    from scaleforge.distributed.launch import LaunchOptions
    from scaleforge.processes import guard_from_environment

    guard_from_environment()  # first: a worker whose launcher died while it started writes nothing
    options = settings_from(LaunchOptions, args)
    path, overrides = split_config_args(args.config)
    try:
        run = fit(path, overrides, args.run_dir, resume=args.resume, launch=options)
    except WorkersFailed as failure:  # the launcher has said why
        return failure.exit_code
    if not options.needs_launcher and DistEnv.from_environ().is_main:
        metrics = " | ".join(f"{k} {v:.4f}" for k, v in run.summary.items() if k.startswith("val_"))
        energy = format_energy(run.summary.get("energy_j"), run.summary.get("energy_source"))
        print(f"done: {run.summary['steps']} steps in {run.summary['wall_time_s']:.1f}s, {energy} | {metrics}")
        print(f"results: {run.run_dir}/ ({', '.join(sorted(p.name for p in run.run_dir.iterdir()))})")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    """`scaleforge train` with the distillation loss and its teacher set: the student trains as any run does."""
    from scaleforge.runs import verify_final

    teacher = str(verify_final(args.teacher).parent.resolve())  # absolute: the launcher's workers read it too
    path, overrides = split_config_args(args.config)
    chosen = load_config_args([path] if path else [])
    # the loss goes in before the user's overrides, so that `training.loss.temperature=2` and the like apply to it
    if chosen.training.loss.name == "distillation":
        loss = f"training.loss.teacher={teacher}"
    else:
        loss = f"training.loss={{name: distillation, teacher: '{teacher}'}}"
    trusted = ["training.loss.trust_teacher_code=true"] if args.trust_code else []
    args.config = [*([path] if path else []), loss, *trusted, *overrides]
    return cmd_train(args)


def cmd_eval(args: argparse.Namespace) -> int:
    """Print a trained run's validation metrics."""
    from scaleforge.api import evaluate

    results = evaluate(
        args.run_dir,
        trust_code=args.trust_code,
        signing_key_env=args.signing_key_env,
        data=args.data,
        overrides=args.overrides,
    )
    for name, value in results.items():
        print(f"{name}: {value:.4f}")
    return 0


def cmd_continual_report(args: argparse.Namespace) -> int:
    """The accuracy matrix of a task sequence, with average accuracy and forgetting."""
    import json

    from scaleforge.cli.arguments import trust
    from scaleforge.console import print_table
    from scaleforge.evaluation import continual_report

    result = continual_report(args.runs, trust(args))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    tasks = len(result["runs"])
    columns = ["after task", "run", *[f"task {j + 1}" for j in range(tasks)], "average (seen)"]
    table = [
        [str(i + 1), run, *[f"{value:.4f}" for value in row], f"{average:.4f}"]
        for i, (run, row, average) in enumerate(
            zip(result["runs"], result["accuracy"], result["average_accuracy"], strict=True)
        )
    ]
    forgetting = ", ".join(f"task {j + 1} {value:+.4f}" for j, value in enumerate(result["forgetting"]))
    notes = [f"forgetting after the last task (best earlier accuracy - last): {forgetting or 'none (one task)'}"]
    notes.append(f"average forgetting: {result['average_forgetting']:.4f}" if result["forgetting"] else "")
    print_table("Accuracy on each task's validation split", columns, table)
    for note in filter(None, notes):
        print(note)
    return 0
