"""The study a search lives in: Optuna's storage (an SQLite file by default, any database URL Optuna takes), what
the study records about itself, how many trials it still owes, and trials whose search process died.

Several machines join one study by giving the same `--storage` URL: each asks the storage for its next trial,
as Optuna's own distributed optimisation does. A trial's search process records a heartbeat in the storage; a
trial whose heartbeat stops (its machine went down) is failed and queued again, with its run directory, by the
first search that notices (as Optuna's `RetryHeartbeatStaleTrialCallback` does). On this machine, a trial whose search
process is gone is known at once and queued again without waiting for its heartbeat to go stale.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from scaleforge.errors import ConfigError, ScaleforgeWarning, UsageError, first_line
from scaleforge.search.objectives import Objective, parse_objective
from scaleforge.training.status import process_alive, process_start_time

STUDY_FILE = "study.json"  # in the study folder: the study's name and storage, for `search show FOLDER`
HEARTBEAT_S = 10
GRACE_S = 60
ATTRS = "scaleforge"  # the study's user attribute holding what the search was started with
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)

optuna.logging.set_verbosity(optuna.logging.WARNING)  # a line per trial is ours to print


@contextlib.contextmanager
def quiet_optuna() -> Iterator[None]:
    """Without Optuna's warnings about the experimental parts used here (heartbeats, requeueing), and about a
    heartbeat outside `Study.optimize` (the search records each trial's heartbeat itself, as it would)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        yield


@dataclass(frozen=True)
class StudyRecord:
    """What a search was started with, kept in the study so that a second command can tell it is the same."""

    objectives: tuple[Objective, ...]
    config: str  # the base config file's text, or '' for the embedded default
    overrides: tuple[str, ...]
    space: str

    def to_json(self) -> dict[str, Any]:
        return {
            "objectives": [o.spec() for o in self.objectives],
            "config": self.config,
            "overrides": list(self.overrides),
            "space": self.space,
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> StudyRecord:
        return StudyRecord(
            objectives=tuple(parse_objective(spec) for spec in data["objectives"]),
            config=data.get("config", ""),
            overrides=tuple(data.get("overrides", ())),
            space=data.get("space", ""),
        )


def default_folder(name: str) -> Path:
    """Where study `name` keeps its trials (and its SQLite database) by default."""
    return Path("runs") / "search" / name


def default_storage(folder: Path) -> str:
    return f"sqlite:///{(folder / 'study.db').resolve()}"


def open_storage(url: str, *, create: bool = True) -> RDBStorage:
    """Optuna's database storage at `url`, with heartbeats; one that cannot be opened is a `UsageError`, and so is
    an SQLite file that is not there unless `create`."""
    database = url.removeprefix("sqlite:///")
    if not create and url.startswith("sqlite:///") and not Path(database).is_file():
        raise UsageError(f"{database}: the study's database is not there")
    try:
        with quiet_optuna():
            return RDBStorage(
                url,
                heartbeat_interval=HEARTBEAT_S,
                grace_period=GRACE_S,
                heartbeat_stale_trial_callback=requeue,
            )
    except ImportError as error:
        raise UsageError(f"--storage {url}: its database driver is not installed ({error})") from error
    except Exception as error:  # SQLAlchemy's many errors for a bad URL or a database it cannot reach
        raise UsageError(f"--storage {url}: cannot be opened: {first_line(error)}") from error


def trials_so_far(storage: RDBStorage, name: str) -> int:
    """How many trials study `name` holds (0 when there is no such study yet)."""
    try:
        return storage.get_n_trials(storage.get_study_id_from_name(name))
    except KeyError:
        return 0


def open_study(
    name: str,
    storage: RDBStorage,
    record: StudyRecord,
    sampler: optuna.samplers.BaseSampler,
    pruner: optuna.pruners.BasePruner,
) -> tuple[optuna.Study, bool]:
    """The study `name`, created if it is new (then True); an existing one must optimise the same objectives."""
    existing = {summary.study_name for summary in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    directions = [objective.direction for objective in record.objectives]
    if name in existing:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
        earlier = study_record(study)
        if [o.spec() for o in earlier.objectives] != [o.spec() for o in record.objectives]:
            raise ConfigError(
                f"--study {name}: the study optimises {', '.join(o.spec() for o in earlier.objectives)}, not "
                f"{', '.join(o.spec() for o in record.objectives)}; give its objectives or another --study"
            )
        for what, before, now in (("config", earlier.config, record.config), ("space", earlier.space, record.space)):
            if before != now:
                warnings.warn(f"the {what} has changed since study {name} began", ScaleforgeWarning, stacklevel=2)
        if list(earlier.overrides) != list(record.overrides):
            warnings.warn(f"the overrides differ from those study {name} began with", ScaleforgeWarning, stacklevel=2)
        return study, False
    study = optuna.create_study(
        study_name=name, storage=storage, directions=directions, sampler=sampler, pruner=pruner, load_if_exists=True
    )
    study.set_user_attr(ATTRS, record.to_json())
    return study, True


def load_existing(name: str | None, storage: RDBStorage, url: str) -> optuna.Study:
    """A study made by `scaleforge search`, for `search show`."""
    names = [summary.study_name for summary in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    if name is None:
        if len(names) != 1:
            raise UsageError(f"{url} holds {len(names)} studies ({', '.join(names) or 'none'}); name one with --study")
        name = names[0]
    if name not in names:
        raise UsageError(f"{url} holds no study '{name}'; it holds {', '.join(names) or 'none'}")
    study = optuna.load_study(study_name=name, storage=storage)
    study_record(study)
    return study


def study_record(study: optuna.Study) -> StudyRecord:
    data = study.user_attrs.get(ATTRS)
    if not isinstance(data, dict):
        raise UsageError(f"study '{study.study_name}' was not made by scaleforge search")
    return StudyRecord.from_json(data)


def write_study_file(folder: Path, name: str, url: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / STUDY_FILE).write_text(json.dumps({"study": name, "storage": url}, indent=1) + "\n")


def read_study_file(folder: Path) -> tuple[str, str]:
    try:
        data = json.loads((folder / STUDY_FILE).read_text())
        return str(data["study"]), str(data["storage"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UsageError(f"{folder / STUDY_FILE} cannot be read: {error}") from error


# ----------------------------------------------------------------------------------------- the trial budget


@dataclass(frozen=True)
class Progress:
    """Where the study stands against its budget of trials."""

    done: int  # complete, pruned or failed, leaving out failures queued again
    running: int  # on any machine
    retries: int  # failed by an interruption and waiting to run again

    def may_start(self, budget: int) -> bool:
        return self.retries > 0 or self.done + self.running < budget


def progress(study: optuna.Study) -> Progress:
    trials = study.get_trials(deepcopy=False)
    retried = requeued_numbers(trials)
    done = sum(1 for t in trials if t.state in FINISHED and t.number not in retried)
    running = sum(1 for t in trials if t.state == TrialState.RUNNING)
    retries = sum(1 for t in trials if t.state == TrialState.WAITING and "failed_trial" in t.system_attrs)
    return Progress(done, running, retries)


def requeued_numbers(trials: list[FrozenTrial]) -> set[int]:
    """The trials that failed by an interruption and were queued again as later trials (`requeue`)."""
    return {number for trial in trials for number in trial.system_attrs.get("retry_history", ())}


# ------------------------------------------------------------------------------------ who runs the trials


def worker_attrs() -> dict[str, Any]:
    """Recorded on each trial: the search process running it, so that another can tell when it is gone."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "process_started": process_start_time(os.getpid())}


WORKER_ATTRS = ("host", "pid", "process_started")


def requeue(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue a failed trial again with its parameters and run directory (which it resumes from), as Optuna's
    `RetryHeartbeatStaleTrialCallback` does (the same `failed_trial` and `retry_history` records), without the
    search process that ran it: until another takes it, no search may take it for its own and judge it."""
    system_attrs = {"failed_trial": trial.number, "retry_history": [], **trial.system_attrs}
    system_attrs["retry_history"] = [*system_attrs["retry_history"], trial.number]
    user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in (*WORKER_ATTRS, "error")}
    study.add_trial(
        optuna.create_trial(
            state=TrialState.WAITING,
            params=trial.params,
            distributions=trial.distributions,
            user_attrs=user_attrs,
            system_attrs=system_attrs,
        )
    )


def requeue_orphans(study: optuna.Study) -> list[int]:
    """Fail and queue again the running trials whose search process on this machine has gone (killed); trials of
    other machines are left to the heartbeat. Returns their numbers."""
    host = socket.gethostname()
    orphans = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = trial.user_attrs
        if attrs.get("host") != host or "pid" not in attrs:  # another machine's, or being taken right now
            continue
        if process_alive(attrs["pid"], attrs.get("process_started")):
            continue
        try:
            failed = study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another search failed it first
        if failed:
            requeue(study, study._storage.get_trial(trial._trial_id))
            orphans.append(trial.number)
    requeue_stale(study)
    return orphans


def requeue_stale(study: optuna.Study) -> None:
    """Fail and queue again the running trials (of any machine) whose heartbeat stopped `GRACE_S` ago."""
    with quiet_optuna():
        optuna.storages.fail_stale_trials(study)
