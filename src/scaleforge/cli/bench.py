"""`scaleforge bench ...`: the benchmarks, one subcommand each."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from scaleforge.cli.arguments import (
    Parser,
    comma_separated,
    config_argument,
    json_argument,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    run_dir_arguments,
    split_config_args,
    trust,
)
from scaleforge.errors import UsageError


def add_parser(commands: argparse._SubParsersAction) -> None:
    """`bench` and its subcommands on `commands`."""
    bench = commands.add_parser("bench", help="benchmarks")
    benchmarks = bench.add_subparsers(dest="bench_command", required=True, parser_class=Parser)
    for add in (_overhead, _scaling, _memory, _checkpoint, _compress, _stream, _serve, _data, _generate):
        add(benchmarks)


def _overhead(benchmarks: argparse._SubParsersAction) -> None:
    overhead = benchmarks.add_parser(
        "overhead", help="trainer step time against a plain PyTorch loop (and Lightning when installed)"
    )
    overhead.add_argument("--steps", type=positive_int, default=300, help="timed steps per measurement (default 300)")
    overhead.add_argument(
        "--repeats", type=positive_int, default=7, help="interleaved repeats; medians are reported (default 7)"
    )
    overhead.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's choice)")
    overhead.add_argument("--no-lightning", action="store_true", help="skip PyTorch Lightning even if installed")
    overhead.add_argument(
        "--device", default="cpu", help="where every loop trains: cpu (default), cuda or cuda:N (`make gpu-check`)"
    )
    json_argument(overhead)
    overhead.set_defaults(handler=cmd_bench_overhead)


def _scaling(benchmarks: argparse._SubParsersAction) -> None:
    scaling = benchmarks.add_parser(
        "scaling",
        help="training throughput at several process counts (strong or weak scaling)",
        description="Train one config at each process count, every process with cores // (largest count) threads, "
        "and report steady-state throughput, speed-up and scaling efficiency.",
    )
    config_argument(scaling)
    scaling.add_argument(
        "--nproc",
        type=comma_separated(positive_int),
        required=True,
        metavar="N,N,...",
        help="process counts, such as 1,2",
    )
    scaling.add_argument(
        "--mode",
        choices=("strong", "weak"),
        help="strong: the global batch stays training.batch_size; weak: each process gets training.batch_size "
        "(required unless --grad-compression or --schedules)",
    )
    scaling.add_argument(
        "--strategy", default="ddp", help="ddp, fsdp, tp, pp or hybrid: how runs above 1 process split (default ddp)"
    )
    scaling.add_argument("--steps", type=positive_int, default=100, help="steps per run, at least 30 (default 100)")
    scaling.add_argument(
        "--grad-compression",
        type=comma_separated(str),
        metavar="S,S,...",
        help="instead of process counts, compare parallel.grad_compression settings (none, bf16, fp16, powersgd) "
        "under ddp on the largest --nproc: bytes per step, throughput, validation loss",
    )
    scaling.add_argument(
        "--powersgd-rank", type=positive_int, default=4, help="PowerSGD's rank with --grad-compression (default 4)"
    )
    scaling.add_argument(
        "--powersgd-start-step",
        type=positive_int,
        default=10,
        help="steps of plain all-reduce before PowerSGD starts, in place of torch's 1,000 (default 10)",
    )
    scaling.add_argument(
        "--link",
        metavar="RATE",
        help="with --grad-compression, run each setting also as two nodes joined by a link of RATE (tc's units, "
        "such as 100mbit; network namespaces on this machine, which needs root) and report both throughputs",
    )
    scaling.add_argument(
        "--schedules",
        type=comma_separated(str),
        metavar="S,S,...",
        help="instead of process counts, compare parallel.schedule settings (gpipe, 1f1b, interleaved_1f1b, "
        "zero_bubble) under pp on the largest --nproc: throughput, bubble, validation loss",
    )
    scaling.add_argument("--out", default="runs/bench-scaling", help="where runs and results go (default %(default)s)")
    json_argument(scaling)
    scaling.set_defaults(handler=cmd_bench_scaling)


def _memory(benchmarks: argparse._SubParsersAction) -> None:
    memory = benchmarks.add_parser(
        "memory",
        help="parameters, gradients, optimizer state and peak memory per process under each strategy",
        description="Train one config under each strategy on the same processes and compare memory per process.",
    )
    config_argument(memory)
    memory.add_argument("--nproc", type=positive_int, required=True, help="processes per run, at least 2")
    memory.add_argument(
        "--strategies",
        type=comma_separated(str),
        default=["ddp", "fsdp", "tp"],
        metavar="S,S,...",
        help="strategies to compare (default ddp,fsdp,tp)",
    )
    memory.add_argument("--steps", type=positive_int, default=20, help="steps per run (default 20)")
    memory.add_argument("--out", default="runs/bench-memory", help="where runs and results go (default %(default)s)")
    json_argument(memory)
    memory.set_defaults(handler=cmd_bench_memory)


def _checkpoint(benchmarks: argparse._SubParsersAction) -> None:
    checkpoint = benchmarks.add_parser(
        "checkpoint",
        help="checkpoint save (sync, async) and load time against torch.save",
        description="Save and load one config's model and optimizer state as checkpoints and with torch.save.",
    )
    config_argument(checkpoint)
    checkpoint.add_argument(
        "--repeats", type=positive_int, default=7, help="measurements per figure; medians are reported (default 7)"
    )
    checkpoint.add_argument("--out", default="runs/bench-checkpoint", help="where checkpoints and results go")
    json_argument(checkpoint)
    checkpoint.set_defaults(handler=cmd_bench_checkpoint)


def _compress(benchmarks: argparse._SubParsersAction) -> None:
    compress = benchmarks.add_parser(
        "compress",
        help="size, accuracy and speed of each compression of a run",
        description="Make every compression of a trained run (dynamic and static int8, pruning, narrowing, a "
        "distilled student) and compare size, validation accuracy, CPU latency and ONNX Runtime throughput.",
    )
    run_dir_arguments(compress, help="a trained run directory")
    compress.add_argument(
        "--finetune-epochs", type=non_negative_int, default=3, help="fine-tuning after pruning (default 3)"
    )
    compress.add_argument("--out", default="runs/bench-compress", help="where the variants and results go")
    json_argument(compress)
    compress.set_defaults(handler=cmd_bench_compress)


def _stream(benchmarks: argparse._SubParsersAction) -> None:
    stream = benchmarks.add_parser(
        "stream",
        help="streaming throughput against batch size, and latency when frames come faster than that",
        description="The streaming pipeline on synthetic frames: the fps it sustains at each batch size against the "
        "model alone, then p50/p99 latency, drops and memory with the source at 0.5x, 1x, 2x and 4x that rate "
        "(drop-oldest).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    run_dir_arguments(stream, help="a run directory of an image classifier")
    stream.add_argument(
        "--batch-sizes",
        type=comma_separated(positive_int),
        default=[1, 2, 4, 8, 16],
        metavar="N,N,...",
        help="max batch sizes to measure",
    )
    stream.add_argument("--seconds", type=positive_float, default=4.0, help="seconds per measured point")
    stream.add_argument("--frame-size", default="64x64", metavar="WxH", help="the synthetic frames' size")
    stream.add_argument("--threads", type=non_negative_int, default=0, help="torch threads (0: chosen)")
    stream.add_argument("--out", default="runs/bench-stream", help="where stream.json and stream.png go")
    json_argument(stream)
    stream.set_defaults(handler=cmd_bench_stream)


def _serve(benchmarks: argparse._SubParsersAction) -> None:
    serve = benchmarks.add_parser(
        "serve",
        help="serving throughput and latency, batching on and off, beside a bare endpoint and LitServe",
        description="Start each server on 127.0.0.1 and drive it with a bounded aiohttp load generator: closed-loop "
        "levels (requests in flight) and an open-loop overload for scaleforge with batching.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    run_dir_arguments(serve, help="a trained run directory")
    serve.add_argument(
        "--concurrency",
        type=comma_separated(positive_int),
        default=[1, 8, 32],
        metavar="N,N,...",
        help="closed-loop levels: requests in flight",
    )
    serve.add_argument("--requests", type=positive_int, default=2000, help="requests per level, at most")
    serve.add_argument("--seconds", type=positive_float, default=10.0, help="seconds per level, at most")
    serve.add_argument("--max-batch-size", type=positive_int, default=32, help="for the batching servers")
    serve.add_argument("--max-delay-ms", type=non_negative_float, default=5.0, help="for the batching servers")
    serve.add_argument(
        "--overload",
        type=non_negative_float,
        default=3.0,
        help="open-loop rate as a multiple of the measured capacity (0: none)",
    )
    serve.add_argument(
        "--repeats",
        type=positive_int,
        default=1,
        help="runs of each closed-loop level, the servers in turn; the median is reported",
    )
    serve.add_argument(
        "--beside-large",
        type=non_negative_int,
        default=8,
        metavar="N",
        help="N small requests in flight alone, then beside a client sending full batches (large bodies), on "
        "scaleforge with batching: their p99 with and without (0: skip)",
    )
    serve.add_argument(
        "--workers",
        type=comma_separated(positive_int),
        default=[],
        metavar="N,N,...",
        help="also scaleforge with --workers N (one HTTP process, N model processes), and N whole servers sharing "
        "the port (SO_REUSEPORT, nothing shared between them), for each N",
    )
    serve.add_argument("--no-litserve", action="store_true", help="skip LitServe even if installed")
    serve.add_argument("--out", default="runs/bench-serve", help="where logs, JSON and the plot go")
    json_argument(serve)
    serve.set_defaults(handler=cmd_bench_serve)


def _data(benchmarks: argparse._SubParsersAction) -> None:
    data = benchmarks.add_parser(
        "data",
        help="loader throughput, training's data-wait share and memory: image folder, shards on disk and in an "
        "object store, against torchvision's ImageFolder",
        description="Read the same images as an image folder, as shards on disk and as shards in a local object "
        "store (moto's S3 server), each through a data loader of the same workers, against torchvision's "
        "ImageFolder; train the config's model on them for the data-wait share; and compare training's peak "
        "memory on 1x and 8x the data. Without data.dataset=image_folder data.path=DIR in CONFIG, the images are "
        "drawn from scikit-learn's digits.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    config_argument(data)
    data.add_argument("--images", type=positive_int, default=4000, help="images to draw when CONFIG names no folder")
    data.add_argument("--image-px", type=positive_int, default=64, help="their size in pixels")
    data.add_argument("--workers", type=non_negative_int, default=2, help="loader workers of every source")
    data.add_argument("--repeats", type=positive_int, default=3, help="epochs per source; medians are reported")
    data.add_argument("--steps", type=positive_int, default=20, help="steps of each training run")
    data.add_argument(
        "--shard-size",
        default="4MB",
        help="as for `scaleforge data prepare`; small, so that the drawn images make several shards to fetch ahead",
    )
    store = data.add_mutually_exclusive_group()
    store.add_argument(
        "--object-store",
        dest="object_store",
        action="store_true",
        default=None,
        help="read shards from moto's S3 server too (default: when moto is installed)",
    )
    store.add_argument(
        "--no-object-store", dest="object_store", action="store_false", help="read shards from disk and the folder only"
    )
    data.add_argument("--out", default="runs/bench-data", help="where images, shards, runs and results go")
    json_argument(data)
    data.set_defaults(handler=cmd_bench_data)


def _generate(benchmarks: argparse._SubParsersAction) -> None:
    benchmarks.add_parser(
        "generate",
        help="a gpt's generation speed: its key/value cache against recomputation, ONNX Runtime and transformers' "
        "generate, then through scaleforge serve",
        description="One greedy generation after a prompt of random tokens, timed five ways: scaleforge's "
        "generation with the gpt's key/value cache, the same reading the whole sequence again for each token, the "
        "gpt's ONNX exports under ONNX Runtime (on cpu only) and Hugging Face transformers' GPT-2 generate of the "
        "same shape (random weights). Warmed up, then the median of the repeats. Then the server part: streamed "
        "completions from `scaleforge serve` at each number of concurrent streams (a closed loop), with continuous "
        "batching, one request at a time and static batching.",
        populate=_generate_arguments,
    ).set_defaults(handler=cmd_bench_generate)


def _generate_arguments(generate: Parser) -> None:
    from scaleforge.bench.generate import GenerateBenchOptions, ServerLoad
    from scaleforge.cli.fields import add_fields

    run_dir_arguments(generate, help="a run directory of a gpt")
    add_fields(generate, GenerateBenchOptions)
    add_fields(generate, ServerLoad)
    json_argument(generate)


def cmd_bench_overhead(args: argparse.Namespace) -> int:
    """The trainer's step time against a plain loop."""
    from scaleforge.bench.overhead import run_overhead_benchmark
    from scaleforge.hardware import select_device_option

    device = str(select_device_option(args.device))  # a device this machine lacks is one usage line
    run_overhead_benchmark(
        steps=args.steps,
        repeats=args.repeats,
        lightning=not args.no_lightning,
        as_json=args.json,
        threads=args.threads,
        device=device,
    )
    return 0


