"""The `scaleforge` command: argument parsing only; each command calls one function elsewhere.

User errors print one line on stderr and exit with code 2; unexpected failures exit 1 with a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn, TypeVar

from scaleforge.errors import AgreedError, ScaleforgeError, ScaleforgeWarning, UsageError
from scaleforge.training.signals import Interrupted


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (`usage error: ...`) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _split_config_args(items: Sequence[str]) -> tuple[str | None, list[str]]:
    """`[CONFIG] [KEY=VALUE ...]`: the first item is the config file if it names a file or ends in .yaml/.yml."""
    first = items[0] if items else ""
    if first and "=" not in first and (first.endswith((".yaml", ".yml")) or Path(first).exists()):
        return first, list(items[1:])
    return None, list(items)


def _load(items: Sequence[str]):  # noqa: ANN202 - RunConfig, imported lazily to keep --help fast
    from scaleforge.config import load_config

    path, overrides = _split_config_args(items)
    return load_config(path, overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from scaleforge.api import WorkersFailed, fit
    from scaleforge.distributed.env import DistEnv
    from scaleforge.distributed.launch import LaunchOptions
    from scaleforge.processes import guard_from_environment

    guard_from_environment()  # first: a worker whose launcher died while it started writes nothing
    options = LaunchOptions(
        nproc=args.nproc,
        nnodes=args.nnodes,
        node_rank=args.node_rank,
        rdzv_endpoint=args.rdzv_endpoint,
        rdzv_id=args.rdzv_id,
        max_restarts=args.max_restarts,
    )
    path, overrides = _split_config_args(args.config)
    try:
        run = fit(path, overrides, args.run_dir, resume=args.resume, launch=options)
    except WorkersFailed as failure:  # the launcher has said why
        return failure.exit_code
    if not options.needs_launcher and DistEnv.from_environ().is_main:
        metrics = " | ".join(f"{k} {v:.4f}" for k, v in run.summary.items() if k.startswith("val_"))
        print(f"done: {run.summary['steps']} steps in {run.summary['wall_time_s']:.1f}s | {metrics}")
        print(f"results: {run.run_dir}/ ({', '.join(sorted(p.name for p in run.run_dir.iterdir()))})")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    """`scaleforge train` with the distillation loss and its teacher set: the student trains as any run does."""
    from scaleforge.runs import verify_final

    teacher = str(verify_final(args.teacher).parent.resolve())  # absolute: the launcher's workers read it too
    path, overrides = _split_config_args(args.config)
    chosen = _load([path] if path else [])
    # the loss goes in before the user's overrides, so that `training.loss.temperature=2` and the like apply to it
    if chosen.training.loss.name == "distillation":
        loss = f"training.loss.teacher={teacher}"
    else:
        loss = f"training.loss={{name: distillation, teacher: '{teacher}'}}"
    trusted = ["training.loss.trust_teacher_code=true"] if args.trust_code else []
    args.config = [*([path] if path else []), loss, *trusted, *overrides]
    return cmd_train(args)


def cmd_eval(args: argparse.Namespace) -> int:
    from scaleforge.evaluation import evaluate_run

    results = evaluate_run(args.run_dir, _trust(args))
    for name, value in results.items():
        print(f"{name}: {value:.4f}")
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from scaleforge.compress.convert import CompressOptions, compress_run, print_report

    if args.method != "prune" and (args.sparsity is not None or args.structured):
        raise UsageError("--sparsity and --structured apply to --method prune only")
    if args.method not in ("prune", "qat") and args.finetune_epochs:
        raise UsageError("--finetune-epochs applies to --method prune and qat only")
    if args.method != "static-int8" and args.calibration_batches is not None:
        raise UsageError("--calibration-batches applies to --method static-int8 only")
    if args.nproc > 1 and not (args.method == "qat" or args.finetune_epochs):
        raise UsageError("--nproc applies to the training of --method qat, or of prune with --finetune-epochs")
    options = CompressOptions(
        method=args.method,
        sparsity=0.5 if args.sparsity is None else args.sparsity,
        structured=args.structured,
        finetune_epochs=args.finetune_epochs,
        calibration_batches=8 if args.calibration_batches is None else args.calibration_batches,
        nproc=args.nproc,
    )
    report = compress_run(args.run_dir, options, args.out, _trust(args))
    print_report(report)
    print(f"results: {report['run_dir']}/final/ (compression.json holds these figures)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from scaleforge.export.formats import export_run

    result = export_run(
        args.run_dir, args.format, dynamic_batch=args.dynamic_batch, opset=args.opset, out=args.out, trust=_trust(args)
    )
    for check in result["checks"]:
        print(
            f"checked on {check['rows']} validation rows: max |difference| {check['max_abs_diff']:.2e}, "
            f"top-1 agreement {check['top1_agreement']:.1%}"
        )
    kind = "int8" if result["int8"] else "float"
    print(f"exported ({kind}, {result['format']}): {result['file']} ({result['bytes'] / 1024:,.1f} KiB)")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from scaleforge.training.curves import plot_runs

    run_dirs = [Path(path) for path in args.run_dirs]
    out = Path(args.out) if args.out else run_dirs[0] / "curves" if len(run_dirs) == 1 else Path("runs") / "curves"
    for path in plot_runs(run_dirs, out):
        print(f"wrote {path}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from scaleforge.console import print_table
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
            row["status"],
        ]
        for row in rows
    ]
    columns = ["run", "model", "strategy", "processes", "steps", "best val", "wall time", "status"]
    print_table(f"runs in {args.folder}", columns, table)
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    from scaleforge.config import dump_yaml, explain_yaml

    config = _load(args.config)
    sys.stdout.write(explain_yaml(config) if args.explain else dump_yaml(config))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from scaleforge.registry import REGISTRIES

    kinds = [args.kind] if args.kind else list(REGISTRIES)
    for kind in kinds:
        print(f"{kind}: {', '.join(REGISTRIES[kind].names())}")
    return 0


def cmd_bench_overhead(args: argparse.Namespace) -> int:
    from scaleforge.bench.overhead import run_overhead_benchmark

    run_overhead_benchmark(
        steps=args.steps, repeats=args.repeats, lightning=not args.no_lightning, as_json=args.json, threads=args.threads
    )
    return 0


def cmd_bench_scaling(args: argparse.Namespace) -> int:
    from scaleforge.bench.scaling import run_scaling_benchmark

    config_path, overrides = _split_config_args(args.config)
    run_scaling_benchmark(
        config_path,
        overrides,
        process_counts=args.nproc,
        mode=args.mode,
        strategy=args.strategy,
        steps=args.steps,
        out=Path(args.out),
        as_json=args.json,
    )
    return 0


def cmd_bench_memory(args: argparse.Namespace) -> int:
    from scaleforge.bench.memory import run_memory_benchmark

    config_path, overrides = _split_config_args(args.config)
    run_memory_benchmark(
        config_path,
        overrides,
        nproc=args.nproc,
        strategies=args.strategies,
        steps=args.steps,
        out=Path(args.out),
        as_json=args.json,
    )
    return 0


def cmd_bench_checkpoint(args: argparse.Namespace) -> int:
    from scaleforge.bench.checkpoint import run_checkpoint_benchmark

    config_path, overrides = _split_config_args(args.config)
    run_checkpoint_benchmark(config_path, overrides, repeats=args.repeats, out=Path(args.out), as_json=args.json)
    return 0


def cmd_bench_stream(args: argparse.Namespace) -> int:
    from scaleforge.bench.stream import run_stream_benchmark

    if args.batch_sizes != sorted(set(args.batch_sizes)):
        raise UsageError("--batch-sizes: give increasing sizes without repeats, such as 1,4,16")
    match = re.fullmatch(r"(\d+)x(\d+)", args.frame_size)
    if match is None or min(int(match[1]), int(match[2])) < 1:
        raise UsageError(f"--frame-size: expected WxH in pixels, such as 64x64, got '{args.frame_size}'")
    run_stream_benchmark(
        args.run_dir,
        out=Path(args.out),
        batch_sizes=args.batch_sizes,
        seconds=args.seconds,
        frame_size=(int(match[1]), int(match[2])),
        threads=args.threads,
        as_json=args.json,
        trust=_trust(args),
    )
    return 0


def cmd_bench_compress(args: argparse.Namespace) -> int:
    from scaleforge.bench.compress import run_compress_benchmark

    run_compress_benchmark(
        args.run_dir, out=Path(args.out), finetune_epochs=args.finetune_epochs, as_json=args.json, trust=_trust(args)
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from scaleforge.serve.app import ServeSettings
    from scaleforge.serve.server import serve

    api_key = None
    if args.api_key_env is not None:
        api_key = os.environ.get(args.api_key_env, "")
        if not api_key:
            raise UsageError(f"--api-key-env {args.api_key_env}: that environment variable is unset or empty")
    # every option but --api-key-env has its setting's name
    options = {
        field.name: getattr(args, field.name) for field in dataclasses.fields(ServeSettings) if field.name != "api_key"
    }
    if options["model_process"] == "auto":
        options["model_process"] = None
    settings = ServeSettings(**options, api_key=api_key)
    return 0 if serve(args.run_dir, settings) else 1


def cmd_stream(args: argparse.Namespace) -> int:
    from scaleforge.console import print_table
    from scaleforge.stream.pipeline import StreamOptions, print_summary, run_stream

    options = StreamOptions(
        source=args.source,
        fps=args.fps,
        max_batch_size=args.max_batch_size,
        max_delay_ms=args.max_delay_ms,
        queue=args.queue,
        policy=args.policy,
        sink=args.sink,
        cache_size=args.cache_size,
        duration_s=args.duration,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        device=args.device,
        threads=args.threads,
        progress=args.progress,
    )
    folder = Path(args.summary_json or ".").parent
    if not folder.is_dir():
        raise UsageError(f"--summary-json {args.summary_json}: the folder {folder} does not exist")
    summary = run_stream(args.run_dir, options, _trust(args))
    print_summary(summary, print_table)
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from scaleforge.search.objectives import parse_objective
    from scaleforge.search.runner import SearchOptions, run_search

    path, overrides = _split_config_args(args.config)
    objectives = [parse_objective(part) for item in args.objective or ["val_loss"] for part in item.split(",")]
    options = SearchOptions(
        config=path,
        overrides=tuple(overrides),
        space=Path(args.space),
        objectives=tuple(objectives),
        trials=args.trials,
        jobs=args.jobs,
        nproc=args.nproc,
        study=args.study,
        storage=args.storage,
        folder=Path(args.dir) if args.dir else None,
        timeout_s=args.timeout,
        sampler=args.sampler,
        pruner=args.pruner,
        pruner_startup=args.pruner_startup,
        seed=args.seed,
    )
    run_search(options)
    return 0


def cmd_search_show(args: argparse.Namespace) -> int:
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


def _float_above(minimum: float, inclusive: bool, kind: str) -> Callable[[str], float]:
    """An argparse type: a finite number above `minimum` (or equal to it when `inclusive`)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind} number, got '{text}'") from None
        if not (value >= minimum if inclusive else value > minimum) or value == float("inf"):
            raise argparse.ArgumentTypeError(f"expected a {kind} number, got {text}")
        return value

    return parse


