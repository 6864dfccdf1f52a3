"""The run configuration: one YAML file plus `KEY=VALUE` overrides, typed, validated and with provenance.

Every section is a small frozen dataclass. Component sections are open: `model.architecture` (or
`data.dataset`, `training.optimizer`, ...) names a registered component and its sibling keys are bound to
that component's constructor signature here, at load time, so a misspelt key fails before any work starts.
Each value remembers where it came from (the default, a file and line, or an override) for
`scaleforge config show --explain` and for error messages.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from scaleforge import registry
from scaleforge.errors import ConfigError, did_you_mean, one_of

DEFAULT = "default"

# Fields a dataset provides to a model whose signature names them (see data/base.py: DataInfo).
DATA_PROVIDED = ("input_shape", "num_classes", "vocab_size", "seq_len", "bytes_per_token")


def _check(*, minimum: float | None = None, above: float | None = None) -> dict[str, Any]:
    return {"minimum": minimum, "above": above}


POSITIVE = _check(above=0)
NON_NEGATIVE = _check(minimum=0)


@dataclass(frozen=True)
class ComponentSpec:
    """A registered component's name (or `module:Attr` path) and its constructor parameters."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    factory: Callable[..., Any] | None = field(default=None, compare=False, repr=False)  # resolved at load


@dataclass(frozen=True)
class ModelSection:
    """`model.architecture` and the model's constructor arguments."""

    architecture: str = "mlp"
    params: dict[str, Any] = field(default_factory=dict)
    factory: Callable[..., Any] | None = field(default=None, compare=False, repr=False)  # resolved at load


@dataclass(frozen=True)
class PartitionSection:
    """One part of the training split, for one client of a federation (`scaleforge federate` sets it for each):
    the split cut into `parts` by `scheme` with `seed`, and this run trains on part `index`; the validation split
    stays whole. `iid`: shuffled and cut evenly; `dirichlet:ALPHA`: each class spread over the parts in
    Dirichlet(ALPHA) proportions (the smaller ALPHA, the more skewed); `by-class:K`: K classes a part, each class
    cut evenly among the parts that hold it (docs/federated.md)."""

    scheme: str = "iid"
    parts: int = field(default=1, metadata=POSITIVE)  # 1: the whole split
    index: int = field(default=0, metadata=NON_NEGATIVE)
    seed: int = 0


@dataclass(frozen=True)
class DataSection:
    """`data.dataset`, the dataset's constructor arguments, and how batches are loaded."""

    dataset: str = "digits"
    num_workers: int = field(default=0, metadata=NON_NEGATIVE)
    # class-incremental tasks: keep the samples of these classes only (both splits); the model's head keeps every class
    classes: list[int] | None = None
    partition: PartitionSection = PartitionSection()
    params: dict[str, Any] = field(default_factory=dict)
    factory: Callable[..., Any] | None = field(default=None, compare=False, repr=False)  # resolved at load


@dataclass(frozen=True)
class ContinualSection:
    """Learning a new task without forgetting the earlier ones, which the run `training.init_from` names learned
    (docs/continual.md). `replay`: a buffer of `buffer_size` earlier samples (chosen per class, or at random), kept
    in that run's final/, joins this task's training data, and this run keeps a buffer of every task so far.
    `ewc`: elastic weight consolidation, `ewc_lambda / 2 * sum(F * (w - w_before)^2)` added to the training loss,
    F the earlier tasks' Fisher information (estimated on `fisher_samples` samples, kept in final/). `lwf`:
    learning without forgetting, the distillation loss with the run it starts from as the teacher."""

    strategy: Literal["none", "replay", "ewc", "lwf"] = "none"
    buffer_size: int = field(default=500, metadata=POSITIVE)
    selection: Literal["class_balanced", "random"] = "class_balanced"
    ewc_lambda: float = field(default=1e5, metadata=NON_NEGATIVE)
    fisher_samples: int = field(default=1000, metadata=POSITIVE)
    lwf_temperature: float = field(default=2.0, metadata=POSITIVE)
    lwf_weight: float = field(default=0.2, metadata=NON_NEGATIVE)  # the soft term's share, 0 to 1


