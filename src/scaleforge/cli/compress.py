"""`scaleforge compress` and `export`: converters from a trained run to a smaller model or a file."""

from __future__ import annotations

import argparse

from scaleforge.cli.arguments import Parser, positive_int, run_dir_arguments, trust
from scaleforge.errors import UsageError


def add_parser(commands: argparse._SubParsersAction) -> None:
    """`compress` and `export` on `commands`."""
    commands.add_parser(
        "compress",
        help="compress a trained run into a new run directory",
        description="Compress a finished run into a new run directory (eval, serve and export take it like any "
        "other) and print size, validation metrics and CPU latency before and after.",
        populate=_compress_arguments,
    ).set_defaults(handler=cmd_compress)
    export = commands.add_parser(
        "export",
        help="export a trained run's model (ONNX, torch.export, AOTInductor)",
        description="Export a finished run's model and check the file against the model on validation batches "
        "before reporting it done.",
    )
    run_dir_arguments(export)
    export.add_argument(
        "--format",
        required=True,
        choices=["onnx", "torch-export", "aoti"],
        help="onnx: one .onnx file (dynamo exporter, checked with ONNX Runtime); torch-export: a .pt2 ExportedProgram; "
        "aoti: an AOTInductor package (.aoti.pt2, compiled: needs a C++ compiler; the successor of TorchScript)",
    )
    export.add_argument(
        "--dynamic-batch",
        action="store_true",
        help="any batch size (checked on two); a gpt takes any sequence length up to its context whether or not",
    )
    export.add_argument(
        "--kv-cache",
        action="store_true",
        help="a gpt (onnx): also write MODEL.prefill.onnx and MODEL.decode.onnx, the key/value cache as their inputs "
        "and outputs, for generating one token at a time",
    )
    export.add_argument("--opset", type=positive_int, help="ONNX opset (default: the exporter's)")
    export.add_argument(
        "--out", help="the file to write (default: RUN_DIR/exported/model.onnx, model.pt2 or model.aoti.pt2)"
    )
    export.set_defaults(handler=cmd_export)


def _compress_arguments(parser: Parser) -> None:
    from scaleforge.cli.fields import add_fields
    from scaleforge.compress.convert import CompressOptions

    run_dir_arguments(parser)
    add_fields(parser, CompressOptions)
    parser.add_argument("--out", help="the new run directory (default: beside RUN_DIR, named by the method)")


def cmd_compress(args: argparse.Namespace) -> int:
    """Compress a run into a new run directory and print the figures before and after."""
    from scaleforge.cli.fields import given, settings_from
    from scaleforge.compress.convert import CompressOptions, compress_run, print_report
    from scaleforge.extras import require

    options = settings_from(CompressOptions, args)
    if options.method != "prune" and (given(args, "sparsity") or given(args, "structured")):
        raise UsageError("--sparsity and --structured apply to --method prune only")
    if options.method not in ("prune", "qat") and options.finetune_epochs:
        raise UsageError("--finetune-epochs applies to --method prune and qat only")
    if options.method != "static-int8" and given(args, "calibration_batches"):
        raise UsageError("--calibration-batches applies to --method static-int8 only")
    if options.nproc > 1 and not (options.method == "qat" or options.finetune_epochs):
        raise UsageError("--nproc applies to the training of --method qat, or of prune with --finetune-epochs")
    if options.method in ("static-int8", "qat"):
        require("export", f"scaleforge compress --method {options.method}")
    report = compress_run(args.run_dir, options, args.out, trust(args))
    print_report(report)
    print(f"results: {report['run_dir']}/final/ (compression.json holds these figures)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a run's model, check the file against it and say where it is."""
    from scaleforge.export.formats import export_run
    from scaleforge.extras import require

    if args.format == "onnx":
        require("export", "scaleforge export --format onnx")
    result = export_run(
        args.run_dir,
        args.format,
        dynamic_batch=args.dynamic_batch,
        kv_cache=args.kv_cache,
        opset=args.opset,
        out=args.out,
        trust=trust(args),
    )
    for check in result["checks"]:
        tokens = "" if check["tokens"] is None else f" of {check['tokens']} tokens"
        print(
            f"checked on {check['rows']} validation rows{tokens}: max |difference| {check['max_abs_diff']:.2e}, "
            f"top-1 agreement {check['top1_agreement']:.1%}"
        )
    if "kv_cache" in result:
        pair = result["kv_cache"]
        for check in pair["checks"]:
            print(
                f"prefill/decode checked on {check['rows']} validation rows of {check['tokens']} tokens (half of them "
                f"prefilled, then one at a time): max |difference| {check['max_abs_diff']:.2e}"
            )
        print(f"key/value cache pair: {pair['prefill']}, {pair['decode']}")
    kind = "int8" if result["int8"] else "float"
    print(f"exported ({kind}, {result['format']}): {result['file']} ({result['bytes'] / 1024:,.1f} KiB)")
    return 0