_positive_float = _float_above(0.0, False, "positive")


def _port(text: str) -> int:
    """An argparse type: a TCP port, 0 to 65535."""
    value = _non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535, got {text}")
    return value


def _fraction(text: str) -> float:
    """An argparse type: a number strictly between 0 and 1."""
    value = _positive_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {text}")
    return value


_non_negative_float = _float_above(0.0, True, "non-negative")


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from scaleforge.bench.serve import run_serve_benchmark

    if args.concurrency != sorted(set(args.concurrency)):
        raise UsageError("--concurrency: give increasing levels without repeats, such as 1,8,32")
    run_serve_benchmark(
        args.run_dir,
        concurrency=args.concurrency,
        requests=args.requests,
        seconds=args.seconds,
        max_batch_size=args.max_batch_size,
        max_delay_ms=args.max_delay_ms,
        overload=args.overload,
        repeats=args.repeats,
        beside_large=args.beside_large,
        litserve=not args.no_litserve,
        out=Path(args.out),
        as_json=args.json,
        trust=_trust(args),
    )
    return 0


def _int_at_least(minimum: int, kind: str) -> Callable[[str], int]:
    """An argparse type: an integer of at least `minimum`, described as `kind` in errors."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind} integer, got '{text}'") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1, "positive")
_non_negative_int = _int_at_least(0, "non-negative")


Item = TypeVar("Item")


def _comma_separated(item: Callable[[str], Item]) -> Callable[[str], list[Item]]:
    """An argparse type: `a,b,c`, each part parsed by `item` (whose errors name the bad part)."""

    def parse(text: str) -> list[Item]:
        return [item(part.strip()) for part in text.split(",")]

    return parse


def _trust_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a command that opens a run directory: whether its code may run, and the key its manifest
    must be signed with."""
    trust = parser.add_argument_group("trust (a run directory is data: its code never runs unless you say so)")
    trust.add_argument(
        "--trust-code",
        action="store_true",
        help="import the modules the run's config names (imports:) and build its module:Attr components",
    )
    trust.add_argument(
        "--signing-key-env",
        metavar="VAR",
        help="refuse the run unless its manifest is signed (HMAC-SHA256) with the key in this environment variable",
    )


