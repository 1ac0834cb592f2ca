"""evaluate_arch / evaluate_model: the search objective."""

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from tangle_ray.errors import ConfigError
from tangle_ray.evaluate import evaluate_arch, evaluate_model, evaluate_on_split
from tangle_ray.tasks import get_task

LM = get_task("lm")


def _archs(space, n=4, seed=0):
    rng = random.Random(seed)
    return [space.smallest(), space.largest()] + [space.sample(rng) for _ in range(n)]


def test_mean_cross_entropy_of_the_single_path(supernet, eval_xy):
    x, y = eval_xy
    for arch in _archs(supernet.space):
        logits, _ = supernet(x, None, arch=arch)
        expected = F.cross_entropy(logits.reshape(-1, logits.size(-1)).double(), y.reshape(-1)).item()
        assert math.isclose(evaluate_arch(supernet, arch, LM, x, y)["loss"], expected, rel_tol=1e-6)


def test_same_number_for_any_batch_size_thread_count_and_the_extracted_model(supernet, eval_xy):
    x, y = eval_xy
    for arch in _archs(supernet.space):
        ref = evaluate_arch(supernet.net, arch, LM, x, y, batch_size=8)
        assert evaluate_arch(supernet, arch, LM, x, y, batch_size=1) == ref
        assert evaluate_arch(supernet, arch, LM, x, y, batch_size=len(x)) == ref
        torch.set_num_threads(2)
        assert evaluate_arch(supernet, arch, LM, x, y, batch_size=8) == ref
        torch.set_num_threads(1)
        assert evaluate_model(supernet.extract(arch), LM, x, y, batch_size=5) == ref


def test_eval_mode_without_dropout_no_grad_and_mode_restored(supernet_dir, eval_xy):
    from tangle_ray.folders import load_supernet

    x, y = eval_xy
    noisy, plain = load_supernet(supernet_dir, dropout=0.5), load_supernet(supernet_dir)
    arch = noisy.space.largest()
    noisy.train()
    first = evaluate_arch(noisy, arch, LM, x, y)
    assert first == evaluate_arch(noisy, arch, LM, x, y) == evaluate_arch(plain, arch, LM, x, y)
    assert noisy.training and all(p.grad is None for p in noisy.parameters())


def test_evaluate_on_split_with_a_supernet_or_an_exported_model(supernet_dir, data_dir, eval_xy, tmp_path):
    from tangle_ray.folders import load_supernet

    supernet = load_supernet(supernet_dir)
    arch = supernet.space.largest()
    ref = evaluate_arch(supernet, arch, LM, *eval_xy)
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
