"""`scaleforge search`: trials sampled by Optuna, each trained by `scaleforge train` in a process of its own.

One loop in this process asks the study for trials, starts up to `--jobs` of them (each `scaleforge train
TRIAL.yaml --run-dir ...`, on `--nproc` processes through the launcher when asked), reads each one's validation
metrics from its `metrics.jsonl` as they appear and reports them to the pruner, stops a pruned trial with
SIGTERM (the trainer's own clean stop), and tells the study each trial's objectives, measured on its finished
run directory. A trial is a normal run directory under the study's folder: it can be evaluated, compressed,
exported or served like any other.

Killing the search (Ctrl-C, SIGTERM) stops the running trials at their next step with a checkpoint and queues
them again; the same command continues the study, and a requeued trial resumes its own run directory. A trial
whose process fails is recorded as failed with its error, and the search goes on.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

import optuna
import yaml
from optuna.trial import TrialState

from scaleforge.config import RunConfig, build_config, config_data, config_from_dict
from scaleforge.console import counted
from scaleforge.distributed.launch import threads_per_process
from scaleforge.errors import ConfigError, UsageError
from scaleforge.processes import ORPHAN_GRACE_S, parent_environment
from scaleforge.search import report
from scaleforge.search.objectives import Objective, check_objectives, measure
from scaleforge.search.report import number_text, param_text
from scaleforge.search.space import check_space, read_space, trial_config
from scaleforge.search.study import (
    HEARTBEAT_S,
    StudyRecord,
    default_folder,
    default_storage,
    open_storage,
    open_study,
    progress,
    quiet_optuna,
    requeue,
    requeue_orphans,
    requeue_stale,
    trials_so_far,
    worker_attrs,
    write_study_file,
)
from scaleforge.training.signals import Interrupted
from scaleforge.training.status import run_state

POLL_S = 0.25
SAMPLERS = ("tpe", "random", "nsga2", "gp")
PRUNERS = ("auto", "median", "hyperband", "none")
STOP_GRACE_S = 120.0  # how long a stopped trial may take to write its checkpoint before it is killed


@dataclass(frozen=True)
class SearchOptions:
    """What `scaleforge search` was asked to do."""

    config: str | None
    overrides: tuple[str, ...]
    space: Path = field(metadata={"help": "the search space", "metavar": "SPACE.yaml"})
    objectives: tuple[Objective, ...]
    trials: int = field(default=20, metadata={"help": "trials in the study in all", "range": "positive"})
    jobs: int = field(default=1, metadata={"help": "trials at once, each its own process", "range": "positive"})
    nproc: int = field(
        default=1, metadata={"help": "processes per trial (the launcher's --nproc)", "range": "positive"}
    )
    study: str | None = field(default=None, metadata={"help": "the study's name (default: the config's name)"})
    storage: str | None = field(
        default=None,
        metadata={
            "help": "Optuna storage URL shared by every machine of the search (default: sqlite:///DIR/study.db)",
            "metavar": "URL",
        },
    )
    folder: Path | None = field(
        default=None,
        metadata={"help": "the study's folder, holding its trials (default: runs/search/<study>)", "flag": "--dir"},
    )
    timeout_s: float | None = field(
        default=None,
        metadata={"help": "start no trial after S seconds", "range": "positive", "flag": "--timeout", "metavar": "S"},
    )
    sampler: str = field(default="tpe", metadata={"help": "Optuna's sampler", "choices": SAMPLERS})
    pruner: str = field(
        default="auto",
        metadata={
            "help": "stops hopeless trials from their validation values; auto: median for one validation metric, "
            "none for several objectives",
            "choices": PRUNERS,
        },
    )
    pruner_startup: int = field(
        default=5,
        metadata={
            "help": "trials that finish before the median pruner stops any",
            "range": "non-negative",
            "metavar": "K",
        },
    )
    seed: int = field(default=0, metadata={"help": "the sampler's seed", "range": "non-negative"})

    def pruner_name(self) -> str:
        """`auto`: the median pruner for one validation metric; none for several objectives or a cost alone."""
        if self.pruner != "auto":
            return self.pruner
        return "median" if len(self.objectives) == 1 and not self.objectives[0].is_cost else "none"


@dataclass
class Slot:
    """A trial being trained."""

    trial: optuna.Trial
    values: dict[str, Any]
    run_dir: Path
    process: subprocess.Popen
    log: IO[str]
    started: float = field(default_factory=time.monotonic)
    reported_step: int = -1
    pruned_at: tuple[int, float] | None = None
    stopping: bool = False  # sent SIGTERM by the search itself, to requeue it
    device: int | None = None  # which trial-sized group of GPUs it has, when each trial gets its own


def run_search(options: SearchOptions) -> Path:
    """Run the search to its budget of trials; returns the study's folder (results, plots, best config)."""
    return Search(options).run()


