"""A model repository, read as Triton's is: every model in `DIR/<name>/<version>/`, each version a run directory
or its `final/`, versions positive integers; an optional `DIR/<name>/serving.yaml` says how a model is served.

`scan(DIR)` reads the repository as it is now, and nothing else: no model is loaded. Each model gets its
`ServingConfig` (or the one-line problem of its `serving.yaml`), the version folders found, and which of them its
version policy serves; each version folder is `complete` (its `final/` matches its manifest) or `pending`, with
why (a folder still being copied has no manifest yet, or files that do not match it). A folder whose name is not
a positive integer is not a version and is left out, as Triton leaves it. A manifest is checked once for each
state of the folder's files (names, sizes and modification times: `ManifestChecks`), so that scanning a
repository of large models again and again hashes each version once.

`serving.yaml`, every key optional:

    versions: {latest: 2}        # or a list, [1, 3]; or "all". Default: the newest one, or those `traffic` names
    traffic: {1: 90, 2: 10}      # weights of the served versions; default: all to the newest ready one
    sticky_header: X-User-Id     # requests with this header keep to one version (its value hashed)
    shadow: 3                    # a version that gets a copy of the traffic; its answers are recorded, not returned
    batching: {max_batch_size: 16, max_delay_ms: 2, max_queue: 128, timeout_ms: 1000, workers: 2}

`choose_version` picks a version for one request from the weights of the versions ready now.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator

from scaleforge.errors import UsageError
from scaleforge.runs import ManifestMismatch, check_manifest, find_final

SERVING_FILE = "serving.yaml"
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")  # a URL path segment as it is, never hidden
VERSION_NAME = re.compile(r"^[1-9][0-9]{0,8}$")  # a positive integer, written without leading zeros


class Latest(BaseModel):
    """The newest `latest` versions."""

    model_config = ConfigDict(extra="forbid")
    latest: PositiveInt


class Batching(BaseModel):
    """A model's own batching, over the server's options of the same names."""

    model_config = ConfigDict(extra="forbid")
    max_batch_size: PositiveInt | None = None
    max_delay_ms: float | None = Field(default=None, ge=0)
    max_queue: PositiveInt | None = None
    timeout_ms: float | None = Field(default=None, gt=0)
    workers: PositiveInt | None = None  # model processes for each version (--workers)

    def given(self) -> dict[str, Any]:
        """The options this sets, by name."""
        return {name: value for name, value in self.model_dump().items() if value is not None}


class ServingConfig(BaseModel):
    """A model's `serving.yaml` (see the module)."""

    model_config = ConfigDict(extra="forbid")
    versions: Latest | list[PositiveInt] | Literal["all"] | None = None
    traffic: dict[PositiveInt, Annotated[float, Field(allow_inf_nan=False)]] | None = None
    sticky_header: str | None = Field(default=None, pattern=r"^[A-Za-z0-9-]+$")
    shadow: PositiveInt | None = None
    batching: Batching = Batching()

    @model_validator(mode="after")
    def _consistent(self) -> ServingConfig:
        if self.traffic is not None:
            if not self.traffic:
                raise ValueError("traffic: give at least one version's weight")
            if any(weight < 0 for weight in self.traffic.values()) or sum(self.traffic.values()) <= 0:
                raise ValueError("traffic: weights are 0 or more, and at least one is above 0")
            if self.shadow is not None and self.shadow in self.traffic:
                raise ValueError(f"shadow: version {self.shadow} takes traffic already; a shadow gets a copy only")
        if isinstance(self.versions, list) and self.traffic is not None:
            unserved = sorted(set(self.traffic) - set(self.versions))
            if unserved:
                raise ValueError(f"traffic: version {unserved[0]} is not among the versions served {self.versions}")
        return self

    def served(self, found: list[int]) -> list[int]:
        """Which of the versions `found` (increasing) this policy serves, in increasing order: those it names that
        exist (the traffic's and the shadow's too), else the newest `latest`, else every one ("all"); by default
        the newest, with those the traffic and the shadow name."""
        named = set(self.traffic or ()) | ({self.shadow} if self.shadow is not None else set())
        if self.versions == "all":
            chosen = set(found)
        elif isinstance(self.versions, list):
            chosen = set(self.versions) | named
        elif isinstance(self.versions, Latest):
            chosen = set(found[-self.versions.latest :]) | named
        else:
            chosen = set(found[-1:]) | named
        return [version for version in found if version in chosen]


def read_serving(folder: Path) -> ServingConfig:
    """`folder/serving.yaml` (the defaults when there is none); a `UsageError` says in one line what is wrong."""
    path = folder / SERVING_FILE
    if not path.is_file():
        return ServingConfig()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise UsageError(f"{path}: cannot be read as YAML ({str(error).splitlines()[0]})") from None
    if data is None:
        return ServingConfig()
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected settings by name (versions, traffic, ...), got a {type(data).__name__}")
    try:
        return ServingConfig.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        message = first["msg"].removeprefix("Value error, ")  # a check across keys names its key itself
        raise UsageError(f"{path}: {where + ': ' if where else ''}{message}") from None


