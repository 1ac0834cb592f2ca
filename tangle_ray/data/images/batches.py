"""Keyed image micro-batches and fixed evaluation sets, read from a prepared folder (:class:`ImageStore`).

``ImageBatches.get(step, micro_index)`` is a pure function of ``(seed, split, step, micro_index)``: every
random choice (which images, crops, flips, RandAugment ops, erasing, the mixup/cutmix draw) comes from
Generators seeded by ``SeedSequence([seed, split_key, step, micro_index])`` and its children, so 1 and N ranks
(numbering the micro-batches of a global batch 0..G-1), worker processes and resumed runs get identical
batches. Images are drawn uniformly with replacement, like the text windows, or in epochs: sample ``n`` of the
run (``n = (step x G + micro_index) x micro_batch + b`` for ``G`` micro-batches per step) is image
``perm_e[n mod N]`` of epoch ``e = n // N``, a permutation keyed by ``(seed, split, e)``. ``get`` is
``finish(decode(...))``: the per-image part (uint8 out) and the batch part, so that another node can decode.
:class:`PrefetchedBatches` decodes ahead in DataLoader worker processes whose item ``key`` is the micro-batch of
that key; ``ray_decode.RayDataBatches`` in Ray Data actors anywhere in the cluster.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import count

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from tangle_ray.data.images.augment import (
    Augment,
    eval_crop,
    eval_image,
    mix,
    normalise,
    open_image,
    random_erase,
    train_image,
)
from tangle_ray.data.images.prepare import ImageStore
from tangle_ray.errors import ConfigError, DataError
from tangle_ray.keyed import name_key

Key = tuple[int, int]  # (step, micro_index)
EPOCH_KEY = 2**32 - 1  # keeps epoch permutations apart from the (step, micro_index) keys of the same split
_LOW = 2**64 - 1


def rng_words(g: np.random.Generator) -> list[int]:
    """A PCG64 generator's state as six uint64 words (state, increment, and the cached 32-bit half)."""
    s = g.bit_generator.state
    state, inc = s["state"]["state"], s["state"]["inc"]
    return [state >> 64, state & _LOW, inc >> 64, inc & _LOW, s["has_uint32"], s["uinteger"]]


def rng_of(words: Sequence[int]) -> np.random.Generator:
    """The generator whose state ``rng_words`` gave."""
    hi, lo, inc_hi, inc_lo, has, half = (int(w) for w in words)
    bits = np.random.PCG64()
    bits.state = {"bit_generator": "PCG64", "state": {"state": hi << 64 | lo, "inc": inc_hi << 64 | inc_lo},
                  "has_uint32": has, "uinteger": half}
    return np.random.Generator(bits)


@dataclass(frozen=True)
class Decoded:
    """Micro-batch ``(step, micro_index)`` decoded: uint8 ``pixels`` [B, C, H, W], the records ``picks`` [B] and
    each image's generator state after its augmentation, ``rngs`` uint64 [B, 6] (``rng_words``)."""

    step: int
    micro_index: int
    pixels: np.ndarray
    picks: np.ndarray
    rngs: np.ndarray


def _mode(in_chans: int) -> str:
    if in_chans not in (1, 3):
        raise ConfigError(f"in_chans = {in_chans!r} is not supported; allowed: [1, 3]")
    return "L" if in_chans == 1 else "RGB"