class Search:
    def __init__(self, options: SearchOptions) -> None:
        check_objectives(options.objectives)
        self.options = options
        self.base, self.base_config = _base_config(options.config, options.overrides)
        self.space = read_space(options.space)
        check_space(self.space, self.base)
        self.name = options.study or self.base_config.name
        self.folder = options.folder or default_folder(self.name)
        pruner = options.pruner_name()
        if pruner != "none" and (len(options.objectives) > 1 or options.objectives[0].is_cost):
            raise UsageError(
                f"--pruner {pruner}: pruning judges one validation metric as it is reported; this search has "
                f"{', '.join(o.name for o in options.objectives)} (use --pruner none)"
            )
        self.pruning = pruner != "none"
        self.url = options.storage or default_storage(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        storage = open_storage(self.url)
        record = StudyRecord(
            objectives=options.objectives,
            config=Path(options.config).read_text(encoding="utf-8") if options.config else "",
            overrides=options.overrides,
            space=self.space.text(),
        )
        earlier_trials = trials_so_far(storage, self.name)
        if earlier_trials == 0:
            _check_no_earlier_trials(self.folder)
        sampler = _sampler(options, earlier_trials, shared=options.storage is not None)
        self.study, created = open_study(self.name, storage, record, sampler, _pruner(options))
        write_study_file(self.folder, self.name, self.url)
        if created:
            for values in self.space.enqueued:
                self.study.enqueue_trial(self.space.encode(values), skip_if_exists=True)
        self.threads = max(1, threads_per_process(options.jobs * options.nproc))
        self.slots: list[Slot] = []
        self.stop_signal: int | None = None
        self.deadline = time.monotonic() + options.timeout_s if options.timeout_s else None
        self.last_stale_check = time.monotonic()
        self.heartbeats = _Heartbeats(self.study)
        self.timed_out = False
        self.bar: Any = None  # a progress bar on a terminal; plain lines in logs
        self.bar_task: Any = None

    def say(self, line: str) -> None:
        if self.bar is not None:
            self.bar.console.print(line, highlight=False, markup=False)
        else:
            print(line, flush=True)

    def _update_bar(self, done: int | None = None) -> None:
        if self.bar is not None:
            self.bar.update(self.bar_task, running=len(self.slots), **({} if done is None else {"completed": done}))

    # ------------------------------------------------------------------------------------------- the loop

    def run(self) -> Path:
        options = self.options
        orphans = requeue_orphans(self.study)
        state = progress(self.study)
        what = ", ".join(o.spec() for o in options.objectives)
        threads = f"{counted(self.threads, 'thread')} {'per process' if options.nproc > 1 else 'each'}"
        print(
            f"search {self.name}: {state.done} of {options.trials} trials done, {options.jobs} at a time ({threads}) "
            f"| objectives {what} | study {self.url}"
        )
        if orphans:
            print(f"trials {', '.join(map(str, orphans))} were cut short by a search that is gone: they run again")
        with _stop_on_signals(self), _progress_bar(self, state.done), self.heartbeats:
            try:
                self._loop()
            except BaseException:
                self._stop_all()
                raise
        if self.stop_signal is not None:
            name = signal.Signals(self.stop_signal).name
            raise Interrupted(
                self.stop_signal,
                f"interrupted ({name}): the running trials stopped with a checkpoint and are queued again; run the "
                "same command to go on",
            )
        print()
        report.show(self.study, self.folder)
        return self.folder

    def _loop(self) -> None:
        while True:
            for slot in list(self.slots):
                self._watch(slot)
            self._requeue_stale()
            if self.stop_signal is not None:
                self._stop_all()
                return
            while len(self.slots) < self.options.jobs and self._may_start():
                self._start()
            if not self.slots:
                return
            time.sleep(POLL_S)

    def _may_start(self) -> bool:
        if not progress(self.study).may_start(self.options.trials):
            return False
        if self.deadline is not None and time.monotonic() >= self.deadline:
            if not self.timed_out:
                self.timed_out = True
                self.say(f"--timeout {self.options.timeout_s:g}s reached: no more trials start")
            return False
        return True

    def _requeue_stale(self) -> None:
        """Every heartbeat interval, as `Study.optimize` does before each trial: another machine's trials whose
        heartbeat stopped are failed and queued again, so that a machine that went down does not hold its
        trials (and its share of the budget) for ever."""
        if time.monotonic() - self.last_stale_check >= HEARTBEAT_S:
            self.last_stale_check = time.monotonic()
            requeue_stale(self.study)

    # ------------------------------------------------------------------------------------------ one trial

    def _start(self) -> None:
        with quiet_optuna():
            trial = self.study.ask()
        self.heartbeats.add(trial)
        for key, value in worker_attrs().items():
            trial.set_user_attr(key, value)
        # a requeued trial goes on in its own run directory, if that is on this machine
        requeued = "failed_trial" in self.study._storage.get_trial_system_attrs(trial._trial_id)
        here = trial.user_attrs.get("run_host") == socket.gethostname()
        earlier = trial.user_attrs.get("run_dir") if requeued and here else None
        run_dir = Path(earlier) if earlier else (self.folder / f"trial-{trial.number:04d}").resolve()
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("run_host", socket.gethostname())
        try:
            values = self.space.sample(lambda dimension: dimension.suggest(trial))
        except ValueError as error:  # a requeued trial's values that the space (changed since) no longer holds
            self._fail(trial, {}, run_dir, f"its parameters do not fit the space: {error}", time.monotonic())
            return
        try:
            sampled = trial_config(self.base, values)
            data = {"name": f"{self.name}-{trial.number:04d}", **{k: v for k, v in sampled.items() if k != "name"}}
            config_from_dict(data)
        except ConfigError as error:
            self._fail(trial, values, run_dir, error.one_line(), started=time.monotonic())
            return
        text = yaml.safe_dump(data, sort_keys=False, default_flow_style=None)
        trial.set_user_attr("config", text)
        run_dir.mkdir(parents=True, exist_ok=True)
        _wait_until_stopped(run_dir)
        (run_dir / "trial.yaml").write_text(text)
        if earlier and (run_dir / "final" / "model.safetensors").is_file() and (run_dir / "summary.json").is_file():
            self._complete(trial, values, run_dir, started=time.monotonic())  # trained before its search died
            return
        command = [sys.executable, "-m", "scaleforge", "train", str(run_dir / "trial.yaml"), "--run-dir", str(run_dir)]
        # a new trial never goes on from what a directory of the same name holds (the trainer refuses it)
        command += ["--resume", "auto" if earlier else "never"]
        if self.base_config.hardware.threads is None and "hardware.threads" not in values:
            command.append(f"hardware.threads={self.threads}")
            trial.set_user_attr("threads", self.threads)
        if self.options.nproc > 1:
            command += ["--nproc", str(self.options.nproc)]
        log = (run_dir / "train.log").open("a", encoding="utf-8")
        # SIGTERM when the search dies, however it dies: the trial checkpoints and stops, and a later search
        # requeues it into its run directory; killed if that takes more than ORPHAN_GRACE_S
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(self.threads)}
        env.update(parent_environment(signal.SIGTERM, grace_s=ORPHAN_GRACE_S))
        device = self._free_device()
        if device is not None:
            first = device * self.options.nproc
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(first + i) for i in range(self.options.nproc))
        # started from the search's main thread, which lives as long as it (the guard's signal follows the thread)
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        self.slots.append(Slot(trial, values, run_dir, process, log, device=device))
        self._update_bar()
        self.say(f"trial {trial.number} started: {describe(values)}")

    def _free_device(self) -> int | None:
        """With GPUs enough for every trial running at once, the group of `--nproc` GPUs no running trial has
        (CUDA_VISIBLE_DEVICES); None otherwise, when the trials share what they see."""
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (
            "CUDA_VISIBLE_DEVICES" in os.environ
            or self.options.jobs == 1
            or count < self.options.nproc * self.options.jobs
        ):
            return None
        taken = {slot.device for slot in self.slots}
        return min(set(range(self.options.jobs)) - taken)

    def _watch(self, slot: Slot) -> None:
        if self.pruning and slot.pruned_at is None:
            self._report(slot)
        code = slot.process.poll()
        if code is None:
            return
        slot.log.close()
        self.slots.remove(slot)
        self._finish(slot)

    def _finish(self, slot: Slot) -> None:
        """Tell the study how a trial whose process has ended went; one the search stopped itself is queued again."""
        code = slot.process.returncode
        if slot.pruned_at is not None:
            self._pruned(slot)
        elif code == 0 and (slot.run_dir / "final").is_dir():
            self._complete(slot.trial, slot.values, slot.run_dir, slot.started)
        elif slot.stopping:
            slot.trial.set_user_attr("error", "interrupted")
            requeue(self.study, self._tell(slot.trial, state=TrialState.FAIL))
        else:
            self._fail(slot.trial, slot.values, slot.run_dir, _error_of(slot.run_dir / "train.log", code), slot.started)

    def _report(self, slot: Slot) -> None:
        """Report each new validation value to the pruner; stop the trial (SIGTERM) when it says so."""
        metric = self.options.objectives[0].name
        for record in _records(slot.run_dir / "metrics.jsonl"):
            step = int(record.get("step", -1))
            if metric not in record or step <= slot.reported_step:
                continue
            try:
                slot.trial.report(float(record[metric]), step)
            except optuna.exceptions.UpdateFinishedTrialError:
                return  # failed by another machine that took it for gone: it is queued again there
            slot.reported_step = step
            if slot.trial.should_prune():
                slot.pruned_at = (step, float(record[metric]))
                slot.process.send_signal(signal.SIGTERM)
                return

    def _complete(self, trial: optuna.Trial, values: dict[str, Any], run_dir: Path, started: float) -> None:
        try:
            measured = measure(run_dir, self.options.objectives, self.threads)
        except ConfigError:
            self._tell(trial, state=TrialState.FAIL)
            raise  # a metric the runs do not report: every trial would miss it
        except Exception as error:  # a run directory the trial left damaged, a model that cannot be measured
            self._fail(trial, values, run_dir, f"measuring it failed: {type(error).__name__}: {error}", started)
            return
        unusable = [name for name, value in measured.items() if not math.isfinite(value)]
        if unusable:
            self._fail(trial, values, run_dir, f"{unusable[0]} is {measured[unusable[0]]}", started)
            return
        results = [measured[o.name] for o in self.options.objectives]
        self._tell(trial, results)
        _write_trial(run_dir, trial.number, "complete", values, measured)
        figures = " | ".join(f"{name} {number_text(value)}" for name, value in measured.items())
        self.say(f"trial {trial.number} finished in {time.monotonic() - started:.1f}s: {figures} [{self._count()}]")

    def _pruned(self, slot: Slot) -> None:
        assert slot.pruned_at is not None
        step, value = slot.pruned_at
        self._tell(slot.trial, state=TrialState.PRUNED)
        metric = self.options.objectives[0].name
        _write_trial(slot.run_dir, slot.trial.number, "pruned", slot.values, {metric: value})
        self.say(f"trial {slot.trial.number} pruned at step {step}: {metric} {number_text(value)} [{self._count()}]")

    def _fail(self, trial: optuna.Trial, values: dict[str, Any], run_dir: Path, error: str, started: float) -> None:
        trial.set_user_attr("error", error)
        self._tell(trial, state=TrialState.FAIL)
        if run_dir.is_dir():
            _write_trial(run_dir, trial.number, "failed", values, {}, error=error)
        took = time.monotonic() - started
        self.say(f"trial {trial.number} failed after {took:.1f}s: {error} [{self._count()}]")

    def _tell(self, trial: optuna.Trial, values: list[float] | None = None, state: TrialState | None = None) -> Any:
        """Tell the study a trial's end (unless another machine, taking it for gone, failed it first); its
        heartbeat stops."""
        self.heartbeats.discard(trial)
        return self.study.tell(trial, values, state=state, skip_if_finished=True)

    def _count(self) -> str:
        """`k/N done` after a trial ended, and the bar moved to it."""
        done = progress(self.study).done
        self._update_bar(done)
        return f"{done}/{self.options.trials} done"

    def _stop_all(self) -> None:
        """Stop the running trials with a checkpoint (SIGTERM) and queue them again, to resume their run
        directories when the search goes on; one that ended meanwhile is told as it ended."""
        for slot in self.slots:
            if slot.process.poll() is None:
                slot.stopping = True
                slot.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for slot in self.slots:
            try:
                slot.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                slot.process.kill()
                slot.process.wait()
            slot.log.close()
        slots, self.slots = self.slots, []
        for slot in slots:
            self._finish(slot)

    def kill_all(self) -> None:
        """A second Ctrl-C: the trials end now, without their checkpoint."""
        for slot in self.slots:
            if slot.process.poll() is None:
                slot.stopping = True
                slot.process.kill()


