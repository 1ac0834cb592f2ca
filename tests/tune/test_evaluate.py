"""evaluate_arch / evaluate_model: the search objective."""

import json
import math
import pickle
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F

from tangle_ray.errors import ConfigError
from tangle_ray.evaluate import Shard, evaluate_arch, evaluate_model, evaluate_on_split, score
from tangle_ray.tasks import get_task

LM = get_task("lm")


def _archs(space, n=4, seed=0):
    rng = random.Random(seed)
    return [space.smallest(), space.largest()] + [space.sample(rng) for _ in range(n)]


def test_mean_cross_entropy_of_the_single_path(supernet, eval_samples):
    x, y = eval_samples.x, eval_samples.y
    for arch in _archs(supernet.space):
        logits, _ = supernet(x, None, arch=arch)
        expected = F.cross_entropy(logits.reshape(-1, logits.size(-1)).double(), y.reshape(-1)).item()
        assert math.isclose(evaluate_arch(supernet, arch, LM, eval_samples)["loss"], expected, rel_tol=1e-6)


def test_same_number_for_any_batch_size_thread_count_and_the_extracted_model(supernet, eval_samples):
    for arch in _archs(supernet.space):
        ref = evaluate_arch(supernet.net, arch, LM, eval_samples, batch_size=8)
        assert evaluate_arch(supernet, arch, LM, eval_samples, batch_size=1) == ref
        assert evaluate_arch(supernet, arch, LM, eval_samples, batch_size=len(eval_samples)) == ref
        torch.set_num_threads(2)
        assert evaluate_arch(supernet, arch, LM, eval_samples, batch_size=8) == ref
        torch.set_num_threads(1)
        assert evaluate_model(supernet.extract(arch), LM, eval_samples, batch_size=5) == ref


def test_eval_mode_without_dropout_no_grad_and_mode_restored(supernet_dir, eval_samples):
    from tangle_ray.folders import load_supernet

    noisy, plain = load_supernet(supernet_dir, dropout=0.5), load_supernet(supernet_dir)
    arch = noisy.space.largest()
    noisy.train()
    first = evaluate_arch(noisy, arch, LM, eval_samples)
    assert first == evaluate_arch(noisy, arch, LM, eval_samples) == evaluate_arch(plain, arch, LM, eval_samples)
    assert noisy.training and all(p.grad is None for p in noisy.parameters())


def test_evaluate_on_split_with_a_supernet_or_an_exported_model(supernet_dir, data_dir, eval_samples, tmp_path):
    from tangle_ray.folders import load_supernet

    supernet = load_supernet(supernet_dir)
    arch = supernet.space.largest()
    ref = evaluate_arch(supernet, arch, LM, eval_samples)
    (tmp_path / "arch.json").write_text(json.dumps(arch))
    by_file = evaluate_on_split(
        data_dir, "valid", supernet=supernet_dir, arch=tmp_path / "arch.json", num_samples=32
    )
    assert (by_file["loss"], by_file["tokens"], by_file["arch"]) == (ref["loss"], 32 * 16, arch)
    supernet.extract(arch).save_pretrained(tmp_path / "model", arch=arch)
    exported = evaluate_on_split(data_dir, "valid", model=tmp_path / "model", num_samples=32)
    assert exported["loss"] == ref["loss"] and exported["params"] == by_file["params"] == supernet.space.param_count(
        arch
    )
    argmax = evaluate_on_split(data_dir, "test", supernet=supernet_dir, num_samples=8)
    assert argmax["arch"] == supernet.argmax_arch() and argmax["samples"] == argmax["asked"] == 8
    with pytest.raises(ConfigError, match="supernet folder"):
        evaluate_on_split(data_dir, "valid", supernet=supernet_dir, model=tmp_path / "model")


def _on_ranks(world: int, run):
    """``run(shard)`` on ``world`` threads standing in for the ranks of a run; each rank's result, in rank order."""
    values: list = [None] * world
    barrier = threading.Barrier(world)

    def gather_of(rank: int):
        def gather(value):
            values[rank] = value
            barrier.wait()
            return list(values)
        return gather

    with ThreadPoolExecutor(world) as pool:
        return list(pool.map(lambda r: run(Shard(r, world, gather_of(r))), range(world)))


def test_streamed_and_sharded_evaluation_equals_whole_tensor_evaluation(supernet_dir, data_dir, eval_samples):
    """The evaluation set read batch by batch from the folder (not held) and scored in shards by 1-3 ranks gives
    the metrics and per-sample losses of the whole-tensor set, bit for bit, with as many forward passes on
    every rank (ZeRO-3 gathers weights in each); the set pickles as indices, not samples."""
    from tangle_ray.folders import load_supernet
    from tangle_ray.tasks.lm import TextData

    supernet = load_supernet(supernet_dir)
    streamed = LM.eval_set(TextData(dir=str(data_dir)), supernet.space.fixed, "valid", 32, 0)
    assert len(pickle.dumps(streamed)) < 2_000 < eval_samples.x.numel() * 8
    arch = supernet.space.sample(random.Random(torch.randint(0, 1000, ()).item()))  # a fresh one each run
    whole = evaluate_arch(supernet, arch, LM, eval_samples, batch_size=6, per_sample=True)
    for world in (1, 2, 3):
        passes = [0] * world

        def run(shard, passes=passes):
            def output_of(x):
                passes[shard.rank] += 1
                return supernet(x, None, arch=arch)[0]
            return score(supernet, output_of, LM, streamed, 6, per_sample=True, shard=shard)

        assert _on_ranks(world, run) == [whole] * world
        assert passes == [-(-6 // world)] * world  # 32 windows in 6 batches of 6
