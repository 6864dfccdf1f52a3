"""`make gpu-check` (`PYTHONPATH=src python3 -m scaleforge.bench.gpu_check`): the checks that need a GPU, in one
script that runs on the core install alone (a GPU machine may have another torch >= 2.6 and no network to install
more), within about 5 minutes on one GPU.

Rows, in order, each a real `scaleforge` command in a child process with a time limit of its own:

- `mlp`, `resnet18-bf16-compiled`: single-GPU training in bf16, the second with `torch.compile`;
- `resume`: a run stopped by SIGTERM mid-way and resumed ends with the weights of one that ran straight through;
- `async-checkpoints`: a run that checkpoints asynchronously, then resumes from its last checkpoint;
- `bench-overhead`: `scaleforge bench overhead --device cuda`;
- `gpt-1b`: a GPT of about 1B parameters in bf16 with `torch.compile`, 50 steps, with its tokens/s and MFU;
- `ddp`, `fsdp`, `tp`, `pp`: 2 processes over NCCL, run when there are 2 GPUs or more, else marked "needs >= 2 GPUs";
- `bench-generate`: `scaleforge bench generate` on CUDA, on the gpt the `gpt-small` row trains.

After each row it rewrites `OUT/gpu-check.json` and prints the row, so that a run cut short still leaves its
figures. Without a CUDA GPU it says so and exits 0. `--rehearse` runs the same rows on the CPU, small, to check
the script itself (the test suite does).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

ROW_LIMIT_S = 300  # no row runs longer


@dataclass
class Row:
    """One check: passed, failed (with the last lines it printed) or skipped (with why), and its figures."""

    name: str
    status: str = "skipped"
    seconds: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)
    note: str = ""


@dataclass(frozen=True)
class Plan:
    """What the rows train: sizes for a GPU, or small ones for a rehearsal on the CPU."""

    device: str
    steps: int
    gpt_1b: list[str]
    gpt_1b_steps: int
    images: list[str]
    compile: str = "training.compile=true"  # a rehearsal leaves it out: compiling on a CPU takes minutes

    @classmethod
    def for_gpu(cls) -> Plan:
        # 20 blocks of width 2048 (16 heads of 128), 32k tokens, a context of 1024: 1.07B parameters
        gpt = [
            "model.architecture=gpt",
            "model.n_layers=20",
            "model.d_model=2048",
            "model.n_heads=16",
            "data.kind=tokens",
        ]
        gpt += ["model.tie_embeddings=false", "data.seq_len=1024", "data.vocab_size=32768", "training.batch_size=8"]
        gpt += ["data.num_samples=2048"]
        images = ["model.architecture=resnet18", "data.kind=images", "data.image_size=64", "training.batch_size=256"]
        images += ["data.num_samples=8192"]
        return cls("cuda", 300, gpt, 50, images)

    @classmethod
    def rehearsal(cls) -> Plan:
        gpt = ["model.architecture=gpt", "model.n_layers=2", "model.d_model=64", "model.n_heads=4", "data.kind=tokens"]
        gpt += ["data.seq_len=64", "data.vocab_size=256", "training.batch_size=8"]
        # 256 images of 16 pixels: the default 4,096 of 32 made this row 49 s of a 2-core rehearsal, 12 s now
        images = ["model.architecture=resnet18", "data.kind=images", "data.image_size=16", "training.batch_size=16"]
        images += ["data.num_samples=256"]
        return cls("cpu", 6, gpt, 3, images, compile="training.compile=false")


class Check:
    """The rows of one run of the check, written to `out` as they end."""

    def __init__(self, out: Path, plan: Plan, python: str = sys.executable) -> None:
        self.out, self.plan, self.python = out, plan, python
        self.rows: list[Row] = []
        self.started = time.monotonic()
        out.mkdir(parents=True, exist_ok=True)

    def scaleforge(self, name: str, *args: str, limit_s: float = ROW_LIMIT_S) -> subprocess.CompletedProcess[str]:
        """`python -m scaleforge ARGS` from the source tree, its output logged under `out`; raises on failure."""
        result = subprocess.run(
            [self.python, "-m", "scaleforge", *args], capture_output=True, text=True, timeout=limit_s,
            env=source_environment(), check=False,
        )  # fmt: skip
        (self.out / f"{name}.log").write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-12:])
            raise RuntimeError(f"exit {result.returncode}:\n{tail}")
        return result

    def train(self, name: str, *overrides: str, run_dir: Path | None = None) -> dict[str, Any]:
        """Train `overrides` on the plan's device; the run's summary figures."""
        run_dir = run_dir or self.out / "runs" / name
        base = [f"hardware.device={self.plan.device}", "data.dataset=synthetic", "logging.every_steps=10"]
        base += ["logging.progress=plain", "logging.plot=false", "checkpoint.every_steps=0"]
        self.scaleforge(name, "train", *base, *overrides, "--run-dir", str(run_dir))  # an option among them too
        return figures_of(run_dir)

    def row(self, name: str, work: Callable[[], dict[str, Any] | str], *, skip: str | None = None) -> None:
        """Run `work` as row `name` (its figures, or a note), unless `skip` says why not; record and print it."""
        row = Row(name)
        if skip is not None:
            row.note = skip
        else:
            began = time.monotonic()
            try:
                done = work()
                row.status = "ok"
                row.figures, row.note = (done, "") if isinstance(done, dict) else ({}, done)
            except Exception as error:  # noqa: BLE001 - a failed row is reported, and the next one runs
                row.status, row.note = "failed", f"{type(error).__name__}: {error}"
            row.seconds = time.monotonic() - began
        self.rows.append(row)
        self.write()
        print(line_of(row), flush=True)

    def write(self) -> None:
        report = {
            "benchmark": "gpu-check",
            "environment": environment(),
            "device": self.plan.device,
            "seconds": time.monotonic() - self.started,
            "rows": [asdict(row) for row in self.rows],
        }
        (self.out / "gpu-check.json").write_text(json.dumps(report, indent=2) + "\n")


def source_environment() -> dict[str, str]:
    """This environment, with scaleforge's source tree first on the path: the commands run without an install."""
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    source = str(Path(__file__).resolve().parents[2])  # src/
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [source, environment.get("PYTHONPATH")]))
    return environment