class _Heartbeats:
    """Records the heartbeat of each running trial in the storage from a thread of its own, so that a loop busy
    measuring a trial or waiting for one to stop never lets another machine take its trials for gone."""

    def __init__(self, study: optuna.Study) -> None:
        self.study = study
        self.trial_ids: set[int] = set()
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="search-heartbeats", daemon=True)

    def add(self, trial: optuna.Trial) -> None:
        self.study._storage.record_heartbeat(trial._trial_id)
        with self.lock:
            self.trial_ids.add(trial._trial_id)

    def discard(self, trial: optuna.Trial) -> None:
        with self.lock:
            self.trial_ids.discard(trial._trial_id)

    def _run(self) -> None:
        while not self.stopped.wait(HEARTBEAT_S / 2):
            with self.lock:
                trial_ids = list(self.trial_ids)
            for trial_id in trial_ids:
                self.study._storage.record_heartbeat(trial_id)

    def __enter__(self) -> _Heartbeats:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join()


# ------------------------------------------------------------------------------------------------- helpers


def _base_config(path: str | None, overrides: Sequence[str]) -> tuple[dict[str, Any], RunConfig]:
    """The base config's data (the file with the overrides set) and the config it loads to (the loader's own
    messages for a bad one)."""
    raw, origins = config_data(path, overrides)
    return raw, build_config(copy.deepcopy(raw), origins)