def _check_names(option: str, given: list[str], allowed: tuple[str, ...]) -> None:
    """A usage error naming those of `given` that are not `allowed`."""
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise UsageError(f"{option}: {', '.join(unknown)}: expected {', '.join(allowed[:-1])} or {allowed[-1]}")


def cmd_bench_scaling(args: argparse.Namespace) -> int:
    """Throughput at each process count."""
    from scaleforge.bench.scaling import run_scaling_benchmark

    config_path, overrides = split_config_args(args.config)
    if args.grad_compression is not None:
        from scaleforge.bench.harness import GRAD_COMPRESSIONS
        from scaleforge.bench.scaling import run_compression_benchmark

        _check_names("--grad-compression", args.grad_compression, GRAD_COMPRESSIONS)
        run_compression_benchmark(
            config_path,
            overrides,
            processes=max(args.nproc),
            settings=args.grad_compression,
            steps=args.steps,
            powersgd_rank=args.powersgd_rank,
            powersgd_start_step=args.powersgd_start_step,
            out=Path(args.out),
            link=args.link,
            as_json=args.json,
        )
        return 0
    if args.link is not None:
        raise UsageError("--link: only with --grad-compression (it measures the gradients' all-reduce over a link)")
    if args.schedules is not None:
        from scaleforge.bench.harness import PIPELINE_SCHEDULES
        from scaleforge.bench.scaling import run_schedule_benchmark

        _check_names("--schedules", args.schedules, PIPELINE_SCHEDULES)
        run_schedule_benchmark(
            config_path,
            overrides,
            processes=max(args.nproc),
            schedules=args.schedules,
            steps=args.steps,
            out=Path(args.out),
            as_json=args.json,
        )
        return 0
    if args.mode is None:
        raise UsageError("--mode: strong or weak is required (unless --grad-compression or --schedules)")
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
    """Memory per process under each strategy."""
    from scaleforge.bench.memory import run_memory_benchmark

    config_path, overrides = split_config_args(args.config)
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
    """Checkpoint save and load times."""
    from scaleforge.bench.checkpoint import run_checkpoint_benchmark

    config_path, overrides = split_config_args(args.config)
    run_checkpoint_benchmark(config_path, overrides, repeats=args.repeats, out=Path(args.out), as_json=args.json)
    return 0