class ImageBatches:
    """Augmented training micro-batches: ``x`` float32 [micro_batch, in_chans, img_size, img_size] and
    ``y`` int64 [micro_batch] class indices, or float32 [micro_batch, num_classes] soft targets when mixup,
    cutmix or label smoothing is on (they sum to 1 per row)."""

    def __init__(
        self,
        store: ImageStore,
        split: str,
        micro_batch: int,
        seed: int,
        img_size: int,
        in_chans: int,
        num_classes: int,
        augment: Augment,
        epochs_of: int | None = None,
    ):
        """``epochs_of``: the micro-batches of one global batch, to sample in epochs; None: with replacement."""
        if micro_batch < 1 or seed < 0 or img_size < 1:
            raise ConfigError(f"micro_batch={micro_batch} and img_size={img_size} must be >= 1, seed={seed} >= 0")
        if store.num_classes > num_classes:
            raise DataError(
                f"prepared images {str(store.dir)!r} have {store.num_classes} classes; the model has {num_classes}"
            )
        self.store, self.split, self.micro_batch, self.seed = store, split, micro_batch, seed
        self.size, self.mode, self.num_classes, self.augment = img_size, _mode(in_chans), num_classes, augment
        self.records = store.split(split)
        self._key = name_key(split)
        if epochs_of is not None and epochs_of < 1:
            raise ConfigError(f"epochs_of = {epochs_of!r} micro-batches per step must be >= 1")
        self.epochs_of = epochs_of

    def _seeds(self, step: int, micro_index: int) -> list[np.random.SeedSequence]:
        """Children of the key's SeedSequence: [0] picks the images, [1] mixes the batch, [2 + b] image b."""
        if step < 0 or micro_index < 0:
            raise ValueError(f"step={step} and micro_index={micro_index} must be >= 0")
        return np.random.SeedSequence([self.seed, self._key, step, micro_index]).spawn(self.micro_batch + 2)

    def records_of(self, step: int, micro_index: int) -> np.ndarray:
        """Record indices of the images of micro-batch ``micro_index`` at ``step``."""
        return self._pick(step, micro_index, self._seeds(step, micro_index)[0])

    def _pick(self, step: int, micro_index: int, seed: np.random.SeedSequence) -> np.ndarray:
        n = len(self.records)
        if self.epochs_of is None:
            return self.records[np.random.default_rng(seed).integers(0, n, self.micro_batch)]
        first = (step * self.epochs_of + micro_index) * self.micro_batch
        samples = np.arange(first, first + self.micro_batch, dtype=np.int64)
        epochs, places = np.divmod(samples, n)
        picks = np.empty(self.micro_batch, dtype=np.int64)
        for epoch in np.unique(epochs):
            here = epochs == epoch
            picks[here] = self.epoch_order(int(epoch))[places[here]]
        return self.records[picks]

    def num_samples(self) -> int:
        """Images of the split it draws from."""
        return len(self.records)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation of this split's images in ``epoch`` (keyed by seed, split and epoch)."""
        seq = np.random.SeedSequence([self.seed, self._key, EPOCH_KEY, epoch])
        return np.random.default_rng(seq).permutation(len(self.records))

    def decode(self, step: int, micro_index: int) -> Decoded:
        """The per-image part of ``get``: the images decoded and augmented, uint8 (what a decoding node sends)."""
        seeds, aug, store = self._seeds(step, micro_index), self.augment, self.store
        picks = self._pick(step, micro_index, seeds[0])
        rngs = [np.random.default_rng(s) for s in seeds[2:]]
        pixels = np.stack(
            [train_image(store.encoded(r), store.where(r), self.size, self.mode, aug, g) for r, g in zip(picks, rngs)]
        )
        return Decoded(step, micro_index, pixels, picks, np.array([rng_words(g) for g in rngs], dtype=np.uint64))

    def finish(self, decoded: Decoded) -> tuple[Tensor, Tensor]:
        """The batch part of ``get``: normalise, random erasing (each image's generator goes on where decoding
        left it), labels and the batch mix."""
        aug = self.augment
        with warnings.catch_warnings():  # pixels from Ray's object store are read-only; normalise only reads them
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            x = normalise(torch.from_numpy(decoded.pixels))
        for image, words in zip(x, decoded.rngs):
            g = rng_of(words)
            if g.random() < aug.random_erase:
                random_erase(image, g)
        y = torch.from_numpy(self.store.labels[decoded.picks])
        if aug.soft_targets:
            mixing = np.random.default_rng(self._seeds(decoded.step, decoded.micro_index)[1])
            return mix(x, y, self.num_classes, aug, mixing)
        return x, y

    def get(self, step: int, micro_index: int) -> tuple[Tensor, Tensor]:
        return self.finish(self.decode(step, micro_index))


class _Keyed(Dataset):
    """Map-style dataset whose item ``key`` is the micro-batch of that key."""

    def __init__(self, batches: ImageBatches):
        self.batches = batches

    def __getitem__(self, key: Key) -> tuple[Tensor, Tensor]:
        return self.batches.get(*key)


class _Keys(Sampler):
    """The keys to decode next (set before each ``iter(loader)``)."""

    def __init__(self) -> None:
        self.keys: Iterable[Key] = ()

    def __iter__(self) -> Iterator[Key]:
        return iter(self.keys)