def _sampler(options: SearchOptions, existing_trials: int, *, shared: bool) -> optuna.samplers.BaseSampler:
    # A second command on the same study draws other numbers than the first did: the same seed would sample the
    # first trials' parameters again. Searches sharing a storage (other machines) may start together: each draws
    # its own numbers.
    seed = options.seed + 7919 * existing_trials
    if shared:
        seed += zlib.crc32(f"{socket.gethostname()}:{os.getpid()}".encode())
    with quiet_optuna():
        if options.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if options.sampler == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed)
        if options.sampler == "gp":
            return optuna.samplers.GPSampler(seed=seed)
        # group: conditional keys (an architecture's own parameters) are modelled with the choice they hang on
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True)


def _pruner(options: SearchOptions) -> optuna.pruners.BasePruner:
    name = options.pruner_name()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=options.pruner_startup)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource="auto")
    return optuna.pruners.NopPruner()


def describe(values: dict[str, Any]) -> str:
    """`architecture=mlp hidden_layers=[64] learning_rate=0.0012`: each key by its last part."""
    return " ".join(f"{key.rsplit('.', 1)[-1]}={param_text(value)}" for key, value in values.items())


def _records(path: Path) -> Iterator[dict[str, Any]]:
    """The complete lines of a metrics file being written (a resumed run rewrites it, so it is read whole)."""
    try:
        text = path.read_text()
    except OSError:
        return
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # the line being written
        if isinstance(record, dict):
            yield record


