"""How far TangleNAS's layer norm (over the padded width) puts a one-hot supernet from the model it extracts.

For architectures of a GPT space (default gpt-nano, fp64, nanoGPT initialisation unless ``--supernet`` names
an exported supernet folder), the logits of the supernet run with one-hot mixing weights are compared with
those of the extracted standalone model: once with tangle_ray's per-width layer norm (the default) and once
with every ``EntangledLayerNorm`` set to ``reference=True`` (TangleNAS's MixedLayerNormV2). All else is
tangle_ray's, so the difference is the layer norm alone. Relative error = ||z_sup - z_ext|| / ||z_ext|| over
all positions; top-1 = share of positions whose most likely next token agrees.
    python bench/fidelity.py [--space gpt-nano] [--per-width 4] [--batch 4] [--seed 0] [--supernet DIR]
                             [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import random

import torch
from torch import Tensor, nn

from tangle_ray import load_space
from tangle_ray.ops.norm import EntangledLayerNorm


def set_reference_norm(net: nn.Module, reference: bool) -> None:
    for m in net.modules():
        if isinstance(m, EntangledLayerNorm):
            m.reference = reference


def compare(net: nn.Module, space, arch: dict, idx: Tensor) -> dict[str, float]:
    """Logit error and top-1 agreement of the one-hot supernet (both norms) against the extracted model."""
    with torch.no_grad():
        ext = net.extract(arch).eval()(idx)[0]
        w = {k: v.to(ext.dtype) for k, v in space.one_hot(arch).items()}
        row: dict[str, float] = {}
        for label, reference in (("default", False), ("reference", True)):
            set_reference_norm(net, reference)
            z = net(idx, weights=w)[0]
            row[f"{label}_rel_err"] = float((z - ext).norm() / ext.norm())
            row[f"{label}_top1"] = float((z.argmax(-1) == ext.argmax(-1)).double().mean())
        set_reference_norm(net, False)
    return row


def build_net(space_name: str, supernet_dir: str | None, seed: int) -> tuple[nn.Module, object]:
    torch.manual_seed(seed)
    if supernet_dir:
        from tangle_ray.folders import load_supernet

        supernet = load_supernet(supernet_dir)
        net, space = supernet.net, supernet.space
    else:
        from tangle_ray.models.gpt import EntangledGPT

        space = load_space(space_name)
        net = EntangledGPT(space)
    return net.double().eval(), space


def run(
    space_name: str = "gpt-nano", per_width: int = 4, seed: int = 0, supernet_dir: str | None = None,
    batch: int = 4,
) -> list[dict]:
    net, space = build_net(space_name, supernet_dir, seed)
    rng = random.Random(seed)
    T = space.fixed["block_size"]
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, space.fixed["vocab_size"], (batch, T), generator=gen)
    rows = []
    for e in space.dims["n_embd"].values:
        for _ in range(per_width):
            arch = {**space.sample(rng), "n_embd": e}
            rows.append({"n_embd": e, "n_layer": arch["n_layer"], **compare(net, space, arch, idx)})
    return rows


def summary(rows: list[dict]) -> list[dict]:
    out = []
    for e in sorted({r["n_embd"] for r in rows}):
        rs = [r for r in rows if r["n_embd"] == e]
        out.append({
            "n_embd": e, "archs": len(rs),
            "default_max_rel_err": max(r["default_rel_err"] for r in rs),
            "reference_mean_rel_err": sum(r["reference_rel_err"] for r in rs) / len(rs),
            "reference_max_rel_err": max(r["reference_rel_err"] for r in rs),
            "reference_mean_top1": sum(r["reference_top1"] for r in rs) / len(rs),
        })
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default="gpt-nano")
    ap.add_argument("--per-width", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=4, help="windows of block_size tokens per comparison")
    ap.add_argument("--supernet", default=None, help="an exported supernet folder (trained weights)")
    ap.add_argument("--json", default=None, help="also write the per-architecture rows here")
    args = ap.parse_args()
    rows = run(args.space, args.per_width, args.seed, args.supernet, args.batch)
    header = ("n_embd", "archs", "default max", "ref. mean", "ref. max", "ref. top-1")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (6, 5, 12, 10, 10, 10))))
    for s in summary(rows):
        print(f"{s['n_embd']:>6} {s['archs']:>5} {s['default_max_rel_err']:>12.1e} "
              f"{s['reference_mean_rel_err']:>10.3f} {s['reference_max_rel_err']:>10.3f} "
              f"{s['reference_mean_top1']:>10.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "summary": summary(rows)}, f, indent=2)


if __name__ == "__main__":
    main()