class AheadOfCalls:
    """``get`` of :class:`ImageBatches`, served from a stream decoded ahead (``_open``, by subclasses).

    The key order is learnt from the calls: once a step's micro indices J have been asked for, the first call
    of the next step opens a stream of (s, j) for s = step, step + 1, ... and j in J. A call off that sequence
    (a resumed run, another pattern) is answered directly and the order is learnt again. Results equal
    ``ImageBatches.get``'s bit for bit.
    """

    def __init__(self, batches: ImageBatches):
        self.batches = batches
        self._stream: Iterator[tuple[Tensor, Tensor]] | None = None
        self._start, self._pos = 0, 0  # the stream's first step, and how many keys it has given
        self._pattern: list[int] = []  # micro indices of one step, in the order asked for
        self._learning: int | None = None  # the step whose micro indices are being learnt

    def _open(self, keys: Iterator[Key]) -> Iterator[tuple[Tensor, Tensor]]:
        """The micro-batches of the (endless) ``keys``, in order."""
        raise NotImplementedError

    def num_samples(self) -> int:
        return self.batches.num_samples()

    def get(self, step: int, micro_index: int) -> tuple[Tensor, Tensor]:
        p = self._pattern
        if self._stream is not None:
            expected = (self._start + self._pos // len(p), p[self._pos % len(p)])
            if (step, micro_index) == expected:
                self._pos += 1
                return next(self._stream)
            self._stream = None
        if step == self._learning:
            if micro_index not in p:
                p.append(micro_index)
        elif self._learning is not None and step == self._learning + 1 and micro_index == p[0]:
            pattern = tuple(p)
            self._stream = self._open((s, j) for s in count(step) for j in pattern)
            self._start, self._pos, self._learning = step, 1, None
            return next(self._stream)
        else:
            self._learning, self._pattern = step, [micro_index]
        return self.batches.get(step, micro_index)

    def close(self) -> None:
        """Stop decoding ahead."""
        self._stream = None


class PrefetchedBatches(AheadOfCalls):
    """Micro-batches decoded ahead by ``num_workers`` persistent DataLoader worker processes on this node,
    ``prefetch`` micro-batches per worker ahead."""

    def __init__(self, batches: ImageBatches, num_workers: int, prefetch: int = 2):
        if num_workers < 1 or prefetch < 1:
            raise ConfigError(f"num_workers={num_workers} and prefetch={prefetch} must be >= 1 here")
        super().__init__(batches)
        self._keys = _Keys()
        self._loader = DataLoader(
            _Keyed(batches),
            batch_size=None,
            sampler=self._keys,
            num_workers=num_workers,
            prefetch_factor=prefetch,
            persistent_workers=True,
        )

    def _open(self, keys: Iterable[Key]) -> Iterator[tuple[Tensor, Tensor]]:
        self._keys.keys = keys
        return iter(self._loader)

    def iterate(self, keys: Iterable[Key]) -> Iterator[tuple[Tensor, Tensor]]:
        """The micro-batches of ``keys`` in order, decoded ahead (ends the prefetching of ``get``)."""
        self._stream, self._learning = None, None
        return self._open(keys)

    def close(self) -> None:
        """Stop the worker processes."""
        super().close()
        self._loader = None


def eval_records(records: np.ndarray, num: int, seed: int) -> np.ndarray:
    """A fixed sorted choice of ``num`` of ``records`` (all of them if fewer), the same for every caller."""
    if num < 1:
        raise ConfigError(f"the number of evaluation images must be at least 1, got {num}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, name_key("eval")]))
    return np.sort(rng.choice(records, size=min(num, len(records)), replace=False))


class _EvalChunks(Dataset):
    def __init__(self, store: ImageStore, chunks: list[np.ndarray], size: int, mode: str, crop: float | None):
        self.store, self.chunks, self.size, self.mode, self.crop = store, chunks, size, mode, crop

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> Tensor:
        s = self.store
        return torch.from_numpy(
            np.stack([eval_image(s.encoded(r), s.where(r), self.size, self.mode, self.crop) for r in self.chunks[i]])
        )


class EvalImages:
    """An evaluation set (``tasks.base.EvalSet``) of images ``records`` with the evaluation transform, decoded
    batch by batch (by ``num_workers`` processes, a few batches ahead, when there are several): memory holds a
    few batches, whatever the number of images. ``crop`` None: the crop that fits ``augment`` and the images'
    sizes (``augment.eval_crop``). It pickles as the store's paths and the records."""

    def __init__(self, store: ImageStore, records: np.ndarray, img_size: int, in_chans: int,
                 crop: float | None = None, augment: Augment = Augment(), num_workers: int = 0):
        sides = [min(open_image(store.encoded(r), store.where(r)).size) for r in records[:64]]  # headers only
        self.store, self.records, self.num_workers = store, records, num_workers
        self.img_size, self.mode, self.crop = img_size, _mode(in_chans), eval_crop(crop, augment, sides, img_size)

    def __len__(self) -> int:
        return len(self.records)

    def batches(self, size: int, which: Sequence[int]) -> Iterator[tuple[Tensor, Tensor]]:
        chunks = [self.records[i * size:(i + 1) * size] for i in which]
        dataset = _EvalChunks(self.store, chunks, self.img_size, self.mode, self.crop)
        workers = min(self.num_workers, len(chunks))
        decoded = (iter(DataLoader(dataset, batch_size=None, num_workers=workers)) if workers
                   else (dataset[i] for i in range(len(chunks))))
        for chunk, images in zip(chunks, decoded, strict=True):
            yield normalise(images), torch.from_numpy(self.store.labels[chunk])