def figures_of(run_dir: Path) -> dict[str, Any]:
    """What a run's summary says about speed, FLOPs and memory."""
    summary = json.loads((run_dir / "summary.json").read_text())
    keep = ("steps", "samples_per_s", "tflops_per_s", "mfu", "peak_source", "flops_method", "precision", "device")
    keep += ("energy_j", "energy_source", "samples_per_j")  # NVML's counter on a GPU (docs/energy.md)
    figures = {key: summary[key] for key in keep if key in summary}
    memory = summary.get("memory_per_process") or [{}]
    if memory and isinstance(memory[0], dict) and "peak_mib" in memory[0]:
        figures["peak_mib"] = memory[0]["peak_mib"]
    return figures


def environment() -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpus": torch.cuda.device_count() if cuda else 0,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
    }


def line_of(row: Row) -> str:
    shown = json.dumps(row.figures) if row.figures else ""
    return f"{row.name:<24} {row.status:<8} {row.seconds:6.1f} s  {shown} {row.note}".rstrip()


def run_check(out: Path, plan: Plan) -> list[Row]:
    """Every row, in order (see the module)."""
    check = Check(out, plan)
    gpus = torch.cuda.device_count() if plan.device == "cuda" else 0
    bf16 = "training.precision=bf16-mixed" if plan.device == "cuda" else "training.precision=32"
    steps = f"training.max_steps={plan.steps}"
    check.row("mlp", lambda: check.train("mlp", steps, bf16))
    check.row("resnet18-bf16-compiled", lambda: check.train("resnet", steps, bf16, plan.compile, *plan.images))
    check.row("resume", lambda: resumed_like_straight(check, plan))
    check.row("async-checkpoints", lambda: async_checkpoints(check, plan))
    check.row("bench-overhead", lambda: bench_overhead(check, plan))
    gpt_steps = f"training.max_steps={plan.gpt_1b_steps}"
    check.row("gpt-1b", lambda: with_tokens(check.train("gpt-1b", gpt_steps, bf16, plan.compile, *plan.gpt_1b), plan))
    for strategy in ("ddp", "fsdp", "tp", "pp"):
        needs = None if gpus >= 2 or plan.device == "cpu" else "needs >= 2 GPUs"
        check.row(strategy, lambda s=strategy: two_processes(check, plan, s), skip=needs)
    check.row("bench-generate", lambda: bench_generate(check, plan))
    return check.rows


