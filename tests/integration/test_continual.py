"""Tasks of a class-incremental sequence: `data.classes` keeps a subset of a dataset's classes while the model's
head keeps them all, `scaleforge eval RUN` measures a run on another task's data, replay keeps the first task
that plain fine-tuning forgets, and `scaleforge continual report` gives the accuracy matrix and forgetting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scaleforge import load_config
from scaleforge.training.trainer import build_data, train

QUICK = ["logging.progress=none", "logging.tensorboard=false", "logging.plot=false", "checkpoint.every_steps=0"]
FIRST, SECOND = "data.classes=[0,1,2,3,4]", "data.classes=[5,6,7,8,9]"


@pytest.fixture(scope="module")
def first_task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A digits MLP trained on classes 0-4 only, keeping a replay buffer of them."""
    run_dir = tmp_path_factory.mktemp("continual") / "first"
    train(load_config(None, [*QUICK, FIRST, "training.epochs=5", "training.continual.strategy=replay"]), run_dir)
    return run_dir


REPLAY = "training.continual.strategy=replay"


@pytest.fixture(scope="module")
def second_tasks(first_task: Path) -> dict[str, Path]:
    """Classes 5-9 learned from the first task's weights: by plain fine-tuning, and with each strategy (EWC's
    first task trained with EWC, so that it kept its Fisher; replay's with replay, so that it kept a buffer)."""
    ewc_first = first_task.parent / "first-ewc"
    train(load_config(None, [*QUICK, FIRST, "training.epochs=5", "training.continual.strategy=ewc"]), ewc_first)
    runs = {}
    for strategy in ("none", "replay", "ewc", "lwf"):
        run_dir = first_task.parent / f"second-{strategy}"
        start = ewc_first if strategy == "ewc" else first_task
        overrides = [*QUICK, SECOND, "training.epochs=5", f"training.init_from={start}"]
        train(load_config(None, [*overrides, f"training.continual.strategy={strategy}"]), run_dir)
        runs[strategy] = run_dir
    return runs


def test_replay_keeps_the_first_task_that_fine_tuning_forgets(cli, first_task: Path, second_tasks) -> None:  # noqa: ANN001
    def accuracy(run: Path, *args: str) -> float:
        result = cli("eval", str(run), *args)
        assert result.code == 0, result.err
        return float(result.out.split("val_accuracy: ")[1].split()[0])

    before = accuracy(first_task)
    assert before > 0.9
    assert accuracy(second_tasks["none"], FIRST) < before - 0.5  # plain fine-tuning forgets it
    assert accuracy(second_tasks["replay"], FIRST) > before - 0.1  # replay keeps it within 10 points
    assert accuracy(second_tasks["replay"], SECOND) > 0.7  # while it learns the second
    first = load_file(first_task / "final" / "replay.safetensors")
    assert sorted(first["targets"].bincount().tolist()) == [100] * 5  # 500 samples, 100 of each class it saw
    second = load_file(second_tasks["replay"] / "final" / "replay.safetensors")
    assert second["targets"].bincount().tolist() == [50] * 10  # every class so far, in equal shares
    assert "replay.safetensors" in json.loads((first_task / "final" / "manifest.json").read_text())["files"]
    assert not (second_tasks["none"] / "final" / "replay.safetensors").exists()


def test_ewc_and_lwf_each_lose_less_of_the_first_task_than_fine_tuning(cli, second_tasks) -> None:  # noqa: ANN001
    def accuracy(run: Path, *args: str) -> float:
        result = cli("eval", str(run), *args)
        assert result.code == 0, result.err
        return float(result.out.split("val_accuracy: ")[1].split()[0])

    forgot = accuracy(second_tasks["none"], FIRST)
    for strategy in ("ewc", "lwf"):
        assert accuracy(second_tasks[strategy], FIRST) > forgot + 0.1, strategy
        assert accuracy(second_tasks[strategy], SECOND) > 0.5, strategy  # and it learned the second task
    ewc = load_file(second_tasks["ewc"] / "final" / "ewc.safetensors")
    first = load_file(second_tasks["ewc"].parent / "first-ewc" / "final" / "ewc.safetensors")
    weights = load_file(second_tasks["ewc"] / "final" / "model.safetensors")
    for name, value in weights.items():
        assert torch.equal(ewc[f"anchor.{name}"], value)  # anchored to this run's weights
        assert bool((ewc[f"fisher.{name}"] >= first[f"fisher.{name}"]).all())  # the earlier task's Fisher, and more
    config = load_config(second_tasks["lwf"] / "config.yaml")
    assert config.training.continual.strategy == "lwf" and config.training.loss.name == "auto"  # as the user wrote