@dataclass(frozen=True)
class VersionFolder:
    """One version of a model as found: its folder, its `final/` once complete, else why it is pending."""

    version: int
    path: Path
    final: Path | None  # None: pending
    pending: str | None = None  # why it is not complete


@dataclass(frozen=True)
class ModelFolder:
    """One model as found: its `serving.yaml` (or the problem with it, which keeps the whole model from being
    served), its version folders by version, and the versions its policy serves."""

    name: str
    path: Path
    serving: ServingConfig | None
    problem: str | None
    versions: dict[int, VersionFolder]
    served: list[int]


@dataclass
class ManifestChecks:
    """What checking a `final/` against its manifest said, kept for as long as its files are unchanged (names,
    sizes, modification times), so that a repository scanned again hashes only what changed."""

    _said: dict[Path, tuple[tuple[tuple[str, int, int], ...], str | None]] = field(default_factory=dict)

    def problem(self, final: Path) -> str | None:
        """None if `final` matches its manifest, else what does not."""
        state = file_state(final)
        known = self._said.get(final)
        if known is not None and known[0] == state:
            return known[1]
        try:
            check_manifest(final)
            said = None
        except ManifestMismatch as error:
            said = str(error)
        except OSError as error:  # a file removed or replaced while it was read: read it again next time
            return f"its files changed while they were checked ({error.strerror or error})"
        self._said[final] = (state, said)
        return said


def scan(root: Path, checks: ManifestChecks | None = None) -> dict[str, ModelFolder]:
    """Every model of the repository at `root`, by name (see the module); `checks` remembers manifests already
    checked between scans. A `UsageError` if `root` is not a folder."""
    if not root.is_dir():
        raise UsageError(f"--repository {root}: not a folder")
    checks = checks if checks is not None else ManifestChecks()
    models = {}
    for folder in sorted(root.iterdir()):
        if not folder.is_dir() or not MODEL_NAME.match(folder.name):
            continue
        versions = {
            int(entry.name): _version(int(entry.name), entry, checks)
            for entry in folder.iterdir()
            if entry.is_dir() and VERSION_NAME.match(entry.name)
        }
        versions = dict(sorted(versions.items()))
        try:
            serving: ServingConfig | None = read_serving(folder)
            problem = None
        except UsageError as error:
            serving, problem = None, str(error)
        served = serving.served(list(versions)) if serving is not None else []
        models[folder.name] = ModelFolder(folder.name, folder, serving, problem, versions, served)
    return models


def _version(version: int, path: Path, checks: ManifestChecks) -> VersionFolder:
    try:
        final = find_final(path)
    except UsageError:
        return VersionFolder(version, path, None, "not a finished run yet: its final/ files are not all there")
    problem = checks.problem(final)
    if problem is not None:
        return VersionFolder(version, path, None, f"{final} does not match its manifest yet: {problem}")
    return VersionFolder(version, path, final)


def file_state(folder: Path) -> tuple[tuple[str, int, int], ...]:
    """The names, sizes and modification times of `folder`'s entries (empty if it cannot be read)."""
    try:
        entries = sorted(folder.iterdir())
        return tuple((entry.name, entry.stat().st_size, entry.stat().st_mtime_ns) for entry in entries)
    except OSError:
        return ()


def weights_of(serving: ServingConfig, ready: list[int]) -> dict[int, float]:
    """The traffic weights among the versions `ready` now (increasing; the shadow left out): those `serving`
    gives, over the ready versions it names; all to the newest ready version when it gives none, or when none of
    those it names with a weight above 0 is ready (a model answers while any version of it can)."""
    takers = [version for version in ready if version != serving.shadow]
    if serving.traffic is not None:
        weights = {version: serving.traffic[version] for version in takers if serving.traffic.get(version, 0) > 0}
        if weights:
            return weights
    return {takers[-1]: 1.0} if takers else {}


def choose_version(
    weights: Mapping[int, float], sticky: str | None = None, *, salt: str = "", draw: random.Random | None = None
) -> int:
    """A version drawn with `weights` (not empty): by the SHA-256 of `salt` and `sticky` when `sticky` is given (the
    same value keeps to the same version for as long as the weights stay; the model's name as `salt` keeps one
    model's split from following another's), else at random (`draw`, or Python's generator)."""
    if not weights:
        raise ValueError("no version to choose from")
    if sticky is not None:
        digest = hashlib.sha256(f"{salt}\0{sticky}".encode()).digest()
        point = int.from_bytes(digest[:8], "big") / 2**64
    else:
        point = (draw or random).random()
    total = sum(weights.values())
    running = 0.0
    for version, weight in sorted(weights.items()):
        running += weight / total
        if point < running:
            return version
    return max(weights)  # `point` at the very end, past rounding
