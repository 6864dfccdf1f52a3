"""`data.partition`: a federation's clients each train their part of the training split, cut from the seed alone,
and `training.proximal_mu` (FedProx) holds training near the weights it starts from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from scaleforge import load_config
from scaleforge.data.partition import part_indices
from scaleforge.errors import ConfigError
from scaleforge.training.trainer import build_data, train

LABELS = np.repeat(np.arange(10), 50)  # 500 samples, 50 a class


@pytest.mark.parametrize("scheme", ["iid", "dirichlet:0.5", "by-class:3"])
def test_the_parts_are_disjoint_cover_the_split_and_depend_on_the_seed_alone(scheme: str) -> None:
    parts = part_indices(LABELS, scheme, 4, seed=7, num_classes=10)
    joined = np.concatenate(parts)
    assert len(joined) == len(set(joined.tolist()))  # no sample in two parts
    if scheme != "by-class:3":  # a class no part holds is left out of a pathological split
        assert sorted(joined.tolist()) == list(range(500))
    again = part_indices(LABELS, scheme, 4, seed=7, num_classes=10)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = part_indices(LABELS, scheme, 4, seed=8, num_classes=10)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_a_by_class_split_gives_each_part_k_classes_and_its_first_in_order() -> None:
    parts = part_indices(LABELS, "by-class:2", 4, seed=0, num_classes=10)
    classes = [sorted(set(LABELS[p].tolist())) for p in parts]
    assert all(len(held) == 2 for held in classes)
    assert all(index in held for index, held in enumerate(classes))  # part i holds class i


def test_a_smaller_dirichlet_alpha_skews_the_parts_more() -> None:
    def skew(alpha: float) -> float:  # the mean share of a part's largest class
        parts = part_indices(LABELS, f"dirichlet:{alpha}", 4, seed=0, num_classes=10)
        return float(np.mean([np.bincount(LABELS[p], minlength=10).max() / len(p) for p in parts]))

    assert skew(0.1) > 0.25 > 0.15 > skew(100.0)  # 0.1 for perfectly even classes


def test_a_client_trains_its_part_and_validates_on_the_whole_split() -> None:
    whole = build_data(load_config(None, []).data)
    parts = [
        build_data(load_config(None, ["data.partition.scheme=dirichlet:0.5", "data.partition.parts=3",
                                      f"data.partition.index={i}"]).data)
        for i in range(3)
    ]  # fmt: skip
    assert sum(len(p.train) for p in parts) == len(whole.train)
    assert all(torch.equal(p.val.targets, whole.val.targets) for p in parts)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data.partition.scheme=dirichlet:0", "data.partition.parts=2"], "'dirichlet:0' is not one of"),
        (["data.partition.scheme=halves", "data.partition.parts=2"], "one of iid, dirichlet:ALPHA"),
        (["data.partition.scheme=by-class:11", "data.partition.parts=2"], "more classes than the dataset's 10"),
        (["data.partition.parts=2", "data.partition.index=2"], "data.partition.index: 2 is not a part of 0 to 1"),
        (["data.partition.scheme=dirichlet:0.001", "data.partition.parts=200"], "Dirichlet draws left a part"),
    ],
)
def test_a_partition_that_cannot_be_cut_is_a_config_error(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(".", r"\.")):
        build_data(load_config(None, overrides).data)


def test_the_proximal_term_holds_training_near_the_weights_it_starts_from(tmp_path: Path) -> None:
    quick = ["logging.progress=none", "logging.tensorboard=false", "logging.plot=false", "checkpoint.every_steps=0"]
    train(load_config(None, [*quick, "training.max_steps=1"]), tmp_path / "start")
    start = load_file(tmp_path / "start" / "final" / "model.safetensors")

    def drift(mu: float) -> float:
        run = tmp_path / f"mu{mu}"
        init = f"training.init_from={tmp_path / 'start'}"
        train(load_config(None, [*quick, init, "training.max_steps=40", f"training.proximal_mu={mu}"]), run)
        end = load_file(run / "final" / "model.safetensors")
        return sum(float((end[k] - start[k]).pow(2).sum()) for k in start) ** 0.5

    assert drift(100.0) < 0.5 * drift(0.0)
    with pytest.raises(ConfigError, match="training.proximal_mu: the proximal term reads whole parameters"):
        train(load_config(None, [*quick, "training.proximal_mu=1", "parallel.strategy=fsdp"]), tmp_path / "fsdp")
