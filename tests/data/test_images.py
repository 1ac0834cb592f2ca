import numpy as np
import pytest
import torch
from PIL import Image

from tangle_ray.data.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    ImageDataset,
    ImageSource,
    TrainTransform,
    load_image_source,
    split_balanced,
)
from tangle_ray.errors import ConfigError


@pytest.fixture
def folder(tmp_path):
    """train/{cat,dog}: 4 + 3 images, validation/{cat,dog}: 2 + 2, of assorted sizes."""
    rng = np.random.default_rng(0)
    for split, counts in (("train", (4, 3)), ("validation", (2, 2))):
        for cls, n in zip(("cat", "dog"), counts):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (20 + 7 * i, 40 - 5 * i, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.png")
    return tmp_path


def test_load_and_dataset(folder):
    dsd = load_image_source(ImageSource(path=str(folder)))
    assert sorted(dsd) == ["test", "train"] and dsd["train"].column_names == ["image", "label"]
    assert sorted(dsd["train"]["label"]) == [0, 0, 0, 0, 1, 1, 1]
    train = ImageDataset(dsd["train"], TrainTransform(size=16), seed=0)
    x, label = train[2]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and label in (0, 1)
    assert torch.equal(train[2][0], x)  # seeded: the same augmentation on every read
    train.set_epoch(1)
    assert not torch.equal(train[2][0], x)
    batch, labels = next(
        iter(torch.utils.data.DataLoader(ImageDataset(dsd["test"], EvalTransform(16)), batch_size=4))
    )
    assert batch.shape == (4, 3, 16, 16) and labels.tolist() == sorted(labels.tolist())


def test_transforms_shapes_determinism_and_normalisation():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 80, 3), dtype=np.uint8))
    train = TrainTransform(size=24)
    a = train(img, torch.Generator().manual_seed(3))
    assert a.shape == (3, 24, 24)
    assert torch.equal(a, train(img, torch.Generator().manual_seed(3)))
    assert not torch.equal(a, train(img, torch.Generator().manual_seed(4)))
    assert train(img).shape == (3, 24, 24)
    for width, height in ((80, 50), (500, 20), (20, 500), (3, 3)):  # incl. the centred fallback crop
        for seed in range(20):
            left, top, right, bottom = train.crop_box(width, height, torch.Generator().manual_seed(seed))
            assert 0 <= left < right <= width and 0 <= top < bottom <= height

    evaluated = EvalTransform(size=24)(img)
    assert evaluated.shape == (3, 24, 24) and torch.equal(evaluated, EvalTransform(size=24)(img))
    white = EvalTransform(size=8)(Image.new("RGB", (30, 10), (255, 255, 255)))
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(white, expected[:, None, None].expand(3, 8, 8))


def test_split_balanced():
    labels = [0] * 10 + [1] * 20 + [2] * 1
    train, valid = split_balanced(labels, 0.3, seed=0)
    assert np.bincount(np.asarray(labels)[valid], minlength=3).tolist() == [3, 6, 0]
    assert sorted(np.concatenate([train, valid]).tolist()) == list(range(31)) and not set(train) & set(valid)
    again = split_balanced(labels, 0.3, seed=0)
    assert np.array_equal(again[1], valid)
    assert not np.array_equal(split_balanced(labels, 0.3, seed=1)[1], valid)
    with pytest.raises(ConfigError, match="valid_fraction=0 must lie strictly between"):
        split_balanced(labels, 0, seed=0)


def test_image_source_errors(folder):
    with pytest.raises(ConfigError, match="no column 'target'"):
        load_image_source(ImageSource(path=str(folder), label_field="target"))
    with pytest.raises(ConfigError, match="not a directory"):
        load_image_source(ImageSource(path=str(folder / "missing")))
    with pytest.raises(ConfigError, match="kind 'zip' is unknown"):
        ImageSource(kind="zip", path=str(folder))
    (folder / "train" / "cat" / "0.png").write_bytes(b"not an image")
    dsd = load_image_source(ImageSource(path=str(folder)))
    broken = ImageDataset(dsd["train"], EvalTransform(8), indices=[0])
    with pytest.raises(ConfigError, match="0.png' cannot be decoded"):
        broken[0]