def _error_of(log: Path, code: int) -> str:
    """The trainer's one-line error from its log, else the last line of its traceback."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        lines = []
    kinds = ("error:", "config error:", "data error:", "usage error:")
    for line in reversed(lines):
        if line.startswith(kinds):
            return line
    last = lines[-1] if lines else "no output"
    return f"exited with code {code}: {last}"[:500]


def _write_trial(
    run_dir: Path, number: int, state: str, values: dict[str, Any], measured: dict[str, float], **extra: Any
) -> None:
    record = {"trial": number, "state": state, "params": values, "values": measured, **extra}
    (run_dir / "trial.json").write_text(json.dumps(record, indent=1) + "\n")


def _check_no_earlier_trials(folder: Path) -> None:
    """A study starting afresh in a folder that holds another study's trials (its database removed, say) would
    give its new trials their run directories."""
    earlier = sorted(p.name for p in folder.glob("trial-*") if any((p / n).exists() for n in ("final", "checkpoints")))
    if earlier:
        named = ", ".join(earlier[:3]) + (", ..." if len(earlier) > 3 else "")
        raise UsageError(
            f"{folder} holds the trials of an earlier study ({named}) that this study does not know; remove them or "
            "choose another --dir"
        )


def _wait_until_stopped(run_dir: Path) -> None:
    """A requeued trial's run directory may still be written by its earlier process, stopping on the SIGTERM its
    killed search left it (`parent_environment`): wait for it to finish its checkpoint."""
    deadline = time.monotonic() + STOP_GRACE_S
    while run_state(run_dir) == "running" and time.monotonic() < deadline:
        time.sleep(POLL_S)


@contextlib.contextmanager
def _progress_bar(search: Search, done: int) -> Iterator[None]:
    """On a terminal, a bar of the study's finished trials below the lines of each trial."""
    if not sys.stdout.isatty():
        yield
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [
        TextColumn("search"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("trials | {task.fields[running]} running"),
    ]
    with Progress(*columns, TimeElapsedColumn(), transient=True) as bar:
        search.bar = bar
        search.bar_task = bar.add_task("search", total=search.options.trials, completed=done, running=0)
        try:
            yield
        finally:
            search.bar = None


class _stop_on_signals:
    """SIGINT and SIGTERM ask the loop to stop the trials and queue them again; a second one kills them at once
    (they are queued again all the same, to start over from their last checkpoint)."""

    def __init__(self, search: Search) -> None:
        self.search = search
        self.previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.search.stop_signal is not None:
            self.search.kill_all()
            return
        self.search.stop_signal = signum

    def __enter__(self) -> None:
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