@dataclass(frozen=True)
class TrainingSection:
    """How the model is optimised. `batch_size` is the global batch per optimizer step."""

    batch_size: int = field(default=64, metadata=POSITIVE)
    learning_rate: float = field(default=1e-3, metadata=POSITIVE)
    epochs: int = field(default=20, metadata=POSITIVE)
    max_steps: int | None = field(default=None, metadata=POSITIVE)
    optimizer: ComponentSpec = ComponentSpec("adam")
    scheduler: ComponentSpec = ComponentSpec("none")
    weight_decay: float = field(default=0.0, metadata=NON_NEGATIVE)
    grad_accum_steps: int = field(default=1, metadata=POSITIVE)
    clip_grad_norm: float | None = field(default=None, metadata=POSITIVE)
    precision: Literal["auto", "32", "bf16-mixed", "fp16-mixed"] = "auto"
    compile: bool = False
    activation_checkpointing: bool = False
    eval_every_steps: int = field(default=0, metadata=NON_NEGATIVE)
    loss: ComponentSpec = ComponentSpec("auto")
    metrics: list[ComponentSpec] | None = None
    callbacks: list[ComponentSpec] = field(default_factory=list)
    # weights to start from instead of a fresh initialisation: a run directory, its final/ folder or a .safetensors
    # file (the optimizer starts afresh); fine-tuning, and compression's fine-tuning steps
    init_from: str | None = None
    # weights that are exactly zero at the start stay zero, whatever the optimizer does (a pruned model keeps its
    # sparsity while it is fine-tuned)
    keep_zeros: bool = False
    # fake-quantized training (PT2E QAT, torchao's x86 quantizer): the model is exported and trained as it will
    # compute in int8; `scaleforge compress --method qat` converts the result. Single process or ddp
    quantization_aware: bool = False
    # FedProx's proximal term: mu / 2 * ||w - w0||^2 added to the training loss, w0 the weights training starts
    # from (training.init_from; a federation's global model); 0 leaves the loss as it is. Single process or ddp
    proximal_mu: float = field(default=0.0, metadata=NON_NEGATIVE)
    continual: ContinualSection = ContinualSection()


@dataclass(frozen=True)
class CheckpointSection:
    """Periodic checkpoints; `every_steps: 0` turns them off."""

    every_steps: int = field(default=200, metadata=NON_NEGATIVE)
    keep: int = field(default=3, metadata=POSITIVE)
    # `async` in files and overrides (a Python keyword): training goes on while the checkpoint is written
    async_: bool = field(default=False, metadata={"key": "async"})
    # an environment variable holding a key: each checkpoint's and final/'s manifest is signed with it (HMAC-SHA256),
    # and checkpoints without the right signature are refused on resume
    signing_key_env: str | None = None


@dataclass(frozen=True)
class HardwareSection:
    """Where to run: `device: auto` picks cuda, then mps, then cpu. `cpu_watts`: the processor's rated power (all
    its packages), for the energy estimate where no counter is readable; `carbon_intensity`: grams of CO2 a kWh
    of the grid the machine draws from (the world's average by default)."""

    device: str = "auto"
    threads: int | None = field(default=None, metadata=POSITIVE)
    cpu_watts: float | None = field(default=None, metadata=POSITIVE)
    carbon_intensity: float = field(default=475.0, metadata=NON_NEGATIVE)


# The device-mesh dimensions each strategy spans (`single` spans none; `auto` resolves to single or ddp).
MESH_DIMENSIONS: dict[str, tuple[str, ...]] = {
    "ddp": ("dp",),
    "fsdp": ("dp",),
    "hsdp": ("dp",),
    "tp": ("tp",),
    "pp": ("pp",),
    "hybrid": ("dp", "tp", "pp"),
}
# Pipeline schedules that run one stage on each pipeline process (the others run parallel.stages_per_process).
SINGLE_STAGE_SCHEDULES = ("gpipe", "1f1b")
# The strategies that may run FSDP2, whose gradient reductions parallel.reduce_dtype sets.
SHARDING = ("fsdp", "hsdp", "hybrid")
# The strategies whose dp dimension FSDP2 may split into groups that replicate and groups that shard (HSDP).
SPLITS_DP = ("hsdp", "hybrid")


