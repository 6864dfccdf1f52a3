"""The search space: a YAML file that maps dotted config keys to distributions, read, checked and sampled.

```yaml
model.architecture: {choice: [mlp, cnn]}
model.hidden_layers: {choice: [[64], [128, 64]], when: {model.architecture: mlp}}
model.channels: {choice: [[8, 16], [16, 32]], when: {model.architecture: cnn}}
model.dropout_rate: {uniform: [0.0, 0.4]}
training.learning_rate: {log_uniform: [1.0e-4, 1.0e-2]}
enqueue:                                  # trials to run first (the seed config's own values, say)
  - {model.architecture: mlp, model.hidden_layers: [64], model.dropout_rate: 0.1, training.learning_rate: 0.001}
```

Distributions: `choice` (any YAML values, lists included), `uniform` and `log_uniform` (floats), `int` and
`log_int` (integers); `uniform` and `int` take a `step`. `when` makes a key apply only while an earlier choice
has one of the given values. A trial's config is the base config with the sampled values set; a sampled component
name (`model.architecture`, `training.optimizer`, ...) drops the base config's parameters that the chosen
component does not take, so `model.architecture: cnn` over an MLP config does not inherit its `hidden_layers`.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scaleforge.config import apply_override, component_keys, config_from_dict, read_yaml, signature_of
from scaleforge.errors import ConfigError, did_you_mean, one_of

KINDS = ("choice", "uniform", "log_uniform", "int", "log_int")
OPTIONS = ("when", "step")
ENQUEUE = "enqueue"
# The keys that name a component: its registry, the keys beside its parameters, whether they sit in the section.
COMPONENT_KEYS = component_keys()
MAX_CHECKED_COMBINATIONS = 256


@dataclass(frozen=True)
class Dimension:
    """One key of the space: its distribution and the choices it depends on."""

    key: str
    kind: str
    where: str  # file:line, for messages
    choices: tuple[Any, ...] = ()
    low: float = 0.0
    high: float = 0.0
    step: float | None = None
    when: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)

    @property
    def encoded(self) -> bool:
        """Choices Optuna cannot store as they are (lists, mappings) are stored as their JSON text."""
        return any(not (value is None or isinstance(value, bool | int | float | str)) for value in self.choices)

    def encode(self, value: Any) -> Any:
        return json.dumps(value, sort_keys=True) if self.encoded else value

    def decode(self, value: Any) -> Any:
        return json.loads(value) if self.encoded else value

    def suggest(self, trial: Any) -> Any:
        """This key's value for an Optuna trial (fixed already for enqueued and retried trials)."""
        if self.kind == "choice":
            return self.decode(trial.suggest_categorical(self.key, [self.encode(c) for c in self.choices]))
        if self.kind in ("int", "log_int"):
            step = int(self.step or 1)
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=step, log=self.kind == "log_int")
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.kind == "log_uniform")

    def contains(self, value: Any) -> bool:
        if self.kind == "choice":
            return any(_same(value, choice) for choice in self.choices)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.kind in ("int", "log_int") and not isinstance(value, int):
            return False
        return self.low <= value <= self.high

    def extremes(self) -> list[Any]:
        """The values the up-front check tries: every choice, or both ends of a range."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind in ("int", "log_int"):
            return [int(self.low), int(self.high)]
        return [self.low, self.high]

    def describe(self) -> str:
        if self.kind == "choice":
            return f"one of {', '.join(json.dumps(c) for c in self.choices)}"
        step = f" in steps of {self.step:g}" if self.step else ""
        return f"{self.kind} from {self.low:g} to {self.high:g}{step}"


@dataclass(frozen=True)
class SearchSpace:
    """The dimensions of a space file, in file order (conditions refer to keys above them)."""

    path: Path
    dimensions: tuple[Dimension, ...]
    enqueued: tuple[dict[str, Any], ...] = ()

    def sample(self, suggest: Callable[[Dimension], Any]) -> dict[str, Any]:
        """Values for the keys that apply, given `suggest(dimension)` (an Optuna trial's suggestions)."""
        values: dict[str, Any] = {}
        for dimension in self.dimensions:
            if _applies(dimension, values):
                values[dimension.key] = suggest(dimension)
        return values

    def encode(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """A trial's values as Optuna stores them (for `enqueue_trial`)."""
        by_key = {d.key: d for d in self.dimensions}
        return {key: by_key[key].encode(value) for key, value in values.items()}

    def text(self) -> str:
        return self.path.read_text(encoding="utf-8")


def read_space(path: str | Path) -> SearchSpace:
    """Read and check a space file; a mistake is a `ConfigError` naming the file, line and key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--space: file not found: {path}")
    data, origins = read_yaml(path)
    if not data:
        raise ConfigError(f"{path}: the space is empty; map dotted config keys to distributions")
    dimensions: list[Dimension] = []
    for key, spec in data.items():
        if key == ENQUEUE:
            continue
        where = origins.get(str(key), str(path))
        dimensions.append(_dimension(str(key), spec, where, {d.key: d for d in dimensions}))
    if not dimensions:
        raise ConfigError(f"{path}: the space has no keys to search, only '{ENQUEUE}'")
    enqueued = _enqueued({d.key: d for d in dimensions}, data.get(ENQUEUE), origins.get(ENQUEUE, str(path)))
    return SearchSpace(path, tuple(dimensions), enqueued)


def _dimension(key: str, spec: Any, where: str, earlier: Mapping[str, Dimension]) -> Dimension:
    def fail(message: str) -> ConfigError:
        return ConfigError(f"{where}: {key}: {message}")

    if "." not in key and key not in ("seed",):
        raise fail("expected a dotted config key such as training.learning_rate")
    if not isinstance(spec, dict):
        raise fail(f"expected a distribution such as {{uniform: [0, 0.5]}}; {one_of(KINDS)}")
    kinds = [name for name in spec if name in KINDS]
    unknown = [name for name in spec if name not in KINDS and name not in OPTIONS]
    if unknown:
        raise fail(f"unknown '{unknown[0]}'{did_you_mean(str(unknown[0]), [*KINDS, *OPTIONS])}; {one_of(KINDS)}")
    if len(kinds) != 1:
        raise fail(f"give exactly one distribution, got {', '.join(kinds) or 'none'}; {one_of(KINDS)}")
    kind = kinds[0]
    value = spec[kind]
    when = _condition(spec.get("when"), fail, earlier)
    step = spec.get("step")
    if step is not None and (kind not in ("uniform", "int") or not _number(step) or step <= 0):
        raise fail("'step' is a positive number, for uniform and int only")
    if step is not None and kind == "int" and not isinstance(step, int):
        raise fail(f"int takes a whole 'step', got {step}")
    if kind == "choice":
        if not isinstance(value, list) or not value:
            raise fail("choice needs a non-empty list of values")
        try:
            if len({json.dumps(v, sort_keys=True) for v in value}) != len(value):
                raise fail("choice lists a value twice")
        except TypeError as error:  # a YAML date or other value a config cannot hold
            raise fail(f"choice holds a value that is not plain data: {error}") from error
        return Dimension(key, kind, where, choices=tuple(value), when=when)
    if not isinstance(value, list) or len(value) != 2 or not all(_number(v) for v in value):
        raise fail(f"{kind} needs [low, high], two numbers, got {value!r}")
    low, high = value
    if kind in ("int", "log_int") and not all(isinstance(v, int) for v in value):
        raise fail(f"{kind} needs whole numbers, got {value!r}")
    if low >= high:
        raise fail(f"the range [{low}, {high}] is empty: low must be below high")
    if kind in ("log_uniform", "log_int") and low <= 0:
        raise fail(f"{kind} needs a positive low end, got {low}")
    return Dimension(key, kind, where, low=low, high=high, step=step, when=when)


def _condition(
    spec: Any, fail: Callable[[str], ConfigError], earlier: Mapping[str, Dimension]
) -> dict[str, tuple[Any, ...]]:
    if spec is None:
        return {}
    if not isinstance(spec, dict) or not spec:
        raise fail("'when' maps an earlier choice key to its value(s), e.g. {model.architecture: mlp}")
    condition = {}
    for key, allowed in spec.items():
        parent = earlier.get(key)
        if parent is None or parent.kind != "choice":
            choices = [d.key for d in earlier.values() if d.kind == "choice"]
            raise fail(f"'when' names {key}, which is not a choice key above it{did_you_mean(str(key), choices)}")
        values = tuple(allowed) if isinstance(allowed, list) else (allowed,)
        for value in values:
            if not parent.contains(value):
                raise fail(f"'when' asks for {key}={json.dumps(value)}, which is not {parent.describe()}")
        condition[key] = values
    return condition


def _enqueued(by_key: Mapping[str, Dimension], spec: Any, where: str) -> tuple[dict[str, Any], ...]:
    if spec is None:
        return ()
    if not isinstance(spec, list) or not all(isinstance(item, dict) for item in spec):
        raise ConfigError(f"{where}: {ENQUEUE}: expected a list of mappings from keys of the space to values")
    trials = []
    for index, item in enumerate(spec):
        label = f"{where}: {ENQUEUE}.{index}"
        for key, value in item.items():
            dimension = by_key.get(key)
            if dimension is None:
                raise ConfigError(f"{label}: {key} is not a key of the space{did_you_mean(str(key), by_key)}")
            if not dimension.contains(value):
                raise ConfigError(f"{label}: {key}={json.dumps(value)} is not {dimension.describe()}")
        trials.append(dict(item))
    return tuple(trials)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _applies(dimension: Dimension, values: Mapping[str, Any]) -> bool:
    return all(key in values and any(_same(values[key], v) for v in allowed) for key, allowed in dimension.when.items())


# ------------------------------------------------------------------------------------------ trial configs


def trial_config(base: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """The base config's data with a trial's values set; parameters of a replaced component are dropped."""
    raw = json.loads(json.dumps(base))  # a deep copy of plain YAML data
    origins: dict[str, str] = {}
    for key, value in values.items():
        node = _node(raw, key)
        if key in COMPONENT_KEYS and not COMPONENT_KEYS[key][2] and isinstance(node, dict) and isinstance(value, str):
            key = f"{key}.name"  # another optimizer keeps the base's parameters it takes too (momentum for sgd)
        apply_override(raw, origins, f"{key}={json.dumps(value)}")
    for key in COMPONENT_KEYS:
        name = values.get(key, values.get(f"{key}.name"))
        if isinstance(name, str):
            _drop_foreign_params(raw, key, name, set(values))
    return raw


def _node(raw: Mapping[str, Any], key: str) -> Any:
    node: Any = raw
    for part in key.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def _drop_foreign_params(raw: dict[str, Any], key: str, name: str, sampled: set[str]) -> None:
    component_registry, fields, in_section = COMPONENT_KEYS[key]
    section_name, _, leaf = key.partition(".")
    section = raw.get(section_name)
    if not isinstance(section, dict):
        return
    holder = section if in_section else section.get(leaf)
    if not isinstance(holder, dict):
        return
    prefix = f"{section_name}." if in_section else f"{key}."
    try:
        factory = component_registry.get(name)
    except ConfigError:
        return  # the config loader says what is wrong with the name
    parameters = signature_of(factory).parameters
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return
    for param in list(holder):
        if param not in fields and param not in parameters and f"{prefix}{param}" not in sampled:
            del holder[param]


def check_space(space: SearchSpace, base: Mapping[str, Any]) -> None:
    """Load the config of every combination of the choices that change which keys apply (conditions, component
    names), with each key at each end of its range, through the normal config loader: a key no chosen component
    takes, or a value a section refuses, is a `ConfigError` naming the space file and the key before any trial."""
    structural = [
        d
        for d in space.dimensions
        if d.kind == "choice"
        and (d.key in COMPONENT_KEYS or d.key.removesuffix(".name") in COMPONENT_KEYS or _referenced(d, space))
    ]
    combinations = itertools.islice(itertools.product(*(d.choices for d in structural)), MAX_CHECKED_COMBINATIONS)
    for combination in combinations:
        fixed = dict(zip((d.key for d in structural), combination, strict=True))
        others = [d for d in space.dimensions if d.key not in fixed]
        first = {d.key: d.extremes()[0] for d in others}
        for dimension, value in _variations(others):
            values = space.sample(_given({**first, **fixed, dimension.key: value}))
            _load_checked(space, base, values, dimension)
        if not others:
            _load_checked(space, base, space.sample(_given(fixed)), None)
    for index, values in enumerate(space.enqueued):
        applied = space.sample(lambda d, values=values: values.get(d.key, d.extremes()[0]))
        ignored = [key for key in values if key not in applied]
        if ignored:
            raise ConfigError(
                f"{space.path}: {ENQUEUE}.{index}: {ignored[0]} does not apply to that trial (its 'when' does not hold)"
            )
        _load_checked(space, base, applied, None)


def _given(values: Mapping[str, Any]) -> Callable[[Dimension], Any]:
    return lambda dimension: values[dimension.key]


def _referenced(dimension: Dimension, space: SearchSpace) -> bool:
    return any(dimension.key in d.when for d in space.dimensions)


def _variations(dimensions: Iterable[Dimension]) -> Iterable[tuple[Dimension, Any]]:
    for dimension in dimensions:
        for value in dimension.extremes():
            yield dimension, value


def _load_checked(space: SearchSpace, base: Mapping[str, Any], values: Mapping[str, Any], varied: Any) -> None:
    try:
        config_from_dict(trial_config(base, values))
    except ConfigError as error:
        message = " ".join(str(error).split())
        culprit = next((d for d in space.dimensions if message.startswith(d.key)), varied)
        where = culprit.where if culprit is not None else str(space.path)
        setting = ", ".join(f"{key}={json.dumps(value)}" for key, value in values.items())
        raise ConfigError(f"{where}: {message} (in the trial with {setting})") from error