def _trust(args: argparse.Namespace):  # noqa: ANN202 - runs.Trust, imported lazily to keep --help fast
    from scaleforge.runs import Trust

    return Trust(args.trust_code, args.signing_key_env)


def _train_arguments(parser: argparse.ArgumentParser, config_help: str) -> None:
    """The config, run directory, resume and process options of `train` (and `distill`)."""
    parser.add_argument("config", nargs="*", metavar="CONFIG_OR_OVERRIDE", help=config_help)
    parser.add_argument("--run-dir", help="where results go (default: runs/<name>-<time>)")
    parser.add_argument(
        "--resume",
        default="auto",
        metavar="auto|never|PATH",
        help="auto (default): continue from the newest good checkpoint in --run-dir, if any; never: start afresh; "
        "PATH: start from that checkpoint folder",
    )
    launch = parser.add_argument_group("processes (as torchrun's flags)")
    launch.add_argument("--nproc", type=_positive_int, default=1, help="processes on this node (default 1)")
    launch.add_argument("--nnodes", type=_positive_int, default=1, help="nodes taking part (default 1)")
    launch.add_argument("--node-rank", type=_non_negative_int, default=0, help="this node's index (default 0)")
    launch.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="where the nodes meet (needed for --nnodes > 1)")
    launch.add_argument(
        "--rdzv-id", metavar="ID", help="a name shared by the nodes of one job (names the default run directory)"
    )
    launch.add_argument(
        "--max-restarts", type=_non_negative_int, default=0, help="restart the workers up to K times after a failure"
    )


