"""The model repository read without loading a model (scaleforge.serve.repository): version folders found,
complete or pending with why, `serving.yaml` checked in one line, version policies, traffic weights and the
version a request is routed to."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from scaleforge.errors import UsageError
from scaleforge.runs import FINAL_FILES, write_manifest
from scaleforge.serve import repository
from scaleforge.serve.repository import (
    ManifestChecks,
    ServingConfig,
    choose_version,
    read_serving,
    scan,
    weights_of,
)


def version(root: Path, model: str, number: str, *, manifest: bool = True, run_dir: bool = True) -> Path:
    """A finished version folder: a run directory (its `final/`) or the `final/` itself, its manifest written."""
    folder = root / model / number
    final = folder / "final" if run_dir else folder
    final.mkdir(parents=True)
    for name in FINAL_FILES:
        (final / name).write_text(f"{model} {number} {name}")
    if manifest:
        write_manifest(final)
    return final


def test_a_repository_is_read_as_it_is_without_loading_a_model(tmp_path: Path) -> None:
    version(tmp_path, "digits", "1")
    version(tmp_path, "digits", "2", run_dir=False)
    version(tmp_path, "digits", "3", manifest=False)  # still being copied
    damaged = version(tmp_path, "digits", "4")
    (damaged / "model.safetensors").write_text("something else, of another size")
    (tmp_path / "digits" / "5").mkdir()  # nothing in it yet
    (tmp_path / "digits" / "latest").mkdir()  # not a version
    (tmp_path / "digits" / "07").mkdir()  # nor is this
    version(tmp_path, "gpt", "1")
    (tmp_path / "gpt" / "serving.yaml").write_text("versions: {latest: 2}\ntrafic: {1: 100}\n")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "notes.txt").write_text("not a model")

    models = scan(tmp_path)

    assert list(models) == ["digits", "gpt"]
    digits = models["digits"]
    assert list(digits.versions) == [1, 2, 3, 4, 5] and digits.problem is None
    assert digits.versions[1].final == tmp_path / "digits" / "1" / "final"
    assert digits.versions[2].final == tmp_path / "digits" / "2" and digits.versions[2].pending is None
    assert digits.versions[3].final is None and "manifest.json" in str(digits.versions[3].pending)
    assert "model.safetensors has" in str(digits.versions[4].pending)
    assert "not a finished run yet" in str(digits.versions[5].pending)
    assert digits.served == [5]  # the newest folder, even while it is pending: the policy reads folders
    gpt = models["gpt"]
    assert gpt.serving is None and gpt.served == []
    assert gpt.problem is not None and gpt.problem.endswith("serving.yaml: trafic: Extra inputs are not permitted")


def test_a_repository_that_is_not_a_folder_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--repository .*missing: not a folder"):
        scan(tmp_path / "missing")


@pytest.mark.parametrize(
    ("text", "served"),
    [
        ("", [4]),
        ("versions: {latest: 2}", [3, 4]),
        ("versions: [1, 3]", [1, 3]),
        ("versions: [1, 9]", [1]),  # a version named but not there is not served
        ("versions: all", [1, 2, 3, 4]),
        ("traffic: {2: 90, 4: 10}", [2, 4]),  # the newest, and those the traffic names
        ("versions: {latest: 1}\nshadow: 1", [1, 4]),
        ("versions: [2, 3]\ntraffic: {2: 1, 3: 1}\nshadow: 1", [1, 2, 3]),
    ],
)
def test_a_version_policy_says_which_versions_are_served(tmp_path: Path, text: str, served: list[int]) -> None:
    (tmp_path / "serving.yaml").write_text(text)
    assert read_serving(tmp_path).served([1, 2, 3, 4]) == served


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("traffic: {1: -5, 2: 10}", "serving.yaml: traffic: weights are 0 or more"),
        ("traffic: {}", "traffic: give at least one version's weight"),
        ("traffic: {0: 1}", "traffic.0.[key]: Input should be greater than 0"),
        ("traffic: {1: 50}\nshadow: 1", "shadow: version 1 takes traffic already"),
        ("versions: [1]\ntraffic: {2: 1}", "traffic: version 2 is not among the versions served [1]"),
        ("versions: {newest: 2}", "versions"),
        ("sticky_header: 'X User'", "sticky_header: String should match pattern"),
        ("batching: {max_batch_size: 0}", "batching.max_batch_size: Input should be greater than 0"),
        ("versions: [1\n", "cannot be read as YAML"),
        ("- 1\n- 2\n", "expected settings by name (versions, traffic, ...), got a list"),
    ],
)
def test_a_bad_serving_yaml_is_one_line_naming_the_file_and_the_key(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "serving.yaml").write_text(text)
    with pytest.raises(UsageError) as raised:
        read_serving(tmp_path)
    assert str(raised.value).startswith(f"{tmp_path / 'serving.yaml'}: ") and message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_a_serving_yaml_gives_its_batching_over_the_servers(tmp_path: Path) -> None:
    (tmp_path / "serving.yaml").write_text("sticky_header: X-User-Id\nbatching: {max_batch_size: 8, timeout_ms: 500}")
    serving = read_serving(tmp_path)
    assert serving.sticky_header == "X-User-Id"
    assert serving.batching.given() == {"max_batch_size": 8, "timeout_ms": 500}


def test_a_manifest_is_checked_once_for_each_state_of_its_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    final = version(tmp_path, "digits", "1")
    checked: list[Path] = []
    check = repository.check_manifest
    monkeypatch.setattr(repository, "check_manifest", lambda folder: checked.append(folder) or check(folder))
    checks = ManifestChecks()
    for _ in range(3):
        assert scan(tmp_path, checks)["digits"].versions[1].pending is None
    assert checked == [final]
    (final / "config.yaml").write_text("changed, and longer than it was")
    assert "config.yaml has" in str(scan(tmp_path, checks)["digits"].versions[1].pending)
    assert checked == [final, final]


def test_traffic_goes_to_the_ready_versions_it_weighs_else_to_the_newest_ready_one() -> None:
    split = ServingConfig.model_validate({"traffic": {1: 90, 2: 10, 3: 0}, "shadow": 4})
    assert weights_of(split, [1, 2, 3, 4]) == {1: 90, 2: 10}
    assert weights_of(split, [2, 3, 4]) == {2: 10}  # version 1 not ready (loading, failed): 2 takes it all
    assert weights_of(split, [3, 4]) == {3: 1.0}  # none it weighs ready: the newest ready one, never the shadow
    assert weights_of(split, [4]) == {}
    assert weights_of(ServingConfig(), [1, 2]) == {2: 1.0}


def test_a_split_draws_each_version_about_its_share_and_a_sticky_key_keeps_its_version() -> None:
    weights = {1: 70.0, 2: 20.0, 3: 10.0}
    draws = 20_000
    draw = random.Random(0)
    counts = {version: 0 for version in weights}
    for _ in range(draws):
        counts[choose_version(weights, draw=draw)] += 1
    for version, weight in weights.items():
        share = weight / 100
        margin = 4 * (share * (1 - share) / draws) ** 0.5  # four standard deviations of a binomial share
        assert abs(counts[version] / draws - share) < margin, (version, counts)

    users = [f"user-{index}" for index in range(4000)]
    first = [choose_version(weights, user, salt="digits") for user in users]
    assert first == [choose_version(weights, user, salt="digits") for user in users]  # sticky
    assert abs(first.count(1) / len(users) - 0.7) < 4 * (0.21 / len(users)) ** 0.5  # hashed keys split as weighed
    other = [choose_version(weights, user, salt="gpt") for user in users]
    assert other != first  # another model's split does not follow this one's
    with pytest.raises(ValueError, match="no version to choose from"):
        choose_version({})