def cmd_bench_compress(args: argparse.Namespace) -> int:
    """Every compression of a run, compared."""
    from scaleforge.bench.compress import run_compress_benchmark
    from scaleforge.extras import require

    require("export", "scaleforge bench compress")
    run_compress_benchmark(
        args.run_dir, out=Path(args.out), finetune_epochs=args.finetune_epochs, as_json=args.json, trust=trust(args)
    )
    return 0


def cmd_bench_stream(args: argparse.Namespace) -> int:
    """The stream pipeline's throughput against batch size, and its latency under load."""
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
        trust=trust(args),
    )
    return 0


def cmd_bench_serve(args: argparse.Namespace) -> int:
    """Serving throughput and latency against a bare endpoint and LitServe."""
    from scaleforge.bench.serve import run_serve_benchmark
    from scaleforge.extras import require

    require("serve", "scaleforge bench serve")
    require("bench", "scaleforge bench serve")  # the load generator is aiohttp's
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
        trust=trust(args),
        workers=args.workers,
    )
    return 0


def cmd_bench_data(args: argparse.Namespace) -> int:
    """Loader throughput, data-wait share and memory for images as a folder, as shards and in an object store."""
    from scaleforge.bench.data import DataBenchOptions, moto_available, run_data_benchmark

    object_store = moto_available() if args.object_store is None else args.object_store
    if object_store and not moto_available():
        raise UsageError("--object-store: needs moto's S3 server and boto3 (pip install 'moto[server]' boto3)")
    config_path, overrides = split_config_args(args.config)
    options = DataBenchOptions(
        images=args.images,
        image_px=args.image_px,
        workers=args.workers,
        repeats=args.repeats,
        steps=args.steps,
        shard_size=args.shard_size,
        object_store=object_store,
        out=Path(args.out),
        as_json=args.json,
    )
    run_data_benchmark(config_path, overrides, options)
    return 0


def cmd_bench_generate(args: argparse.Namespace) -> int:
    """A gpt's generation speed with and without its cache, and against ONNX Runtime and transformers."""
    from scaleforge.bench.generate import GenerateBenchOptions, ServerLoad, run_generate_benchmark
    from scaleforge.cli.fields import settings_from

    load = settings_from(ServerLoad, args)
    if list(load.streams) != sorted(set(load.streams)):
        raise UsageError("--streams: give increasing numbers without repeats, such as 1,4,16")
    run_generate_benchmark(
        args.run_dir, settings_from(GenerateBenchOptions, args), load, as_json=args.json, trust=trust(args)
    )
    return 0