def with_tokens(figures: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """A language model's figures with its tokens/s (samples/s times its context)."""
    seq_len = next(int(o.split("=")[1]) for o in plan.gpt_1b if o.startswith("data.seq_len="))
    return {**figures, "tokens_per_s": figures.get("samples_per_s", 0.0) * seq_len}


def resumed_like_straight(check: Check, plan: Plan) -> str:
    """A run stopped by SIGTERM at step 15 and resumed ends with the weights of one that ran straight through."""
    overrides = [
        f"hardware.device={plan.device}", "training.max_steps=30", "checkpoint.every_steps=10", "logging.every_steps=1",
        "logging.progress=plain", "logging.plot=false", "model.dropout_rate=0.1",
    ]  # fmt: skip
    straight, stopped = check.out / "runs" / "straight", check.out / "runs" / "stopped"
    check.scaleforge("resume-straight", "train", *overrides, "--run-dir", str(straight))
    command = [check.python, "-m", "scaleforge", "train", *overrides, "--run-dir", str(stopped)]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=source_environment()
    )
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("step 15/"):
            process.send_signal(signal.SIGTERM)
            break
    process.communicate(timeout=ROW_LIMIT_S)
    if process.returncode != 128 + signal.SIGTERM:
        raise RuntimeError(f"the stopped run exited {process.returncode}, not {128 + signal.SIGTERM}")
    check.scaleforge("resume-resumed", "train", *overrides, "--run-dir", str(stopped))
    worst = largest_difference(straight, stopped)
    if worst != 0.0:
        raise RuntimeError(f"the resumed run's weights differ from the straight run's by up to {worst:g}")
    return "stopped at step 15 by SIGTERM, resumed: bitwise the weights of the straight run"


def async_checkpoints(check: Check, plan: Plan) -> dict[str, Any]:
    """Checkpoints written asynchronously every 10 steps; a new run started from the one of step 20 ends with the
    weights of the run that wrote it."""
    from scaleforge.training.checkpoint import list_checkpoints

    source, again = check.out / "runs" / "async", check.out / "runs" / "async-from-20"
    overrides = ["checkpoint.every_steps=10", "checkpoint.async=true", "training.max_steps=30", "checkpoint.keep=3"]
    figures = check.train("async", *overrides, run_dir=source)
    written = list_checkpoints(source / "checkpoints")
    if len(written) != 3:
        raise RuntimeError(f"expected 3 checkpoints, found {[path.name for path in written]}")
    step_20 = next(path for path in written if path.name.endswith("20"))
    check.train("async-from-20", *overrides, "--resume", str(step_20), run_dir=again)
    worst = largest_difference(source, again)
    if worst != 0.0:
        raise RuntimeError(f"started from step 20's checkpoint, the weights differ by up to {worst:g}")
    return {**figures, "checkpoints": [path.name for path in written], "from_step_20": "bitwise the same weights"}


def largest_difference(first: Path, second: Path) -> float:
    """The largest difference between two runs' final weights."""
    from safetensors.torch import load_file

    a, b = (load_file(str(run / "final" / "model.safetensors")) for run in (first, second))
    return max(float((a[name].float() - b[name].float()).abs().max()) for name in a)