@dataclass(frozen=True)
class ParallelSection:
    """How the work is split across processes. `auto`: `single` for one process, `ddp` for more.

    `dp`, `tp` and `pp` size the device mesh of `hybrid` (their product is the number of processes; `dp` left
    out takes what remains). `stages` lists the block indices where pipeline stages 2, 3, ... begin (left out:
    balanced by parameter count); `schedule` orders the micro-batches' steps: `gpipe` and `1f1b` run one stage a
    process, `interleaved_1f1b` and `zero_bubble` run `stages_per_process` (left out: 2) virtual stages a process,
    stage s on pipeline process s mod pp; `microbatches` is how many pieces the pipeline cuts each batch into
    (left out: one per pipeline process). `dp_replicate` x `dp_shard` splits the data-parallel processes of `hsdp`
    (and of `hybrid`) into groups that each shard the model (`dp_shard` processes) and replicate it across groups
    (`dp_replicate`): one given, the other takes what remains; neither, `hsdp` shards within a node and replicates
    across nodes. `timeout_s` is how long a collective waits for the other processes before the run fails,
    naming the process that stopped responding (a hang), so that a restart can take over.
    """

    strategy: Literal["auto", "single", "ddp", "fsdp", "hsdp", "tp", "pp", "hybrid"] = "auto"
    dp: int | None = field(default=None, metadata=POSITIVE)
    dp_replicate: int | None = field(default=None, metadata=POSITIVE)
    dp_shard: int | None = field(default=None, metadata=POSITIVE)
    tp: int = field(default=1, metadata=POSITIVE)
    pp: int = field(default=1, metadata=POSITIVE)
    stages: list[int] | None = None
    schedule: Literal["gpipe", "1f1b", "interleaved_1f1b", "zero_bubble"] = "1f1b"
    stages_per_process: int | None = field(default=None, metadata=POSITIVE)
    microbatches: int | None = field(default=None, metadata=POSITIVE)
    cpu_offload: bool = False
    timeout_s: float = field(default=600.0, metadata=POSITIVE)
    # ddp's gradient all-reduce: as is, in bf16 or fp16 (half the bytes), or PowerSGD's low-rank approximation
    # with error feedback, after `powersgd_start_step` steps of plain all-reduce (torch's default: 1,000)
    grad_compression: Literal["none", "bf16", "fp16", "powersgd"] = "none"
    powersgd_rank: int = field(default=4, metadata=POSITIVE)
    powersgd_start_step: int = field(default=1000, metadata={"minimum": 2})
    reduce_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # fsdp's (hsdp's, hybrid's) gradient reductions

    @property
    def virtual_stages(self) -> int:
        """Pipeline stages each pipeline process runs: `stages_per_process`, by default 1 for gpipe and 1f1b, else 2."""
        return self.stages_per_process or (1 if self.schedule in SINGLE_STAGE_SCHEDULES else 2)


@dataclass(frozen=True)
class LoggingSection:
    """What a run reports while it trains."""

    every_steps: int = field(default=50, metadata=POSITIVE)  # as Lightning; 10 costs ~3% on small models
    progress: Literal["auto", "bar", "plain", "none"] = "auto"
    tensorboard: bool = True
    plot: bool = True
    system_metrics: bool = True  # CPU, memory, tokens/s and GPU figures in every log line
    prometheus_port: int | None = field(default=None, metadata={**NON_NEGATIVE, "maximum": 65535})  # 0: any free
    prometheus_host: str = "127.0.0.1"
    prometheus_ranks: Literal["main", "all"] = "main"  # all: rank r on prometheus_port + its local rank


@dataclass(frozen=True)
class RunConfig:
    """A whole run, resolved and validated."""

    seed: int = field(default=0, metadata={**NON_NEGATIVE, "maximum": 2**63 - 1})
    name: str = "default"
    imports: list[str] = field(default_factory=list)
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    training: TrainingSection = TrainingSection()
    checkpoint: CheckpointSection = CheckpointSection()
    hardware: HardwareSection = HardwareSection()
    parallel: ParallelSection = ParallelSection()
    logging: LoggingSection = LoggingSection()
    origins: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)
    # The data it was loaded from, before any default was filled in (None for a config built in Python): what
    # `rebuild_data` starts from, so that an override switching a component drops the old one's parameters.
    given: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain YAML-ready data, in the file format (component parameters beside the name)."""
        return _section_to_dict(self)

    def origin(self, key: str) -> str:
        """Where the value at a dotted key came from: 'default', 'FILE:LINE' or 'override KEY=VALUE'."""
        return _origin(self.origins, key)


# Which field of an open section names its component, and which registry resolves it.
_OPEN_SECTIONS: dict[type, tuple[str, registry.Registry]] = {
    ModelSection: ("architecture", registry.MODELS),
    DataSection: ("dataset", registry.DATASETS),
}
# Component fields of `training`: registry, and the names the trainer passes itself (not settable).
_COMPONENT_FIELDS: dict[str, tuple[registry.Registry, frozenset[str]]] = {
    "optimizer": (registry.OPTIMIZERS, frozenset({"params", "lr", "weight_decay"})),
    "scheduler": (registry.SCHEDULERS, frozenset({"optimizer", "total_steps", "steps_per_epoch"})),
    "loss": (registry.LOSSES, frozenset()),
    "metrics": (registry.METRICS, frozenset()),
    "callbacks": (registry.CALLBACKS, frozenset()),
}
# Component fields that hold a list of components.
_COMPONENT_LISTS = ("metrics", "callbacks")
# Fields that are not keys of the config file.
_NOT_FROM_FILE = ("params", "factory", "origins", "given")
# Names resolved by the task at build time rather than from a registry.
_AUTO = "auto"


def component_keys() -> dict[str, tuple[registry.Registry, tuple[str, ...], bool]]:
    """Each dotted key that names one component (`model.architecture`, `training.optimizer`, ...): the registry
    that resolves it, the keys that sit beside its parameters, and whether those parameters are the section's own
    keys (`model`, `data`) or a mapping under the key (`training.optimizer: {name: sgd, momentum: 0.9}`)."""
    keys: dict[str, tuple[registry.Registry, tuple[str, ...], bool]] = {}
    for section, hint in typing.get_type_hints(RunConfig).items():
        if hint in _OPEN_SECTIONS:
            name_field, component_registry = _OPEN_SECTIONS[hint]
            fields = tuple(_key_of(f) for f in dataclasses.fields(hint) if f.name not in _NOT_FROM_FILE)
            keys[f"{section}.{name_field}"] = (component_registry, fields, True)
    for name, (component_registry, _) in _COMPONENT_FIELDS.items():
        if name not in _COMPONENT_LISTS:
            keys[f"training.{name}"] = (component_registry, ("name",), False)
    return keys


# --------------------------------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML file (or the defaults when `path` is None), apply `KEY=VALUE` overrides and validate."""
    return build_config(*config_data(path, overrides))


