"""Every model family trains for a few steps from the CLI on data of its kind."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

QUICK = ["training.max_steps=6", "logging.progress=none", "logging.tensorboard=false", "logging.plot=false"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven"]
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(" ".join(rng.choice(words) for _ in range(4000)))
    return path


@pytest.mark.parametrize(
    "model",
    [
        ["model.architecture=cnn", "model.attention_heads=4"],
        ["model.architecture=vit", "model.patch_size=2", "model.depth=2", "model.width=64", "model.heads=4"],
        ["model.architecture=resnet18", "model.width=8"],
        ["model.architecture=lstm", "model.hidden_size=32"],
    ],
    ids=["cnn-attention", "vit", "resnet18", "lstm-classifier"],
)
def test_image_models_train_on_digits(cli, tmp_path: Path, model: list[str]) -> None:
    result = cli("train", *model, *QUICK, "--run-dir", str(tmp_path / "run"))
    assert result.code == 0, result.err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 6 and 0 <= summary["val_accuracy"] <= 1


@pytest.mark.parametrize(
    "model",
    [
        ["model.architecture=gpt", "model.n_layers=2", "model.d_model=32"],
        ["model.architecture=lstm", "model.hidden_size=32"],
    ],
    ids=["gpt", "lstm"],
)
def test_language_models_train_on_a_text_file(cli, tmp_path: Path, text_file: Path, model: list[str]) -> None:
    data = ["data.dataset=text", f"data.path={text_file}", "data.seq_len=32", "training.batch_size=16"]
    result = cli("train", *model, *data, *QUICK, "--run-dir", str(tmp_path / "run"))
    assert result.code == 0, result.err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["val_perplexity"] > 1 and "val_accuracy" not in summary
    evaluated = cli("eval", str(tmp_path / "run"))
    assert evaluated.code == 0 and f"val_perplexity: {summary['val_perplexity']:.4f}" in evaluated.out


def test_bad_text_data_names_the_file(cli, tmp_path: Path) -> None:
    gpt = ["model.architecture=gpt", "data.dataset=text"]
    short = tmp_path / "short.txt"
    short.write_text("too short")
    empty = tmp_path / "empty"
    empty.mkdir()
    for path, expected in (
        (tmp_path / "missing.txt", f"data.path: {tmp_path / 'missing.txt'} does not exist"),
        (empty, f"data.path: {empty} is an empty folder"),
        (short, f"data.path: {short} has 9 bytes, too short for one sequence of seq_len=128"),
    ):
        result = cli("train", *gpt, f"data.path={path}", "--run-dir", str(tmp_path / "run"))
        assert result.code == 2 and result.err.startswith(f"data error: {expected}"), result.err


def _write_csv(path: Path, rows: int = 200) -> Path:
    rng = random.Random(0)
    lines = ["width,height,target"]
    for _ in range(rows):
        width, height = rng.uniform(0, 100), rng.uniform(0, 1)
        lines.append(f"{width:.3f},{height:.4f},{'wide' if width > 50 else 'narrow'}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_mlp_trains_on_a_csv_file(cli, tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "shapes.csv")
    overrides = ["data.dataset=csv", f"data.path={path}", "training.batch_size=16", "model.hidden_layers=[16]"]
    result = cli("train", *overrides, "training.epochs=15", "logging.progress=none", "--run-dir", str(tmp_path / "r"))
    assert result.code == 0, result.err
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["val_accuracy"] >= 0.9  # one standardised feature decides the class


def test_csv_features_are_standardised_with_training_statistics(tmp_path: Path) -> None:
    from scaleforge.data.csv_table import csv_table

    splits = csv_table(str(_write_csv(tmp_path / "shapes.csv")))
    train_inputs = splits.train.inputs
    assert splits.info.num_classes == 2 and splits.info.input_shape == (2,)
    assert train_inputs.mean(dim=0).abs().max() < 1e-5
    assert (train_inputs.std(dim=0, unbiased=False) - 1).abs().max() < 1e-4
    assert splits.val.inputs.mean(dim=0).abs().max() > 1e-5  # validation rows were not used for the statistics


def test_bad_csv_names_the_file(cli, tmp_path: Path) -> None:
    no_target = tmp_path / "no_target.csv"
    no_target.write_text("a,b\n1,2\n")
    text_value = tmp_path / "text_value.csv"
    text_value.write_text("a,target\n1,x\nhello,y\n")
    for path, expected in (
        (tmp_path / "missing.csv", f"data.path: {tmp_path / 'missing.csv'} does not exist"),
        (no_target, f"{no_target}: no 'target' column (data.target); the columns are: a, b"),
        (text_value, f"{text_value}:3: column 'a' has a non-numeric value 'hello'"),
    ):
        result = cli("train", "data.dataset=csv", f"data.path={path}", "--run-dir", str(tmp_path / "run"))
        assert result.code == 2 and result.err.startswith(f"data error: {expected}"), result.err


def _write_image_folder(root: Path, per_class: int = 12) -> Path:
    from PIL import Image

    rng = random.Random(0)
    for name, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            size = rng.randint(20, 40)  # images of several sizes, resized by the dataset
            noisy = tuple(min(255, c + rng.randint(0, 30)) for c in colour)
            image = Image.new("RGB", (size, size), (0, 0, 0))
            image.paste(noisy, (0, 0, size // 2, size))  # a coloured left half: flips and crops change pixels
            image.save(root / name / f"{i}.png")
    return root


def test_resnet18_trains_on_an_image_folder(cli, tmp_path: Path) -> None:
    root = _write_image_folder(tmp_path / "images")
    data = ["data.dataset=image_folder", f"data.path={root}", "data.image_size=16", "training.batch_size=8"]
    model = ["model.architecture=resnet18", "model.width=8"]
    result = cli("train", *data, *model, "training.epochs=4", "logging.progress=none", "--run-dir", str(tmp_path / "r"))
    assert result.code == 0, result.err
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["steps"] == 4 * (19 // 8) and 0 <= summary["val_accuracy"] <= 1


def test_image_folder_normalises_with_training_statistics_and_augments(tmp_path: Path) -> None:
    import torch
    from PIL import Image

    from scaleforge.data.base import DataInfo, InMemoryDataset
    from scaleforge.data.image_folder import FolderImages, image_folder

    root = _write_image_folder(tmp_path / "images")
    splits = image_folder(str(root), image_size=8)
    assert splits.info.num_classes == 2 and splits.info.input_shape == (3, 8, 8)
    assert splits.info.class_names == ("blue", "red")
    assert DataInfo.from_json(json.loads(json.dumps(splits.info.to_json()))) == splits.info  # as in final/
    # an image file preprocessed for serving is exactly its training-time input
    spec = splits.info.image
    served = []
    for file in sorted(root.rglob("*.png")):
        with Image.open(file) as image:
            served.append(spec.normalise(spec.pixels(image)))
    val_inputs, _ = splits.val[torch.arange(len(splits.val))]
    assert all(any(torch.equal(inputs, other) for other in served) for inputs in val_inputs)
    assert isinstance(splits.train, FolderImages) and len(splits.val) == 5
    plain = image_folder(str(root), image_size=8, augment=False).train
    assert isinstance(plain, InMemoryDataset)  # a batch at a time, as tensors in memory are
    plain_inputs, _ = plain[torch.arange(len(plain))]
    assert plain_inputs.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    torch.manual_seed(0)
    crops = [splits.train[0][0] for _ in range(8)]
    assert crops[0].shape == (3, 8, 8) and any(not torch.equal(crops[0], c) for c in crops)  # a new crop each time


def test_bad_image_folders_name_the_path(cli, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = _write_image_folder(tmp_path / "broken", per_class=2)
    (broken / "red" / "bad.png").write_bytes(b"not an image")
    for path, expected in (
        (empty, f"data.path: {empty} holds no images in <class>/<image> folders"),
        (broken, f"{broken / 'red' / 'bad.png'}: not a readable image"),
    ):
        result = cli("train", "data.dataset=image_folder", f"data.path={path}", "--run-dir", str(tmp_path / "run"))
        assert result.code == 2 and result.err.startswith(f"data error: {expected}"), result.err


USER_DATASET = '''
import torch
from scaleforge import register_dataset
from scaleforge.data import DataInfo, DatasetSplits, InMemoryDataset


@register_dataset("user_parity")
def user_parity(num_samples: int = 256, bits: int = 6) -> DatasetSplits:
    """Is the number of set bits even or odd?"""
    numbers = torch.arange(num_samples) % (2**bits)
    inputs = ((numbers.unsqueeze(1) >> torch.arange(bits)) & 1).float()  # (N, bits)
    targets = inputs.sum(dim=1).long() % 2
    split = num_samples * 3 // 4
    info = DataInfo(task="classification", input_shape=(bits,), num_classes=2)
    train = InMemoryDataset(inputs[:split], targets[:split])
    return DatasetSplits(train, InMemoryDataset(inputs[split:], targets[split:]), info)
'''


def test_a_dataset_from_the_users_own_file(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "user_data.py").write_text(USER_DATASET)
    monkeypatch.chdir(tmp_path)
    result = cli(
        "train",
        "imports=[user_data]",
        "data.dataset=user_parity",
        "data.bits=5",
        "training.batch_size=32",
        "training.epochs=2",
        "logging.progress=none",
        "--run-dir",
        "run",
    )
    assert result.code == 0, result.err
    input_shape = json.loads((tmp_path / "run" / "final" / "data_info.json").read_text())["input_shape"]
    assert input_shape == [5]
    bad = cli("train", "imports=[user_data]", "data.dataset=user_parity", "data.bitz=5", "--run-dir", "run2")
    assert bad.code == 2 and "(did you mean 'bits'?)" in bad.err
    by_path = cli(
        "train", "data.dataset=user_data:user_parity", "training.epochs=1", "logging.progress=none", "--run-dir", "run3"
    )
    assert by_path.code == 0, by_path.err


@pytest.mark.parametrize(
    ("data", "model", "metric"),
    [
        (["data.kind=images", "data.image_size=8", "data.num_samples=256"], ["model.architecture=cnn"], "val_accuracy"),
        (["data.kind=tokens", "data.seq_len=16", "data.num_samples=256"], ["model.architecture=gpt"], "val_perplexity"),
    ],
    ids=["images", "tokens"],
)
def test_synthetic_images_and_tokens(cli, tmp_path: Path, data: list[str], model: list[str], metric: str) -> None:
    result = cli("train", "data.dataset=synthetic", *data, *model, *QUICK, "--run-dir", str(tmp_path / "r"))
    assert result.code == 0, result.err
    assert metric in json.loads((tmp_path / "r" / "summary.json").read_text())


def test_synthetic_tokens_mostly_count_up() -> None:
    from scaleforge.data.synthetic import synthetic

    splits = synthetic(kind="tokens", num_samples=64, seq_len=32, vocab_size=50)
    inputs, targets = splits.train.inputs, splits.train.targets
    assert _share_equal(targets[:, :-1], inputs[:, 1:]) == 1.0  # targets are the inputs shifted by one
    assert 0.75 < _share_equal((inputs[:, :-1] + 1) % 50, inputs[:, 1:]) < 0.9


def _share_equal(a, b) -> float:
    return (a == b).float().mean().item()


@pytest.mark.slow
def test_the_default_cnn_learns_digit_photos_in_class_folders(cli, tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()  # 1,797 8x8 images, as 28-pixel PNGs in one folder per class
    for i, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        folder = tmp_path / "digits" / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = Image.fromarray((image * (255 / 16)).astype(np.uint8))
        pixels.resize((28, 28), Image.Resampling.BILINEAR).save(folder / f"{i}.png")
    data = ["data.dataset=image_folder", f"data.path={tmp_path / 'digits'}", "data.image_size=28"]
    result = cli("train", "model.architecture=cnn", *data, "training.epochs=4", "--run-dir", str(tmp_path / "r"))
    assert result.code == 0, result.err
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["val_accuracy"] >= 0.97


def test_image_folder_takes_validation_from_a_val_folder(tmp_path: Path) -> None:
    from scaleforge.data.image_folder import image_folder

    _write_image_folder(tmp_path / "images" / "train", per_class=6)
    _write_image_folder(tmp_path / "images" / "val", per_class=2)
    splits = image_folder(str(tmp_path / "images"), image_size=8, augment=False)
    assert (len(splits.train), len(splits.val)) == (12, 4)
    assert splits.val.targets.tolist() == [0, 0, 1, 1]  # classes in sorted folder order: blue, red


def test_text_from_a_folder_joins_its_files_in_order(tmp_path: Path) -> None:
    from scaleforge.data.text import text

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "b.txt").write_bytes(b"b" * 500)
    (tmp_path / "corpus" / "a.txt").write_bytes(b"a" * 500)
    splits = text(str(tmp_path / "corpus"), seq_len=10, val_fraction=0.5)
    assert splits.info.vocab_size == 256 and splits.info.seq_len == 10
    train = {token for i in range(len(splits.train)) for token in splits.train[i][0].tolist()}
    val = {token for i in range(len(splits.val)) for token in splits.val[i][0].tolist()}
    assert train == {ord("a")}  # a.txt first: the head is training
    assert val == {ord("b")}  # the tail is validation