def bench_overhead(check: Check, plan: Plan) -> dict[str, Any]:
    # a rehearsal runs each loop once, briefly: it checks the command, and its ratios on the CPU mean nothing here
    steps, repeats = ("300", "3") if plan.device == "cuda" else ("20", "1")
    result = check.scaleforge(
        "bench-overhead", "bench", "overhead", "--device", plan.device, "--steps", steps, "--repeats", repeats, "--json"
    )
    report = json.loads(result.stdout)
    return {f"{row['workload']} {row['loop']}": round(row["throughput_vs_plain"], 3) for row in report["results"]}


def two_processes(check: Check, plan: Plan, strategy: str) -> dict[str, Any]:
    """A small gpt on 2 processes with `strategy` (NCCL on GPUs, gloo on a CPU rehearsal)."""
    gpt = ["model.architecture=gpt", "model.n_layers=2", "model.d_model=128", "model.n_heads=4"]
    gpt += ["model.tie_embeddings=false", "data.kind=tokens", "data.seq_len=64", "data.vocab_size=256"]
    overrides = [*gpt, f"parallel.strategy={strategy}", f"training.max_steps={min(plan.steps, 50)}"]
    run_dir = check.out / "runs" / strategy
    base = [f"hardware.device={plan.device}", "data.dataset=synthetic", "logging.every_steps=10", "logging.plot=false"]
    check.scaleforge(strategy, "train", *base, *overrides, "--nproc", "2", "--run-dir", str(run_dir))
    return figures_of(run_dir)


def bench_generate(check: Check, plan: Plan) -> dict[str, Any]:
    """`scaleforge bench generate` on a small gpt trained on the docs, on the plan's device."""
    corpus = check.out / "corpus.txt"
    docs = Path(__file__).resolve().parents[3] / "docs"
    corpus.write_text(
        "\n".join(page.read_text() for page in sorted(docs.glob("*.md"))) or "the quick brown fox\n" * 500
    )
    run_dir = check.out / "runs" / "gpt-small"
    text = ["model.architecture=gpt", "data.dataset=text", f"data.path={corpus}", "data.seq_len=256"]
    check.train("gpt-small", f"training.max_steps={plan.steps}", "training.batch_size=32", *text, run_dir=run_dir)
    new, repeats = ("200", "2") if plan.device == "cuda" else ("16", "1")
    check.scaleforge(
        "bench-generate", "bench", "generate", str(run_dir), "--device", plan.device, "--prompt-tokens", "16",
        "--new-tokens", new, "--repeats", repeats, "--streams", "1,4", "--requests-per-stream", "2",
        "--server-max-tokens", "32", "--out", str(check.out / "bench-generate"),
    )  # fmt: skip
    result = json.loads((check.out / "bench-generate" / "generate.json").read_text())
    return {f"{row['part']}: {row['way']} x{row['streams']}": round(row["tokens_per_s"]) for row in result["rows"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu-check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu-check", help="where the JSON, logs and runs go (default gpu-check/)")
    parser.add_argument("--rehearse", action="store_true", help="run every row on the CPU, small: checks the script")
    args = parser.parse_args(argv)
    if args.rehearse:
        plan = Plan.rehearsal()
    elif not torch.cuda.is_available():
        print(f"no CUDA GPU here (torch {torch.__version__}): nothing to check; --rehearse runs the rows on the CPU")
        return 0
    else:
        plan = Plan.for_gpu()
    about = environment()
    print(f"gpu-check on {plan.device}: {json.dumps(about)}", flush=True)
    rows = run_check(Path(args.out), plan)
    failed = [row.name for row in rows if row.status == "failed"]
    print(f"{len(rows) - len(failed)} of {len(rows)} rows passed or skipped; JSON: {Path(args.out) / 'gpu-check.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