def config_data(path: str | Path | None = None, overrides: Sequence[str] = ()) -> tuple[dict[str, Any], dict[str, str]]:
    """What `load_config` validates: the file's data with the overrides set (and its name), and where each dotted
    key came from."""
    raw: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if path is not None:
        raw, origins = read_yaml(Path(path))
    for item in overrides:
        apply_override(raw, origins, item)
    if "name" not in raw and path is not None:
        raw["name"] = Path(path).stem
        origins["name"] = f"the name of {path}"
    return raw, origins


def config_from_dict(data: Mapping[str, Any], origin: str = DEFAULT) -> RunConfig:
    """Validate an already-parsed config mapping (such as a saved `config.yaml`)."""
    return build_config(*mapping_data(data, origin))


def mapping_data(data: Mapping[str, Any], origin: str = DEFAULT) -> tuple[dict[str, Any], dict[str, str]]:
    """What `build_config` validates, from config data given as a mapping: a copy of it, and `origin` for each
    of its dotted keys."""
    raw = _deep_copy(data)
    return raw, ({key: origin for key in _dotted_keys(raw)} if origin != DEFAULT else {})


def build_config(raw: dict[str, Any], origins: dict[str, str]) -> RunConfig:
    """Validate config data whose dotted keys `origins` says the origin of (as `config_data` gives them)."""
    given = _deep_copy(raw)
    config: RunConfig = _build(RunConfig, raw, origins, prefix="")
    return dataclasses.replace(config, given=given)