def test_the_report_gives_the_accuracy_matrix_and_forgetting(cli, first_task: Path, second_tasks) -> None:  # noqa: ANN001
    result = cli("continual", "report", str(first_task), str(second_tasks["replay"]), "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    (first_on_first, first_on_second), (second_on_first, second_on_second) = report["accuracy"]
    assert first_on_second == 0.0 and first_on_first > 0.9  # before the second task, none of its classes
    assert report["forgetting"] == [pytest.approx(first_on_first - second_on_first)]
    assert report["average_accuracy"] == [first_on_first, pytest.approx((second_on_first + second_on_second) / 2)]
    table = cli("continual", "report", str(first_task), str(second_tasks["none"]))
    assert table.code == 0 and "forgetting after the last task" in table.out and "task 2" in table.out


def test_a_buffer_changed_after_its_run_is_refused(cli, first_task: Path, tmp_path: Path) -> None:  # noqa: ANN001
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(first_task, copy)
    buffer = copy / "final" / "replay.safetensors"
    data = bytearray(buffer.read_bytes())
    data[-1] ^= 1  # one bit of one sample
    buffer.write_bytes(bytes(data))
    result = cli("train", *QUICK, SECOND, REPLAY, f"training.init_from={copy}", "--run-dir", str(tmp_path / "run"))
    assert result.code == 2 and "replay.safetensors does not match its SHA-256" in result.err, result.err
    tokens = cli(
        "train", *QUICK, "data.dataset=synthetic", "data.kind=tokens", REPLAY, "--run-dir", str(tmp_path / "t")
    )
    assert tokens.code == 2 and "replay is for classification data, not language_modeling" in tokens.err
    alone = cli("train", *QUICK, "training.continual.strategy=lwf", f"--run-dir={tmp_path / 'l'}")
    assert alone.code == 2 and "lwf learns from the run it starts from: give training.init_from a run" in alone.err
    weights = f"training.init_from={first_task / 'final' / 'model.safetensors'}"
    file = cli("train", *QUICK, SECOND, "training.continual.strategy=lwf", weights, f"--run-dir={tmp_path / 'f'}")
    assert file.code == 2 and "give training.init_from a run directory" in file.err
    qat = cli("train", *QUICK, "training.continual.strategy=ewc", "training.quantization_aware=true")
    assert qat.code == 2 and "ewc estimates its Fisher on the plain model" in qat.err
    sharded = cli("train", *QUICK, "training.continual.strategy=ewc", "parallel.strategy=fsdp")
    assert sharded.code == 2 and "ewc reads whole parameters: it runs under single or ddp, not fsdp" in sharded.err


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


def test_classes_of_images_gathered_a_batch_at_a_time(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from scaleforge.data.base import keep_classes
    from scaleforge.data.image_folder import image_folder
    from scaleforge.training.continual import fisher_information, select_buffer

    rng = np.random.default_rng(0)
    for i in range(30):  # three classes of ten
        folder = tmp_path / "images" / f"class{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    splits = image_folder(str(tmp_path / "images"), image_size=8, augment=False, cache_dir=str(tmp_path / "cache"))
    kept = keep_classes(splits, [0, 2])  # splits of images without an inputs tensor (GatheredImages)
    assert {int(kept.train[i][1]) for i in range(len(kept.train))} == {0, 2}
    assert len(kept.train) + len(kept.val) == 20
    section = load_config(None, ["training.continual.buffer_size=4"]).training.continual
    buffer = select_buffer(kept.train, section, seed=0)
    assert buffer["inputs"].shape == (4, 3, 8, 8) and sorted(buffer["targets"].tolist()) == [0, 0, 2, 2]
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
    fisher = fisher_information(model, kept.train, torch.nn.CrossEntropyLoss(), samples=8, seed=0)
    assert fisher["1.weight"].shape == (3, 192) and bool((fisher["1.weight"] >= 0).all())
