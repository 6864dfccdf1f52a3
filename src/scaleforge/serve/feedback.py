"""Online outcomes of a model repository's versions, for A/B tests: what each answer predicted, kept under its
request id until its outcome comes back (`POST /v1/feedback`), and each version's running sums (`abtest`).

`Feedback.answered` records an answer (the version, and each instance's predicted class when the model
classifies) under a new request id; a shadow version's answer to the same request is recorded beside it
(`shadowed`). `Feedback.outcome` takes the true label(s) or a numeric reward for a request id once: a label
scores the version that answered, and the shadow when it answered too; a reward counts for the answering
version only (a shadow's answer was never shown, so nothing was rewarded for it). Answers are kept for the most
recent `capacity` requests; an outcome for an older one, or for an id never given, is refused.

`Feedback.report` is the A/B report of one model's versions (`abtest.ab_report`); its sequential state is kept
between looks, so that the always-valid p-values hold however often the report is read.

With a `log` (`scaleforge serve --feedback-log FILE`), every request answered and every outcome taken is also
appended to it as one JSON line, `{"event": "request" | "label" | "reward", "model", "version", ...}`, from
which `replay` gives the same outcomes again (`scaleforge ab report LOG`, off the server).
"""

from __future__ import annotations

import collections
import contextlib
import json
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from scaleforge.errors import UsageError
from scaleforge.serve.abtest import ABReport, Metric, SequentialState, VersionOutcomes, ab_report

DEFAULT_CAPACITY = 100_000  # answers kept for their outcomes (about 200 bytes each)


class FeedbackError(Exception):
    """An outcome that cannot be taken: `status` 404 (unknown or expired request id), 409 (given already) or 422."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Answer:
    """A request's answer as its outcome will be scored: the model, the version that answered, each instance's
    predicted class (None where the output is not a class), and the shadow's version and predictions."""

    model: str
    version: int
    predicted: list[int | None]
    class_names: Sequence[str] | None = None
    shadow: tuple[int, list[int | None]] | None = None
    scored: bool = False


@dataclass
class Feedback:
    """The answers awaiting outcomes and every version's outcomes so far (see the module)."""

    capacity: int = DEFAULT_CAPACITY
    _answers: collections.OrderedDict[str, Answer] = field(default_factory=collections.OrderedDict)
    _outcomes: dict[str, dict[int, VersionOutcomes]] = field(default_factory=dict)
    _states: dict[str, SequentialState] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    log: TextIO | None = None  # where every request and outcome is appended as a JSON line

    def answered(
        self, model: str, version: int, outputs: Sequence[Any], class_names: Sequence[str] | None = None
    ) -> str:
        """Record an answer of `version` of `model` (its `outputs`, one per instance); its new request id."""
        request_id = uuid.uuid4().hex
        with self._lock:
            self._versions(model, version).add_request()
            self._write({"event": "request", "model": model, "version": version})
            self._answers[request_id] = Answer(model, version, _classes(outputs), class_names)
            while len(self._answers) > self.capacity:
                self._answers.popitem(last=False)
        return request_id

    def shadowed(self, request_id: str, version: int, outputs: Sequence[Any]) -> None:
        """Record the shadow `version`'s answer to the request `request_id` (dropped if it has expired)."""
        with self._lock:
            answer = self._answers.get(request_id)
            if answer is not None:
                self._versions(answer.model, version).add_request()
                self._write({"event": "request", "model": answer.model, "version": version})
                answer.shadow = (version, _classes(outputs))

    def outcome(self, request_id: str, label: Any = None, reward: float | None = None) -> Answer:
        """Score the request `request_id` with its true `label` (one per instance: a class index or name, or a
        list of them) or its `reward`; the answer it scored. `FeedbackError` says why one cannot be taken."""
        if (label is None) == (reward is None):
            raise FeedbackError(422, "give the request's true label (or labels) or its reward, one of them")
        with self._lock:
            answer = self._answers.get(request_id)
            if answer is None:
                raise FeedbackError(404, f"no answer with request_id {request_id!r} is waiting for its outcome")
            if answer.scored:
                raise FeedbackError(409, f"request {request_id} has its outcome already")
            if reward is not None:
                self._reward(answer.model, answer.version, float(reward))
            else:
                labels = _labels(label, len(answer.predicted), answer.class_names)
                if any(predicted is None for predicted in answer.predicted):
                    raise FeedbackError(422, "this model's answers are not classes: give a reward instead")
                self._label(
                    answer.model, answer.version, [p == true for p, true in zip(answer.predicted, labels, strict=True)]
                )
                if answer.shadow is not None:
                    version, predictions = answer.shadow
                    self._label(answer.model, version, [p == true for p, true in zip(predictions, labels, strict=True)])
            answer.scored = True
            return answer

    def outcomes(self, model: str) -> dict[int, VersionOutcomes]:
        """Each version's outcomes so far (copies)."""
        with self._lock:
            return {version: VersionOutcomes(**vars(sums)) for version, sums in self._outcomes.get(model, {}).items()}

    def report(
        self,
        model: str,
        versions: Sequence[int] = (),
        *,
        metric: Metric | None = None,
        control: int | None = None,
        mde: float | None = None,
    ) -> ABReport:
        """The A/B report of `model`'s versions at this look, `versions` among them with no outcome yet if so (a
        `UsageError` when it cannot be made)."""
        outcomes = {str(version): VersionOutcomes() for version in versions}
        outcomes |= {str(version): sums for version, sums in self.outcomes(model).items()}
        with self._lock:
            state = self._states.get(model)
        report = ab_report(
            outcomes, metric=metric, control=None if control is None else str(control), mde=mde, state=state
        )
        with self._lock:
            self._states[model] = report.state
        return report

    def _versions(self, model: str, version: int) -> VersionOutcomes:
        return self._outcomes.setdefault(model, {}).setdefault(version, VersionOutcomes())

    def _label(self, model: str, version: int, right: list[bool]) -> None:
        for each in right:
            self._versions(model, version).add_label(each)
        self._write({"event": "label", "model": model, "version": version, "right": right})

    def _reward(self, model: str, version: int, reward: float) -> None:
        self._versions(model, version).add_reward(reward)
        self._write({"event": "reward", "model": model, "version": version, "reward": reward})

    def _write(self, event: dict[str, Any]) -> None:
        if self.log is not None:
            self.log.write(json.dumps({"time": round(time.time(), 3), **event}) + "\n")
            self.log.flush()


