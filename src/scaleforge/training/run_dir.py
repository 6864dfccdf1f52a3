"""A training run's directory: its default name, the refusal to write over another run, and the checkpoint a run
resumes from. Kept apart from the trainer so that the launcher, which checks these before it starts any worker,
does not import what only the workers use (the parallelisms, the loop)."""

from __future__ import annotations

import warnings
from datetime import datetime
from pathlib import Path

from scaleforge.config import RunConfig
from scaleforge.errors import ScaleforgeWarning, UsageError
from scaleforge.runs import verify_final
from scaleforge.training.checkpoint import checked_checkpoint, newest_good_checkpoint
from scaleforge.training.status import read_status, run_state, wait_for_ending_run


def check_run_dir(run_dir: Path) -> None:
    """A run directory that already holds a run's results is refused, never overwritten."""
    earlier = [name for name in ("final", "checkpoints", "metrics.jsonl") if (run_dir / name).exists()]
    if earlier:
        raise UsageError(f"{run_dir} already holds a run ({', '.join(earlier)}); choose another --run-dir or remove it")


def default_run_dir(config: RunConfig) -> Path:
    """`runs/<name>-<time>`."""
    return Path("runs") / f"{config.name}-{datetime.now():%Y%m%d-%H%M%S}"


def resume_point(
    run_dir: Path, resume: str, signing_key: bytes | None = None, *, restarted: bool = False
) -> Path | None:
    """The checkpoint to resume from: `resume` itself (a checkpoint's path, checked), the newest good one of
    `run_dir` (`auto`), or none (`never`, or `auto` with none there, when `run_dir` must hold no other run, unless
    the workers were `restarted`: what it holds is their own first attempt's, which starts over).
    Damaged checkpoints (and, with `signing_key`, unsigned or wrongly signed ones) are reported as warnings and
    passed over. A run is finished when its `final/` exists: it is renamed into place once complete."""
    if (run_dir / "final").exists():
        try:
            verify_final(run_dir)
        except UsageError as damaged:  # not finished after all: trained again from its newest checkpoint
            warnings.warn(f"{damaged}; the run resumes from its newest checkpoint", ScaleforgeWarning, stacklevel=2)
        else:
            raise UsageError(f"{run_dir} already holds a finished run; choose another --run-dir or remove it")
    wait_for_ending_run(run_dir)  # the same command run again right after its launcher was killed
    if run_state(run_dir) == "running":
        status = read_status(run_dir)
        raise UsageError(
            f"{run_dir} is being trained now (process {status.get('pid')} on {status.get('host')}); choose another "
            "--run-dir"
        )
    if resume not in ("auto", "never"):
        return checked_checkpoint(Path(resume), signing_key)
    checkpoint = newest_good_checkpoint(run_dir / "checkpoints", signing_key=signing_key) if resume == "auto" else None
    if checkpoint is None and not restarted:
        check_run_dir(run_dir)
    return checkpoint