def rebuild_data(config: RunConfig) -> tuple[dict[str, Any], dict[str, str]]:
    """What `build_config` validates to give `config` again, with its origins: the data it was loaded from, or,
    for a config built or changed in Python (`dataclasses.replace`), its values as data."""
    if config.given is not None:
        raw, origins = _deep_copy(config.given), dict(config.origins)
        if build_config(_deep_copy(raw), dict(origins)) == config:
            return raw, origins
    return config.to_dict(), dict(config.origins)


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` as a float (YAML 1.1 insists on a dot: `1.0e-3`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.[\d_]*)?[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def parse_yaml_value(text: str) -> Any:
    """Parse one value the way the config file would."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """A config file's data and the `file:line` of each dotted key in it."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not a UTF-8 text file ({error.reason} at byte {error.start})") from error
    except OSError as error:
        raise ConfigError(f"{path}: cannot be read: {error.strerror or error}") from error
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
        node = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(f"{where}: malformed YAML: {problem}") from error
    if data is None or node is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {_type_name(data)}")
    origins: dict[str, str] = {}
    _record_lines(node, "", str(path), origins)
    return data, origins


def _record_lines(node: yaml.Node, prefix: str, filename: str, origins: dict[str, str]) -> None:
    if not isinstance(node, yaml.MappingNode):
        return
    for key_node, value_node in node.value:
        key = f"{prefix}{key_node.value}"
        where = f"{filename}:{key_node.start_mark.line + 1}"
        if key in origins:  # YAML would silently keep the last one; a user cannot tell which setting won
            raise ConfigError(f"{where}: {key} is set twice (first at {origins[key]})")
        origins[key] = where
        _record_lines(value_node, f"{key}.", filename, origins)


def apply_override(raw: dict[str, Any], origins: dict[str, str], item: str) -> None:
    """Apply one `dotted.key=VALUE` override in place; VALUE is parsed as YAML."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override '{item}' is not KEY=VALUE (for example training.epochs=3)")
    try:
        value = parse_yaml_value(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"override '{item}': value is not valid YAML: {getattr(error, 'problem', error)}") from error
    set_value(raw, origins, key, value, f"override {item}", item)


def set_value(raw: dict[str, Any], origins: dict[str, str], key: str, value: Any, origin: str, item: str) -> None:
    """Set the value at a dotted key in place (creating sections on the way), remembering `origin` for it; errors
    name the override as `item`."""
    parts = key.split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        where = ".".join(parts[: depth + 1])
        if isinstance(child, str):  # `training.optimizer=sgd training.optimizer.momentum=0.9`
            child = {"name": child}
        elif not isinstance(child, dict):
            if child is not None:
                raise ConfigError(f"override '{item}': {where} is {_type_name(child)}, not a section")
            child = {}
            origins.setdefault(where, origin)
        node[part] = child
        node = child
    node[parts[-1]] = value
    for existing in [k for k in origins if k == key or k.startswith(key + ".")]:
        del origins[existing]
    origins[key] = origin
    for sub in _dotted_keys(value, key):
        origins[sub] = origin


def _dotted_keys(value: Any, prefix: str = "") -> list[str]:
    if not isinstance(value, dict):
        return []
    keys = []
    for name, child in value.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        keys.append(key)
        keys.extend(_dotted_keys(child, key))
    return keys


def _deep_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_deep_copy(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------------- building


def _origin(origins: Mapping[str, str], key: str) -> str:
    """Where a key's value came from. A component written as a bare name (`optimizer: adam`) gives its
    `name` the line of the component; parameters filled from the signature are defaults."""
    if key in origins:
        return origins[key]
    parent, _, leaf = key.rpartition(".")
    if leaf == "name" and parent in origins:
        return origins[parent]
    return DEFAULT


def _enclosing_origin(origins: Mapping[str, str], key: str) -> str:
    while key:
        if key in origins:
            return origins[key]
        key = key.rpartition(".")[0]
    return DEFAULT


def _fail(origins: Mapping[str, str], key: str, message: str) -> ConfigError:
    origin = _enclosing_origin(origins, key)
    suffix = f" [{origin}]" if origin != DEFAULT else ""
    return ConfigError(f"{key}: {message}{suffix}")


def _build(cls: type, raw: Any, origins: dict[str, str], prefix: str) -> Any:
    """Build a section dataclass from raw data, checking keys, types and ranges."""
    section_key = prefix.rstrip(".")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise _fail(origins, section_key, f"expected a mapping, got {_type_name(raw)} {raw!r}")
    raw = dict(raw)
    hints = typing.get_type_hints(cls)
    fields = {_key_of(f): f for f in dataclasses.fields(cls) if f.name not in _NOT_FROM_FILE}
    values: dict[str, Any] = {}

    if cls is RunConfig:  # imports come first: they register the components the other sections name
        values["imports"] = _convert(raw.pop("imports", []), hints["imports"], origins, "imports")
        for module in values["imports"]:
            registry.import_module(module, key="imports")

    open_section = _OPEN_SECTIONS.get(cls)
    if open_section is None:
        unknown = [k for k in raw if k not in fields]
        if unknown:
            key = f"{prefix}{unknown[0]}"
            raise _fail(origins, key, f"unknown key{did_you_mean(str(unknown[0]), fields)}; {one_of(fields)}")

    for name, spec in fields.items():
        key = f"{prefix}{name}"
        hint = hints[spec.name]
        # Sections and components are built even when absent, so their defaults are bound and shown.
        if isinstance(hint, type) and dataclasses.is_dataclass(hint) and hint is not ComponentSpec:
            values[name] = _build(hint, raw.pop(name, {}), origins, f"{key}.")
        elif name in _COMPONENT_FIELDS:
            default = _plain_default(spec)
            values[name] = _component_field(name, raw.pop(name, default), origins, key)
        elif name in raw:
            value = raw.pop(name)
            values[spec.name] = _convert(value, hints[spec.name], origins, key)
            _check_range(values[spec.name], spec.metadata, origins, key)

    if open_section is not None:
        name_field, component_registry = open_section
        component = values.get(name_field, fields[name_field].default)
        factory = _resolve(component_registry, component, origins, f"{prefix}{name_field}")
        values["params"] = bind_params(factory, raw, origins, section_key, section_fields=list(fields))
        values["factory"] = factory
    if cls is RunConfig:
        values["origins"] = dict(origins)
        _check_training(values.get("training", TrainingSection()), origins)
        _check_parallel(values.get("parallel", ParallelSection()), origins)
    return cls(**values)


def _resolve(component_registry: registry.Registry, name: str, origins: Mapping[str, str], key: str) -> Any:
    """Look a component up; a miss names where the name came from, like every other config error."""
    try:
        return component_registry.get(name, key=key)
    except ConfigError as error:
        origin = _enclosing_origin(origins, key)
        raise ConfigError(f"{error} [{origin}]" if origin != DEFAULT else str(error)) from error


def _plain_default(spec: dataclasses.Field[Any]) -> Any:
    default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
    if isinstance(default, ComponentSpec):
        return _spec_to_data(default)
    return _plain(default)


def _component_field(name: str, value: Any, origins: dict[str, str], key: str) -> Any:
    component_registry, injected = _COMPONENT_FIELDS[name]
    if name in _COMPONENT_LISTS:
        if value is None and name == "metrics":
            return None
        if not isinstance(value, list):
            raise _fail(origins, key, f"expected a list of {component_registry.kind} names, got {_type_name(value)}")
        return [_component(item, component_registry, injected, origins, f"{key}.{i}") for i, item in enumerate(value)]
    return _component(value, component_registry, injected, origins, key)


def _component(
    value: Any, component_registry: registry.Registry, injected: frozenset[str], origins: Mapping[str, str], key: str
) -> ComponentSpec:
    if isinstance(value, str):
        name, params = value, {}
    elif isinstance(value, dict) and isinstance(value.get("name"), str):
        params = dict(value)
        name = params.pop("name")
    elif isinstance(value, dict):
        raise _fail(origins, key, f"a mapping needs 'name', the {component_registry.kind} to use, got {value!r}")
    else:
        raise _fail(origins, key, f"expected the name of a {component_registry.kind} or a mapping with 'name'")
    if name == _AUTO and component_registry is registry.LOSSES:
        if params:
            raise _fail(origins, key, "'auto' takes no parameters")
        return ComponentSpec(name)
    factory = _resolve(component_registry, name, origins, f"{key}.name" if params else key)
    return ComponentSpec(name, bind_params(factory, params, origins, key, injected=injected), factory)


def bind_params(
    factory: Callable[..., Any],
    params: Mapping[str, Any],
    origins: Mapping[str, str],
    key: str,
    *,
    injected: frozenset[str] = frozenset(),
    section_fields: Sequence[str] = (),
) -> dict[str, Any]:
    """Check `params` against `factory`'s signature and return them with the signature's defaults filled in.

    `injected` names are passed by scaleforge itself and cannot be set. Names a dataset provides (such as
    `num_classes`) may be set, and are checked against the dataset at build time. `section_fields` are the
    section's own keys that sit beside the parameters (`architecture`), offered as did-you-mean too.
    """
    signature = signature_of(factory)
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    settable = {
        name: p
        for name, p in signature.parameters.items()
        if name not in injected and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    hints = _type_hints(factory)
    bound: dict[str, Any] = {}
    for name, p in settable.items():  # the signature's defaults, so the resolved config shows every value
        if name not in DATA_PROVIDED and p.default is not p.empty and _is_plain_data(p.default):
            bound[name] = _deep_copy(p.default)
    for name, value in params.items():
        param_key = f"{key}.{name}"
        if name not in settable and not accepts_any:
            if name in injected:
                raise _fail(origins, param_key, "is set by scaleforge and cannot be given here")
            choices = list(settable)
            suggestion = did_you_mean(str(name), [*choices, *section_fields])
            raise _fail(
                origins,
                param_key,
                f"{_factory_name(factory)} takes no parameter '{name}'{suggestion}; "
                f"it takes: {', '.join(choices) or 'no parameters'}",
            )
        hint = hints.get(name, Any)
        bound[name] = _bind_value(value, hint, origins, param_key) if name not in DATA_PROVIDED else value
    return bound


def _bind_value(value: Any, hint: Any, origins: Mapping[str, str], key: str) -> Any:
    """A parameter's value in its type; a list where the type names a registry binds each item as a component."""
    component_registry = listed_components(hint)
    if component_registry is not None and isinstance(value, list):
        items = enumerate(value)
        return [_component(item, component_registry, frozenset(), origins, f"{key}.{i}") for i, item in items]
    return _convert(value, hint, origins, key)


def listed_components(hint: Any) -> registry.Registry | None:
    """The registry of a parameter typed as a list of components, `Annotated[list[ComponentSpec], REGISTRY]`
    (alone or in a union, such as `bool | Transforms`): its items are names or `{name: ..., setting: ...}`
    mappings, bound at load time like `training.callbacks`, and the component receives `ComponentSpec`s."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    for candidate in typing.get_args(hint) if union else (hint,):
        if typing.get_origin(candidate) is Annotated:
            for meta in candidate.__metadata__:
                if isinstance(meta, registry.Registry):
                    return meta
    return None


def signature_of(factory: Callable[..., Any]) -> inspect.Signature:
    """A component's signature; one that cannot be read accepts any keyword."""
    try:
        return inspect.signature(factory)
    except (TypeError, ValueError):
        return inspect.Signature([inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)])


def _type_hints(factory: Callable[..., Any]) -> dict[str, Any]:
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        return typing.get_type_hints(target, include_extras=True)
    except Exception:  # unresolvable annotations in user code: bind without type checks
        return {}


def _factory_name(factory: Callable[..., Any]) -> str:
    return getattr(factory, "__name__", repr(factory))


def _is_plain_data(value: Any) -> bool:
    if value is None or isinstance(value, bool | int | float | str):
        return True
    if isinstance(value, list | tuple):
        return all(_is_plain_data(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain_data(v) for k, v in value.items())
    return False


def _check_training(training: TrainingSection, origins: Mapping[str, str]) -> None:
    if training.batch_size % training.grad_accum_steps:
        raise _fail(
            origins,
            "training.batch_size",
            f"{training.batch_size} is not divisible by training.grad_accum_steps={training.grad_accum_steps}",
        )


def _check_parallel(parallel: ParallelSection, origins: Mapping[str, str]) -> None:
    stages = parallel.stages
    if stages is not None and (any(s < 1 for s in stages) or sorted(set(stages)) != list(stages)):
        raise _fail(origins, "parallel.stages", f"expected increasing block indices above 0, got {list(stages)}")
    dimensions = MESH_DIMENSIONS.get(parallel.strategy, ())
    for key in ("dp", "tp", "pp"):
        if getattr(parallel, key) not in (None, 1) and key not in dimensions:
            raise _fail(
                origins, f"parallel.{key}", f"sizes a mesh dimension that parallel.strategy={parallel.strategy} lacks"
            )
    if parallel.strategy not in SPLITS_DP:
        for key in ("dp_replicate", "dp_shard"):
            if getattr(parallel, key) is not None:
                message = f"splits the dp dimension of hsdp or hybrid, not of parallel.strategy={parallel.strategy}"
                raise _fail(origins, f"parallel.{key}", message)
    _check_compression(parallel, origins)
    if "pp" not in dimensions:  # pipeline options for a strategy without stages would be silently ignored
        defaults = ParallelSection()
        for key in ("stages", "schedule", "stages_per_process", "microbatches"):
            if getattr(parallel, key) != getattr(defaults, key):
                message = f"shapes pipeline stages, which parallel.strategy={parallel.strategy} lacks"
                raise _fail(origins, f"parallel.{key}", message)
    if parallel.schedule in SINGLE_STAGE_SCHEDULES and parallel.stages_per_process not in (None, 1):
        message = (
            f"the {parallel.schedule} schedule runs one stage a process; interleaved_1f1b and zero_bubble run more"
        )
        raise _fail(origins, "parallel.stages_per_process", message)


def _check_compression(parallel: ParallelSection, origins: Mapping[str, str]) -> None:
    """Gradient compression where there is a reduction it applies to; its options only with it. One process
    (`single`, or `auto` started alone) reduces nothing: the setting is then a no-op, so a config runs anywhere."""
    strategy, defaults = parallel.strategy, ParallelSection()
    if parallel.grad_compression != "none" and strategy not in ("auto", "single", "ddp"):
        hint = "; for its gradient reduction use parallel.reduce_dtype" if strategy in SHARDING else ""
        message = f"compresses ddp's gradient all-reduce, which parallel.strategy={strategy} does not use{hint}"
        raise _fail(origins, "parallel.grad_compression", message)
    if parallel.grad_compression != "powersgd":
        for key in ("powersgd_rank", "powersgd_start_step"):
            if getattr(parallel, key) != getattr(defaults, key):
                raise _fail(origins, f"parallel.{key}", "applies to parallel.grad_compression=powersgd only")
    if parallel.reduce_dtype != "fp32" and strategy not in SHARDING:
        hint = "; ddp compresses with parallel.grad_compression" if strategy in ("auto", "ddp") else ""
        message = f"sets fsdp's gradient reduction, which parallel.strategy={strategy} does not use{hint}"
        raise _fail(origins, "parallel.reduce_dtype", message)


def _check_range(value: Any, metadata: Mapping[str, Any], origins: Mapping[str, str], key: str) -> None:
    if value is None or not isinstance(value, int | float):
        return
    if metadata.get("above") is not None and not value > metadata["above"]:
        raise _fail(origins, key, f"must be greater than {metadata['above']}, got {value}")
    if metadata.get("minimum") is not None and not value >= metadata["minimum"]:
        raise _fail(origins, key, f"must be at least {metadata['minimum']}, got {value}")
    if metadata.get("maximum") is not None and not value <= metadata["maximum"]:
        raise _fail(origins, key, f"must be at most {metadata['maximum']}, got {value}")


# ------------------------------------------------------------------------------------------------ type checks


class _Mismatch(Exception):
    pass


def _convert(value: Any, hint: Any, origins: Mapping[str, str], key: str) -> Any:
    """Check `value` against a type hint and return it in that type (ints widen to floats, lists to tuples)."""
    try:
        return _coerce(value, hint)
    except _Mismatch:
        raise _fail(origins, key, f"expected {describe_type(hint)}, got {_type_name(value)} {value!r}") from None


def _coerce(value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any or hint is inspect.Parameter.empty or isinstance(hint, typing.TypeVar):
        return value
    if origin is Annotated:
        return _coerce(value, args[0])
    if origin is Literal:
        for choice in args:
            if value == choice or (isinstance(choice, str) and not isinstance(value, bool) and str(value) == choice):
                return choice
        raise _Mismatch
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg)
            except _Mismatch:
                continue
        raise _Mismatch
    if hint is type(None):
        if value is None:
            return None
        raise _Mismatch
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if hint is str or hint is Path:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if origin in (list, tuple, Sequence, typing.Sequence) or hint in (list, tuple):
        if not isinstance(value, list | tuple):
            raise _Mismatch
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise _Mismatch
            return [_coerce(v, a) for v, a in zip(value, args, strict=True)]
        item = args[0] if args else Any
        return [_coerce(v, item) for v in value]
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        if isinstance(value, dict):
            return value
        raise _Mismatch
    return value  # a type we do not check (a user class, a callable): left to the component


def describe_type(hint: Any) -> str:
    """Plain-English name of a type hint for error messages."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Annotated:
        component_registry = listed_components(hint)
        if component_registry is not None:
            return f"a list of {component_registry.kind} names or mappings with 'name'"
        return describe_type(args[0])
    if origin is Literal:
        return one_of(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        parts = [describe_type(a) for a in args if a is not type(None)]
        text = " or ".join(parts)
        return f"{text} or null" if type(None) in args else text
    if origin in (list, tuple, Sequence, typing.Sequence):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} values ({', '.join(describe_type(a) for a in args)})"
        return f"a list of {_plural(args[0]) if args else 'values'}"
    if origin in (dict, Mapping):
        return "a mapping"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _plural(hint: Any) -> str:
    plurals = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}
    return plurals.get(hint, describe_type(hint))


def _type_name(value: Any) -> str:
    names = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
    }
    return "null" if value is None else names.get(type(value), type(value).__name__)


# ------------------------------------------------------------------------------------------------- output


def _key_of(spec: dataclasses.Field[Any]) -> str:
    """A field's key in files and overrides: its name, unless that is a Python keyword (`async`)."""
    return str(spec.metadata.get("key", spec.name))


def _section_to_dict(section: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(section):
        if f.name in ("origins", "factory", "given"):
            continue
        value, key = getattr(section, f.name), _key_of(f)
        if f.name == "params":
            out.update(_plain(value))
        elif dataclasses.is_dataclass(value) and not isinstance(value, ComponentSpec):
            out[key] = _section_to_dict(value)
        else:
            out[key] = _plain(value)
    return out


def _spec_to_data(spec: ComponentSpec) -> Any:
    return {"name": spec.name, **_plain(spec.params)} if spec.params else spec.name


def _plain(value: Any) -> Any:
    if isinstance(value, ComponentSpec):
        return _spec_to_data(value)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def dump_yaml(config: RunConfig) -> str:
    """The resolved config as YAML, loadable by `load_config`."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=None, width=120)


def explain_yaml(config: RunConfig) -> str:
    """The resolved config as YAML with a comment after each value saying where it came from."""
    lines: list[tuple[str, str]] = []
    _explain(config.to_dict(), "", 0, config.origins, lines)
    width = max(len(text) for text, _ in lines) + 2
    return "\n".join(f"{text:<{width}}# {origin}" if origin else text for text, origin in lines) + "\n"


def _explain(
    data: Mapping[str, Any], prefix: str, depth: int, origins: Mapping[str, str], lines: list[tuple[str, str]]
) -> None:
    indent = "  " * depth
    for name, value in data.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict) and value:
            lines.append((f"{indent}{name}:", ""))
            _explain(value, f"{key}.", depth + 1, origins, lines)
        else:
            lines.append((f"{indent}{name}: {_flow(value)}", _origin(origins, key)))


def _flow(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("...").strip()