def replay(
    lines: Iterable[str],
    model: str | None = None,
    *,
    look_every: int = 100,
    metric: Metric | None = None,
    control: int | None = None,
    mde: float | None = None,
) -> tuple[Feedback, str]:
    """The outcomes of a feedback log (its `lines`) for `model` (default: the only model in it), with the A/B
    report looked at every `look_every` of its outcomes (with `metric`, `control` and `mde`), as a server would
    have been asked, so that the always-valid p-values run over those looks; the `Feedback` holding them (its
    `report` the last look), and the model's name. A `UsageError` says in one line what is wrong with the log."""
    feedback, models, since_look = Feedback(), set(), 0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            event = read_event(line)
        except ValueError as error:
            raise UsageError(f"line {number} of the feedback log is not an event ({error})") from None
        kind, name, version = event["event"], str(event["model"]), int(event["version"])
        models.add(name)
        if model is not None and name != model:
            continue
        sums = feedback._versions(name, version)
        if kind == "request":
            sums.add_request()
        elif kind == "label":
            for right in event["right"]:
                sums.add_label(bool(right))
            since_look += 1
        else:
            sums.add_reward(float(event["reward"]))
            since_look += 1
        if since_look >= look_every:
            since_look = 0
            with contextlib.suppress(UsageError):  # too early for a report (the control has no outcome yet)
                feedback.report(name, metric=metric, control=control, mde=mde)
    if model is None:
        if len(models) != 1:
            raise UsageError(f"the feedback log holds the models {sorted(models)}: say which with --model")
        model = models.pop()
    elif model not in models:
        raise UsageError(f"the feedback log holds no outcome of {model!r} (it holds {sorted(models)})")
    return feedback, model


def _classes(outputs: Sequence[Any]) -> list[int | None]:
    """Each output's predicted class (`top_class`), None where it has none."""
    return [output.get("top_class") if isinstance(output, Mapping) else None for output in outputs]


def _labels(label: Any, count: int, class_names: Sequence[str] | None) -> list[int]:
    """`label` as one class index per instance: an index or a class name, or a list of `count` of them."""
    labels = label if isinstance(label, list) else [label]
    if len(labels) != count:
        raise FeedbackError(422, f"label: the request had {count} instances, so give {count} labels, not {len(labels)}")
    indices = []
    for each in labels:
        if isinstance(each, bool) or not isinstance(each, int | str):
            raise FeedbackError(422, f"label: {each!r} is neither a class index nor a class name")
        if isinstance(each, str):
            if class_names is None or each not in class_names:
                raise FeedbackError(422, f"label: {each!r} is not one of the model's class names")
            each = list(class_names).index(each)
        indices.append(each)
    return indices


def read_event(line: str) -> dict[str, Any]:
    """One line of a feedback log as its event; a `ValueError` saying, in a few words, why it is not one."""
    try:
        event = json.loads(line)
        kind, _, _ = event["event"], str(event["model"]), int(event["version"])
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(type(error).__name__) from None
    if kind == "request" or (kind == "label" and isinstance(event.get("right"), list)):
        return event
    if kind == "reward" and isinstance(event.get("reward"), int | float) and not isinstance(event["reward"], bool):
        return event
    raise ValueError(line.strip()[:80])
