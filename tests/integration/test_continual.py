"""Tasks of a class-incremental sequence: `data.classes` keeps a subset of a dataset's classes while the model's
head keeps them all, and `scaleforge eval RUN` measures a run on another task's data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scaleforge import load_config
from scaleforge.training.trainer import build_data, train

QUICK = ["logging.progress=none", "logging.tensorboard=false", "logging.plot=false", "checkpoint.every_steps=0"]
FIRST, SECOND = "data.classes=[0,1,2,3,4]", "data.classes=[5,6,7,8,9]"


@pytest.fixture(scope="module")
def first_task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A digits MLP trained on classes 0-4 only."""
    run_dir = tmp_path_factory.mktemp("continual") / "first"
    train(load_config(None, [*QUICK, FIRST, "training.epochs=5"]), run_dir)
    return run_dir


def test_data_classes_keeps_those_classes_in_both_splits_and_the_whole_head() -> None:
    everything = build_data(load_config(None, []).data)
    kept = build_data(load_config(None, [FIRST]).data)
    assert kept.info == everything.info and kept.info.num_classes == 10  # the head keeps every class
    for part, whole in ((kept.train, everything.train), (kept.val, everything.val)):
        assert set(part.targets.tolist()) == {0, 1, 2, 3, 4}
        assert len(part) == int((whole.targets < 5).sum())  # every sample of those classes, no other


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.classes=[3,12]", "data.classes: [12] outside the dataset's classes, 0 to 9"),
        ("data.classes=[]", "data.classes: empty; list the classes to keep, of 0 to 9"),
    ],
)
def test_classes_the_dataset_lacks_are_one_line_and_exit_2(cli, tmp_path: Path, override: str, message: str) -> None:  # noqa: ANN001
    result = cli("train", *QUICK, override, "--run-dir", str(tmp_path / "run"))
    assert result.code == 2 and result.err.strip().endswith(message), result.err
    tokens = cli("train", *QUICK, "data.dataset=synthetic", "data.kind=tokens", "data.classes=[0]")
    assert tokens.code == 2 and "data.classes: the dataset is language_modeling data" in tokens.err


def test_eval_measures_a_run_on_another_tasks_data(cli, first_task: Path, tmp_path: Path) -> None:  # noqa: ANN001
    def accuracy(*args: str) -> float:
        result = cli("eval", str(first_task), *args)
        assert result.code == 0, result.err
        return float(result.out.split("val_accuracy: ")[1].split()[0])

    own = accuracy()
    assert own > 0.9 and accuracy(FIRST) == own  # its own task, named or not
    assert accuracy(SECOND) == 0.0  # never saw classes 5-9: predicts none of them
    config = tmp_path / "second.yaml"
    config.write_text("data:\n  dataset: digits\n  classes: [0, 9]\n")
    assert 0.3 < accuracy("--data", str(config)) < 0.7  # 0s right, 9s wrong: about half
    refused = cli("eval", str(first_task), "training.epochs=3")
    assert refused.code == 2 and "evaluation takes data.KEY=VALUE overrides only" in refused.err
    other = tmp_path / "other.yaml"
    other.write_text("data:\n  dataset: synthetic\n  kind: images\n  image_size: 8\n  channels: 3\n")
    mismatch = cli("eval", str(first_task), "--data", str(other))
    assert (
        mismatch.code == 2 and "data: its input_shape is (3, 8, 8), but the run's model was built for" in mismatch.err
    )


def test_a_subset_of_a_dataset_read_sample_by_sample() -> None:
    from scaleforge.data.base import DataInfo, DatasetSplits, keep_classes

    class Listed(torch.utils.data.Dataset):
        def __init__(self, labels: list[int]) -> None:
            self.labels = labels

        def __len__(self) -> int:
            return len(self.labels)

        def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.full((2,), float(index)), torch.tensor(self.labels[index])

    info = DataInfo(task="classification", input_shape=(2,), num_classes=3)
    kept = keep_classes(DatasetSplits(Listed([0, 1, 2, 1]), Listed([2, 1]), info), [1])
    assert [int(kept.train[i][0][0]) for i in range(len(kept.train))] == [1, 3]  # samples 1 and 3
    assert len(kept.val) == 1
