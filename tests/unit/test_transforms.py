from __future__ import annotations

import numpy as np
import pytest
import torch

from scaleforge.config import ComponentSpec, dump_yaml, load_config, parse_yaml_value
from scaleforge.data.base import ImageInput
from scaleforge.data.image_folder import FolderImages, build_transforms
from scaleforge.data.loading import BatchPlan, TrainBatches
from scaleforge.data.transforms import ColorJitter, HorizontalFlip, RandomCrop
from scaleforge.errors import ConfigError
from scaleforge.registry import TRANSFORMS

IMAGE_FOLDER = ["data.dataset=image_folder", "data.path=images"]


def _augment(value: str) -> object:
    return load_config(None, [*IMAGE_FOLDER, f"data.augment={value}"]).data.params["augment"]


def _dot(size: int = 16) -> torch.Tensor:
    image = torch.zeros(1, size, size)
    image[0, size // 2, size // 2] = 1.0  # one lit pixel: where it lands is the shift
    return image


def test_transforms_are_registered() -> None:
    assert {"random_crop", "hflip", "color_jitter"} <= set(TRANSFORMS.names())


def test_a_list_of_transforms_binds_each_with_its_settings() -> None:
    augment = _augment("[random_crop, {name: color_jitter, brightness: 0.1}]")
    assert augment == [
        ComponentSpec("random_crop", {"padding": 2}),
        ComponentSpec("color_jitter", {"brightness": 0.1, "contrast": 0.2}),
    ]
    assert _augment("true") is True and _augment("false") is False and _augment("[]") == []
    config = load_config(None, [*IMAGE_FOLDER, "data.augment=[{name: hflip, p: 0.3}]"])
    shown = parse_yaml_value(dump_yaml(config))
    assert shown["data"]["augment"] == [{"name": "hflip", "p": 0.3}]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("[random_crop, hflp]", "data.augment.1: unknown transform 'hflp' (did you mean 'hflip'?); one of: "),
        ("[{name: random_crop, paddin: 4}]", "data.augment.0.paddin: RandomCrop takes no parameter 'paddin' (did you"),
        ("[{name: hflip, p: high}]", "data.augment.0.p: expected a number, got a string 'high'"),
        ("3", "data.augment: expected true or false or a list of transform names or mappings with 'name', got an"),
    ],
)
def test_a_bad_transform_or_setting_fails_while_loading(value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as error:
        _augment(value)
    assert expected in str(error.value)


def test_a_bad_transform_is_one_line_and_exit_2_through_the_cli(cli) -> None:
    result = cli("train", *IMAGE_FOLDER, "data.augment=[random_crop, {name: hflip, q: 1}]")
    assert result.code == 2
    assert result.err.startswith("config error: data.augment.1.q: HorizontalFlip takes no parameter 'q'")
    assert result.err.count("\n") == 1


def test_random_crop_shifts_the_image_by_at_most_its_padding() -> None:
    torch.manual_seed(0)
    shifts = set()
    for _ in range(50):
        cropped = RandomCrop(padding=2)(_dot())
        assert cropped.shape == (1, 16, 16) and cropped.sum() == 1
        y, x = divmod(int(cropped.argmax()), 16)
        shifts.add((y - 8, x - 8))
    assert shifts <= {(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)} and len(shifts) > 10
    assert torch.equal(RandomCrop(padding=0)(_dot()), _dot())


def test_random_crop_pads_2_pixels_by_default_and_never_more_than_the_image_allows() -> None:
    torch.manual_seed(0)
    assert {int(RandomCrop()(_dot()).argmax()) % 16 - 8 for _ in range(100)} == set(range(-2, 3))
    tiny = torch.rand(1, 2, 2)
    assert all(RandomCrop(padding=5)(tiny).shape == (1, 2, 2) for _ in range(10))


def test_hflip_mirrors_at_p_1_and_never_at_p_0() -> None:
    image = torch.arange(12.0).view(1, 3, 4)
    assert torch.equal(HorizontalFlip(p=1)(image), image.flip(-1))
    assert all(torch.equal(HorizontalFlip(p=0)(image), image) for _ in range(20))


def test_color_jitter_scales_brightness_and_contrast_within_its_range() -> None:
    torch.manual_seed(0)
    image = torch.linspace(0.2, 0.6, 16).view(1, 4, 4)
    assert torch.allclose(ColorJitter(brightness=0, contrast=0)(image), image)
    jittered = [ColorJitter(brightness=0.3, contrast=0)(image) for _ in range(20)]
    ratios = [float(j.sum() / image.sum()) for j in jittered]
    assert all(0.7 - 1e-5 <= r <= 1.3 + 1e-5 for r in ratios) and max(ratios) - min(ratios) > 0.1
    stretched = ColorJitter(brightness=0, contrast=0.5)(image)
    assert stretched.min() >= 0 and stretched.max() <= 1 and not torch.allclose(stretched, image)


def test_the_default_set_crops_and_never_mirrors() -> None:
    assert [type(t) for t in build_transforms(True)] == [RandomCrop] and build_transforms(False) == []
    image = torch.zeros(1, 8, 8)
    image[..., :4] = 1.0  # a bright left half
    torch.manual_seed(0)
    for _ in range(50):
        (augmented,) = [t(image) for t in build_transforms(True)]
        assert augmented[..., :4].sum() > augmented[..., 4:].sum()


@pytest.mark.parametrize("value", ["[{name: hflip, p: 2}]", "[{name: random_crop, padding: -1}]"])
def test_a_setting_out_of_range_is_rejected(value: str) -> None:
    with pytest.raises(ValueError, match="must be"):
        build_transforms(_augment(value))  # type: ignore[arg-type]


def test_a_sample_gets_the_same_augmentation_with_any_number_of_workers() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (64, 1, 8, 8), dtype=np.uint8)
    spec = ImageInput(size=8, channels=1, mean=(0.5,), std=(0.25,))
    transforms = build_transforms(_augment("[random_crop, hflip, color_jitter]"))  # type: ignore[arg-type]
    dataset = FolderImages(pixels, np.arange(64), torch.arange(64), spec, transforms)
    plan = BatchPlan(16, grad_accum_steps=2)
    cpu = torch.device("cpu")
    inline = TrainBatches(dataset, plan, seed=3, device=cpu, num_workers=0)
    workers = TrainBatches(dataset, plan, seed=3, device=cpu, num_workers=2)
    torch.manual_seed(1)  # the run's own stream, which reading samples in this process leaves alone
    before = torch.rand(3)
    torch.manual_seed(1)
    first = list(inline.epoch(1))
    assert torch.equal(torch.rand(3), before)
    for step, other in zip(first, workers.epoch(1), strict=True):
        for (inputs, targets), (other_inputs, other_targets) in zip(step, other, strict=True):
            assert torch.equal(targets, other_targets) and torch.equal(inputs, other_inputs)
    augmented = torch.cat([inputs for step in first for inputs, _ in step])
    seen = torch.cat([targets for step in first for _, targets in step])  # the targets are the sample indices
    plain = spec.normalise(torch.from_numpy(pixels)[seen] / 255)
    assert not torch.equal(augmented, plain)
    again = torch.cat([inputs for step in inline.epoch(2) for inputs, _ in step])
    assert again.shape == augmented.shape and not torch.equal(again, augmented)  # drawn anew each epoch