def build_parser() -> argparse.ArgumentParser:
    """The whole command line."""
    from scaleforge import __version__

    parser = _Parser(prog="scaleforge", description="Train, evaluate and benchmark models from one YAML config.")
    parser.add_argument("--version", action="version", version=f"scaleforge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    config_help = "[CONFIG.yaml] [KEY=VALUE ...]: a config file (default: the embedded default) and dotted overrides"
    train = commands.add_parser("train", help="train a model", description="Train the model a config describes.")
    _train_arguments(train, config_help)
    train.set_defaults(handler=cmd_train)

    distill = commands.add_parser(
        "distill",
        help="train a student on a trained teacher's softened outputs",
        description="Train the student a config describes on TEACHER_RUN's softened outputs and the labels (the "
        "distillation loss: training.loss.temperature and training.loss.soft_weight set the mix), with every "
        "option of `train`.",
    )
    distill.add_argument("teacher", metavar="TEACHER_RUN")
    _train_arguments(distill, config_help)
    distill.add_argument(
        "--trust-code", action="store_true", help="build the teacher even if its run's config names code (imports:)"
    )
    distill.set_defaults(handler=cmd_distill)

    evaluate = commands.add_parser("eval", help="evaluate a trained run on its validation split")
    evaluate.add_argument("run_dir", metavar="RUN_DIR")
    _trust_arguments(evaluate)
    evaluate.set_defaults(handler=cmd_eval)

    compress = commands.add_parser(
        "compress",
        help="compress a trained run into a new run directory",
        description="Compress a finished run into a new run directory (eval, serve and export take it like any "
        "other) and print size, validation metrics and CPU latency before and after.",
    )
    compress.add_argument("run_dir", metavar="RUN_DIR")
    _trust_arguments(compress)
    compress.add_argument(
        "--method",
        required=True,
        choices=["dynamic-int8", "static-int8", "qat", "prune"],
        help="dynamic-int8: Linear and LSTM layers in int8 (weights per channel, inputs per row), no calibration; "
        "static-int8: Linear and convolution layers in int8 by PT2E (torch.export, torchao's x86 quantizer), "
        "activation ranges from calibration batches; qat: trained fake-quantized for --finetune-epochs (default "
        "1) through the trainer, then converted to int8; "
        "prune: global magnitude pruning (zeros), or --structured (fewer units: a smaller dense model)",
    )
    compress.add_argument(
        "--calibration-batches", type=_positive_int, help="static-int8: training batches to calibrate on (default 8)"
    )
    compress.add_argument("--sparsity", type=_fraction, help="prune: the fraction removed (default 0.5)")
    compress.add_argument(
        "--structured", action="store_true", help="prune: remove whole hidden units or channels (mlp, cnn)"
    )
    compress.add_argument(
        "--finetune-epochs",
        type=_non_negative_int,
        default=0,
        help="prune: then train this many epochs (default 0); qat: train this many (default 1)",
    )
    compress.add_argument(
        "--nproc", type=_positive_int, default=1, help="qat, prune's fine-tuning: processes to train on (default 1)"
    )
    compress.add_argument("--out", help="the new run directory (default: beside RUN_DIR, named by the method)")
    compress.set_defaults(handler=cmd_compress)

    export = commands.add_parser(
        "export",
        help="export a trained run's model (ONNX, torch.export, AOTInductor)",
        description="Export a finished run's model and check the file against the model on validation batches "
        "before reporting it done.",
    )
    export.add_argument("run_dir", metavar="RUN_DIR")
    _trust_arguments(export)
    export.add_argument(
        "--format",
        required=True,
        choices=["onnx", "torch-export", "aoti"],
        help="onnx: one .onnx file (dynamo exporter, checked with ONNX Runtime); torch-export: a .pt2 ExportedProgram; "
        "aoti: an AOTInductor package (.aoti.pt2, compiled: needs a C++ compiler; the successor of TorchScript)",
    )
    export.add_argument("--dynamic-batch", action="store_true", help="any batch size (checked on two)")
    export.add_argument("--opset", type=_positive_int, help="ONNX opset (default: the exporter's)")
    export.add_argument(
        "--out", help="the file to write (default: RUN_DIR/exported/model.onnx, model.pt2 or model.aoti.pt2)"
    )
    export.set_defaults(handler=cmd_export)

    config = commands.add_parser("config", help="inspect configs")
    config_commands = config.add_subparsers(dest="config_command", required=True, parser_class=_Parser)
    show = config_commands.add_parser("show", help="print the resolved config as YAML")
    show.add_argument("config", nargs="*", metavar="CONFIG_OR_OVERRIDE", help=config_help)
    show.add_argument("--explain", action="store_true", help="say where each value came from")
    show.set_defaults(handler=cmd_config_show)

    kinds = ["models", "datasets", "optimizers", "schedulers", "losses", "metrics", "callbacks"]
    listing = commands.add_parser("list", help="list registered components")
    listing.add_argument("kind", nargs="?", choices=kinds)
    listing.set_defaults(handler=cmd_list)

    serve = commands.add_parser(
        "serve",
        help="serve a trained run over HTTP",
        description="Serve a trained run's model over HTTP (FastAPI on uvicorn) with dynamic batching, a bounded "
        "queue, deadlines, health checks and Prometheus metrics. The model is loaded before the server listens.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    serve.add_argument("run_dir", metavar="RUN_DIR_OR_MODEL", help="a run directory, or its final/ folder")
    _trust_arguments(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    serve.add_argument("--port", type=_non_negative_int, default=8000, help="port (0: any free one, printed)")
    serve.add_argument("--max-batch-size", type=_positive_int, default=32, help="instances per batch, at most")
    serve.add_argument("--max-delay-ms", type=_non_negative_float, default=5.0, help="longest wait for a batch to fill")
    serve.add_argument("--max-queue", type=_positive_int, default=256, help="queued requests before 503")
    serve.add_argument("--timeout-ms", type=_positive_float, default=2000.0, help="queued longer: 504, never run")
    serve.add_argument("--cache-size", type=_non_negative_int, default=0, help="LRU of results (0: none)")
    serve.add_argument(
        "--max-body-mb",
        type=_positive_float,
        help="larger bodies get 413 (unset: from the model's input, twice --max-batch-size instances at their "
        "largest JSON size plus 64 KiB; for image uploads, a 4096x4096 RGB image uncompressed plus 64 KiB)",
    )
    serve.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    serve.add_argument(
        "--threads",
        type=_non_negative_int,
        default=0,
        help="torch threads for the model (0: every core if that runs a full batch 1.3x faster, else one fewer)",
    )
    serve.add_argument(
        "--backend",
        choices=["torch", "onnxruntime"],
        default="torch",
        help="onnxruntime: serve the run's ONNX export (see --onnx) with ONNX Runtime, with the same API, "
        "batching and metrics",
    )
    serve.add_argument(
        "--onnx",
        metavar="FILE",
        help="the ONNX file for --backend onnxruntime (default: RUN_DIR/exported/model.onnx, written by "
        "`scaleforge export RUN_DIR --format onnx --dynamic-batch`)",
    )
    serve.add_argument(
        "--model-process",
        action=argparse.BooleanOptionalAction,
        default="auto",
        help="run the model in a process of its own, in parallel with HTTP (--no-model-process: a thread; auto: a "
        "process on a CPU when the model's compute dominates, a full batch taking >= 0.5 ms an instance)",
    )
    serve.add_argument(
        "--latency-target-ms",
        type=_non_negative_float,
        default=0.0,
        help="keep batches small enough, and refuse at once what could not be answered, to answer within this (0: off)",
    )
    serve.add_argument(
        "--batch-timeout-s",
        type=_positive_float,
        default=60.0,
        help="a batch the model has not answered in this long is taken for hung and its requests get 503: a model "
        "process is restarted; while a model on a thread is hung, /health/live and new requests get 503",
    )
    serve.add_argument(
        "--drain-grace-s",
        type=_non_negative_float,
        default=0.0,
        help="after SIGTERM, keep serving this long with /health/ready at 503 (for load balancers), then drain",
    )
    serve.add_argument(
        "--api-key-env", metavar="VAR", help="require the key held by this environment variable (not /health/*)"
    )
    serve.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with this PEM certificate (with --tls-key)")
    serve.add_argument("--tls-key", metavar="FILE", help="the certificate's PEM private key (with --tls-cert)")
    serve.set_defaults(handler=cmd_serve)

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
    runs.add_argument("--json", action="store_true", help="print JSON instead of a table")
    runs.set_defaults(handler=cmd_runs)

    stream = commands.add_parser(
        "stream",
        help="classify a stream of frames (video, camera, images) in real time",
        description="Run a trained image classifier on a stream of frames: capture, preprocessing (as in training), "
        "batched inference and the sink run concurrently, joined by bounded queues. Live sources drop their oldest "
        "waiting frames when the model cannot keep up (latency stays bounded); files are processed whole, in order. "
        "Ctrl-C or SIGTERM finishes the frames in flight, flushes the sink and prints the summary.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    stream.add_argument("run_dir", metavar="RUN_DIR", help="a run directory of an image classifier")
    _trust_arguments(stream)
    stream.add_argument(
        "--source",
        required=True,
        help="a video file, a camera index (0), a folder of images, or synthetic:WxH (generated moving frames)",
    )
    stream.add_argument(
        "--fps", type=_positive_float, help="the source's rate (synthetic: 30; a file: as fast as it is taken)"
    )
    stream.add_argument("--max-batch-size", type=_positive_int, default=8, help="frames per batch, at most")
    stream.add_argument("--max-delay-ms", type=_non_negative_float, default=10.0, help="longest wait for a batch")
    stream.add_argument("--queue", type=_positive_int, default=4, help="frames each queue between stages holds")
    stream.add_argument(
        "--policy",
        choices=["drop-oldest", "block"],
        help="a full queue drops its oldest frame, or makes the source wait (default: drop-oldest for live "
        "sources, block for files and folders)",
    )
    stream.add_argument("--sink", default="none", help="jsonl:FILE (a line per frame), video:FILE.avi|.mp4, none")
    stream.add_argument("--cache-size", type=_non_negative_int, default=0, help="results kept for repeated frames")
    stream.add_argument("--duration", type=_positive_float, help="seconds to run (default: until the source ends)")
    stream.add_argument("--metrics-port", type=_port, help="serve Prometheus metrics on this port (0: any free)")
    stream.add_argument("--metrics-host", default="127.0.0.1", help="address of the metrics endpoint")
    stream.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    stream.add_argument("--threads", type=_non_negative_int, default=0, help="torch threads (0: chosen for the model)")
    stream.add_argument("--progress", choices=["auto", "bar", "plain", "none"], default="auto", help="the live line")
    stream.add_argument("--summary-json", metavar="FILE", help="also write the summary's figures here")
    stream.set_defaults(handler=cmd_stream)

    search = commands.add_parser(
        "search",
        help="search architectures and hyperparameters with Optuna; 'search show STUDY' reports one",
        description="Sample configs from a search space (dotted config keys mapped to distributions), train each as "
        "a normal run under the study's folder, prune hopeless trials, and report the best trial or, for several "
        "objectives, the Pareto front. Running the same command again continues the study. "
        "'scaleforge search show STUDY' prints what a study found and writes its best config.",
    )
    search.add_argument("config", nargs="*", metavar="CONFIG_OR_OVERRIDE", help=config_help)
    search.add_argument("--space", required=True, metavar="SPACE.yaml", help="the search space")
    search.add_argument(
        "--objective",
        action="append",
        metavar="NAME[,NAME...]",
        help="what to optimise, repeatable: val_loss (default), val_accuracy, val_<metric>:max|min, or a cost: "
        "params, latency_ms (batch 1), int8_size_kib (after dynamic-int8); several give a Pareto front",
    )
    search.add_argument("--trials", type=_positive_int, default=20, help="trials in the study in all (default 20)")
    search.add_argument("--jobs", type=_positive_int, default=1, help="trials at once, each its own process")
    search.add_argument("--nproc", type=_positive_int, default=1, help="processes per trial (the launcher's --nproc)")
    search.add_argument("--study", help="the study's name (default: the config's name)")
    search.add_argument(
        "--storage",
        metavar="URL",
        help="Optuna storage URL shared by every machine of the search (default: sqlite:///DIR/study.db)",
    )
    search.add_argument("--dir", help="the study's folder, holding its trials (default: runs/search/<study>)")
    search.add_argument(
        "--timeout", type=_float_above(0, False, "seconds"), metavar="S", help="start no trial after S seconds"
    )
    search.add_argument("--sampler", choices=("tpe", "random", "nsga2", "gp"), default="tpe", help="(default tpe)")
    search.add_argument(
        "--pruner",
        choices=("auto", "median", "hyperband", "none"),
        default="auto",
        help="stops hopeless trials from their validation values; auto (default): median for one validation "
        "metric, none for several objectives",
    )
    search.add_argument(
        "--pruner-startup",
        type=_non_negative_int,
        default=5,
        metavar="K",
        help="trials that finish before the median pruner stops any (default 5)",
    )
    search.add_argument("--seed", type=_non_negative_int, default=0, help="the sampler's seed (default 0)")
    search.set_defaults(handler=cmd_search)

    bench = commands.add_parser("bench", help="benchmarks")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True, parser_class=_Parser)
    overhead = bench_commands.add_parser(
        "overhead", help="trainer step time against a plain PyTorch loop (and Lightning when installed)"
    )
    overhead.add_argument("--steps", type=_positive_int, default=300, help="timed steps per measurement (default 300)")
    overhead.add_argument(
        "--repeats", type=_positive_int, default=5, help="interleaved repeats; medians are reported (default 5)"
    )
    overhead.add_argument("--threads", type=_positive_int, default=None, help="torch threads (default: torch's choice)")
    overhead.add_argument("--no-lightning", action="store_true", help="skip PyTorch Lightning even if installed")
    overhead.add_argument("--json", action="store_true", help="print JSON instead of a table")
    overhead.set_defaults(handler=cmd_bench_overhead)

    scaling = bench_commands.add_parser(
        "scaling",
        help="training throughput at several process counts (strong or weak scaling)",
        description="Train one config at each process count, every process with cores // (largest count) threads, "
        "and report steady-state throughput, speed-up and scaling efficiency.",
    )
    scaling.add_argument("config", nargs="*", metavar="CONFIG_OR_OVERRIDE", help=config_help)
    scaling.add_argument(
        "--nproc",
        type=_comma_separated(_positive_int),
        required=True,
        metavar="N,N,...",
        help="process counts, such as 1,2",
    )
    scaling.add_argument(
        "--mode",
        choices=("strong", "weak"),
        required=True,
        help="strong: the global batch stays training.batch_size; weak: each process gets training.batch_size",
    )
    scaling.add_argument(
        "--strategy", default="ddp", help="ddp, fsdp, tp, pp or hybrid: how runs above 1 process split (default ddp)"
    )
    scaling.add_argument("--steps", type=_positive_int, default=100, help="steps per run, at least 30 (default 100)")
    scaling.add_argument("--out", default="runs/bench-scaling", help="where runs and results go (default %(default)s)")
    scaling.add_argument("--json", action="store_true", help="print JSON instead of a table")
    scaling.set_defaults(handler=cmd_bench_scaling)

    memory = bench_commands.add_parser(
        "memory",
        help="parameters, gradients, optimizer state and peak memory per process under each strategy",
        description="Train one config under each strategy on the same processes and compare memory per process.",
    )
    memory.add_argument("config", nargs="*", metavar="CONFIG_OR_OVERRIDE", help=config_help)
    memory.add_argument("--nproc", type=_positive_int, required=True, help="processes per run, at least 2")
    memory.add_argument(
        "--strategies",
        type=_comma_separated(str),
        default=["ddp", "fsdp", "tp"],
        metavar="S,S,...",
        help="strategies to compare (default ddp,fsdp,tp)",
    )
    memory.add_argument("--steps", type=_positive_int, default=20, help="steps per run (default 20)")
    memory.add_argument("--out", default="runs/bench-memory", help="where runs and results go (default %(default)s)")
    memory.add_argument("--json", action="store_true", help="print JSON instead of a table")
    memory.set_defaults(handler=cmd_bench_memory)
    checkpoint = bench_commands.add_parser(
        "checkpoint",
        help="checkpoint save (sync, async) and load time against torch.save",
        description="Save and load one config's model and optimizer state as checkpoints and with torch.save.",
    )
    checkpoint.add_argument("config", nargs="*", metavar="CONFIG_OR_OVERRIDE", help=config_help)
    checkpoint.add_argument(
        "--repeats", type=_positive_int, default=7, help="measurements per figure; medians are reported (default 7)"
    )
    checkpoint.add_argument("--out", default="runs/bench-checkpoint", help="where checkpoints and results go")
    checkpoint.add_argument("--json", action="store_true", help="print JSON instead of a table")
    checkpoint.set_defaults(handler=cmd_bench_checkpoint)
    bench_compress = bench_commands.add_parser(
        "compress",
        help="size, accuracy and speed of each compression of a run",
        description="Make every compression of a trained run (dynamic and static int8, pruning, narrowing, a "
        "distilled student) and compare size, validation accuracy, CPU latency and ONNX Runtime throughput.",
    )
    bench_compress.add_argument("run_dir", metavar="RUN_DIR", help="a trained run directory")
    _trust_arguments(bench_compress)
    bench_compress.add_argument(
        "--finetune-epochs", type=_non_negative_int, default=3, help="fine-tuning after pruning (default 3)"
    )
    bench_compress.add_argument("--out", default="runs/bench-compress", help="where the variants and results go")
    bench_compress.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bench_compress.set_defaults(handler=cmd_bench_compress)
    bench_stream = bench_commands.add_parser(
        "stream",
        help="streaming throughput against batch size, and latency when frames come faster than that",
        description="The streaming pipeline on synthetic frames: the fps it sustains at each batch size against the "
        "model alone, then p50/p99 latency, drops and memory with the source at 0.5x, 1x, 2x and 4x that rate "
        "(drop-oldest).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    bench_stream.add_argument("run_dir", metavar="RUN_DIR", help="a run directory of an image classifier")
    _trust_arguments(bench_stream)
    bench_stream.add_argument(
        "--batch-sizes",
        type=_comma_separated(_positive_int),
        default=[1, 2, 4, 8, 16],
        metavar="N,N,...",
        help="max batch sizes to measure",
    )
    bench_stream.add_argument("--seconds", type=_positive_float, default=4.0, help="seconds per measured point")
    bench_stream.add_argument("--frame-size", default="64x64", metavar="WxH", help="the synthetic frames' size")
    bench_stream.add_argument("--threads", type=_non_negative_int, default=0, help="torch threads (0: chosen)")
    bench_stream.add_argument("--out", default="runs/bench-stream", help="where stream.json and stream.png go")
    bench_stream.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bench_stream.set_defaults(handler=cmd_bench_stream)

    bench_serve = bench_commands.add_parser(
        "serve",
        help="serving throughput and latency, batching on and off, beside a bare endpoint and LitServe",
        description="Start each server on 127.0.0.1 and drive it with a bounded aiohttp load generator: closed-loop "
        "levels (requests in flight) and an open-loop overload for scaleforge with batching.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    bench_serve.add_argument("run_dir", metavar="RUN_DIR", help="a trained run directory")
    _trust_arguments(bench_serve)
    bench_serve.add_argument(
        "--concurrency",
        type=_comma_separated(_positive_int),
        default=[1, 8, 32],
        metavar="N,N,...",
        help="closed-loop levels: requests in flight",
    )
    bench_serve.add_argument("--requests", type=_positive_int, default=2000, help="requests per level, at most")
    bench_serve.add_argument("--seconds", type=_positive_float, default=10.0, help="seconds per level, at most")
    bench_serve.add_argument("--max-batch-size", type=_positive_int, default=32, help="for the batching servers")
    bench_serve.add_argument("--max-delay-ms", type=_non_negative_float, default=5.0, help="for the batching servers")
    bench_serve.add_argument(
        "--overload",
        type=_non_negative_float,
        default=3.0,
        help="open-loop rate as a multiple of the measured capacity (0: none)",
    )
    bench_serve.add_argument(
        "--repeats",
        type=_positive_int,
        default=1,
        help="runs of each closed-loop level, the servers in turn; the median is reported",
    )
    bench_serve.add_argument(
        "--beside-large",
        type=_non_negative_int,
        default=8,
        metavar="N",
        help="N small requests in flight alone, then beside a client sending full batches (large bodies), on "
        "scaleforge with batching: their p99 with and without (0: skip)",
    )
    bench_serve.add_argument("--no-litserve", action="store_true", help="skip LitServe even if installed")
    bench_serve.add_argument("--out", default="runs/bench-serve", help="where logs, JSON and the plot go")
    bench_serve.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bench_serve.set_defaults(handler=cmd_bench_serve)
    return parser


def build_search_show_parser() -> argparse.ArgumentParser:
    """`scaleforge search show STUDY`: a command of its own beside `search CONFIG` (which takes free arguments)."""
    parser = _Parser(
        prog="scaleforge search show",
        description="Print a study's trials, its best trial or Pareto front and parameter importances, draw its "
        "plot, and write the best trial's config as a YAML file for 'scaleforge train'.",
    )
    parser.add_argument("study", metavar="STUDY", help="the study's folder, or its name under runs/search/")
    parser.add_argument("--storage", metavar="URL", help="read the study from this storage instead of its folder")
    parser.add_argument("--study-name", metavar="NAME", help="with --storage: which study (default: the only one)")
    parser.add_argument(
        "--trial",
        type=_non_negative_int,
        help="write this trial's config (default: the best, or the Pareto front's best on the first objective)",
    )
    parser.add_argument("--out", help="where the config goes (default: STUDY/best.yaml)")
    parser.set_defaults(handler=cmd_search_show)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """argparse, with `KEY=VALUE` overrides accepted anywhere on the line (`train cfg.yaml --nproc 2 seed=1`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["search", "show"]:
        return build_search_show_parser().parse_args(argv[2:])
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
        # Workers leave their errors for the launcher, which prints one. Under torchrun, which reports failed
        # workers its own way, rank 0 also says its error.
        from scaleforge.distributed.launch import is_launched_worker, record_error

        if _is_main_process() and not is_launched_worker():
            print(error.one_line(), file=sys.stderr)
        rank = int(os.environ.get("RANK", 0))
        if "RANK" in os.environ:  # an error other processes did not share names its rank
            shared = rank == 0 or isinstance(error, AgreedError)
            record_error(error.one_line() if shared else f"rank {rank}: {error.one_line()}")
        return error.exit_code
    except Interrupted as stop:
        if _is_main_process():
            print(stop, file=sys.stderr)
        return stop.exit_code
    except Exception as error:
        from scaleforge.distributed.env import PEER_FAILED_EXIT, PEER_FAILED_GRACE_S, PeerHung, lost_peer
        from scaleforge.distributed.launch import is_launched_worker, record_error, restarts_left

        if isinstance(error, PeerHung):
            # the launcher says it when the job fails; a worker about to be restarted says why itself
            if not is_launched_worker() or restarts_left():
                print(error, file=sys.stderr)
            record_error(str(error))
            return error.exit_code
        if is_launched_worker() and lost_peer(error):  # the launcher reports the peer's failure instead
            time.sleep(PEER_FAILED_GRACE_S)
            return PEER_FAILED_EXIT
        raise
    except KeyboardInterrupt:  # under the launcher, the launcher says it
        from scaleforge.distributed.launch import is_launched_worker

        if _is_main_process() and not is_launched_worker():
            print("interrupted", file=sys.stderr)
        return 130


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


if __name__ == "__main__":
    run()
