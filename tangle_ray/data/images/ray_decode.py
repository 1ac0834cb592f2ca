"""Micro-batches decoded by Ray Data actors anywhere in the cluster (CPU-only nodes, say) and streamed to a
trainer: image decoding scaled out for GPUs that their own node's cores cannot feed (``docs/benchmarks.md``,
section 7).

The stream is one Ray Data pipeline per window of keys: ``ray.data.from_items`` (a block per key) mapped in order
(``preserve_order``) by decoding actors that run ``ImageBatches.decode`` and send uint8 pixels, a quarter of
float32's bytes; the trainer finishes each micro-batch (``ImageBatches.finish``: normalise, erase, mix). Every
micro-batch is a function of its key, so which node decodes it changes no bit.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from itertools import islice

import numpy as np
from torch import Tensor

from tangle_ray.data.images.batches import AheadOfCalls, Decoded, ImageBatches, Key

WINDOW = 1024  # keys per pipeline: putting a key's block costs about 1 ms, and each pipeline starts its actors


class _Decode:
    """A decoding actor: each row's key decoded (``ImageBatches.decode``)."""

    FIELDS = ("step", "micro_index", "pixels", "picks", "rngs")

    def __init__(self, batches: ImageBatches):
        self.batches = batches

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        decoded = [self.batches.decode(int(s), int(j)) for s, j in zip(rows["step"], rows["micro_index"])]
        return {"step": rows["step"], "micro_index": rows["micro_index"],
                **{k: np.stack([getattr(d, k) for d in decoded]) for k in self.FIELDS[2:]}}


class RayDataBatches(AheadOfCalls):
    """``ImageBatches.get`` decoded ahead by up to ``decoders`` Ray Data actors of ``resources`` each (e.g.
    ``{"CPU": 1, "decode": 1}`` keeps them on nodes that declare a ``decode`` resource); ``prefetch``
    micro-batches wait in the trainer."""

    def __init__(self, batches: ImageBatches, decoders: int, resources: Mapping[str, float], prefetch: int):
        super().__init__(batches)
        self.decoders, self.prefetch = decoders, prefetch
        self.resources = dict(resources)
        self.cpus = self.resources.pop("CPU", 0.0)  # Ray Data takes CPUs apart from the other resources

    def _open(self, keys: Iterator[Key]) -> Iterator[tuple[Tensor, Tensor]]:
        while window := list(islice(keys, WINDOW)):
            yield from self._window(window)

    def _window(self, keys: list[Key]) -> Iterator[tuple[Tensor, Tensor]]:
        """The micro-batches of ``keys``. The keys are the dataset's blocks, put by this process: no read tasks,
        which would need CPUs that the trainers and decoders may hold."""
        import ray.data

        dataset = ray.data.from_items([{"step": s, "micro_index": j} for s, j in keys], override_num_blocks=len(keys))
        dataset = dataset.map_batches(_Decode, fn_constructor_args=(self.batches,), batch_size=1,
                                      concurrency=(1, self.decoders), num_cpus=self.cpus,
                                      resources=self.resources or None)
        dataset.context.execution_options.preserve_order = True
        dataset.context.enable_progress_bars = False
        blocks = dataset.iter_batches(batch_size=None, prefetch_batches=self.prefetch, batch_format="numpy")
        given = 0
        for block in blocks:
            for step, micro_index, pixels, picks, rngs in zip(*(block[k] for k in _Decode.FIELDS)):
                if (int(step), int(micro_index)) != keys[given]:
                    raise RuntimeError(f"Ray Data gave micro-batch {(int(step), int(micro_index))} where "
                                       f"{keys[given]} was due")
                given += 1
                yield self.batches.finish(Decoded(int(step), int(micro_index), pixels, picks, rngs))
        if given != len(keys):
            raise RuntimeError(f"Ray Data gave {given} of the window's {len(keys)} micro-batches")
