"""GPT: the weight-entangled supernet of a GPT space and the standalone model it extracts to.

``GPT`` is a plain nanoGPT-style decoder (per-layer head counts and MLP ratios). ``EntangledGPT``
holds the largest architecture's weights under the same names and runs in three modes:
superposition (``weights=W``), single path (``arch=A``) and extraction (``extract(A)`` -> ``GPT``).
``GPTFamily`` registers the family: the schema of its space files, parameter and FLOP counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tangle_ray.errors import ConfigError
from tangle_ray.models.registry import ModelFamily, Pretrained, Setting, register
from tangle_ray.ops import EntangledAttention, EntangledEmbedding, EntangledLayerNorm, EntangledLinear
from tangle_ray.ops.depth import path_depth, superpose_depth
from tangle_ray.ops.linear import prefix_indicators
from tangle_ray.space import Arch, SearchSpace
from tangle_ray.tasks.lm import lm_loss


def hidden_width(n_embd: int, mlp_ratio: float) -> int:
    return int(round(n_embd * mlp_ratio))


def _init_weights(model: nn.Module, n_layer: int) -> None:
    """nanoGPT's initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer)."""
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            nn.init.zeros_(p)
        elif "ln_" in name:
            nn.init.ones_(p)
        else:
            std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("c_proj.weight") else 0.02
            nn.init.normal_(p, 0.0, std)


# ===================================================================== standalone model


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int
    n_layer: int
    n_embd: int
    n_head: list[int]
    mlp_ratio: list[float]
    bias: bool = False
    dropout: float = 0.0


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, bias: bool, dropout: float):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.c_attn(x).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, n_embd: int, hidden: int, bias: bool):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, hidden, bias=bias)
        self.c_proj = nn.Linear(hidden, n_embd, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        c = config
        self.ln_1 = nn.LayerNorm(c.n_embd, bias=c.bias)
        self.attn = CausalSelfAttention(c.n_embd, c.n_head[layer], c.bias, c.dropout)
        self.ln_2 = nn.LayerNorm(c.n_embd, bias=c.bias)
        self.mlp = MLP(c.n_embd, hidden_width(c.n_embd, c.mlp_ratio[layer]), c.bias)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.ln_1(x)))
        return x + self.drop(self.mlp(self.ln_2(x)))


class GPT(Pretrained):
    """A nanoGPT-style GPT with tied input/output embeddings."""

    family = "gpt"
    config_class = GPTConfig

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = c = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(c.vocab_size, c.n_embd),
            wpe=nn.Embedding(c.block_size, c.n_embd),
            drop=nn.Dropout(c.dropout),
            h=nn.ModuleList(Block(c, i) for i in range(c.n_layer)),
            ln_f=nn.LayerNorm(c.n_embd, bias=c.bias),
        ))
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight
        _init_weights(self, c.n_layer)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        t = self.transformer
        pos = torch.arange(idx.size(1), device=idx.device)
        x = t.drop(t.wte(idx) + t.wpe(pos))
        for block in t.h:
            x = block(x)
        logits = self.lm_head(t.ln_f(x))
        return logits, lm_loss(logits, targets)


# ===================================================================== supernet


class EntangledBlock(nn.Module):
    def __init__(self, widths: list[int], heads: list[int], ratios: list[float], bias: bool, dropout: float):
        super().__init__()
        D, R = max(widths), max(ratios)
        combos = [(e, hidden_width(e, r)) for e in widths for r in ratios]
        self.ln_1 = EntangledLayerNorm(D, widths, bias)
        self.attn = EntangledAttention(widths, heads, bias, dropout)
        self.ln_2 = EntangledLayerNorm(D, widths, bias)
        self.mlp = nn.Module()
        self.mlp.c_fc = EntangledLinear(D, hidden_width(D, R), bias, [(hid, e) for e, hid in combos])
        self.mlp.c_proj = EntangledLinear(hidden_width(D, R), D, bias, combos)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, w_embd: Tensor | None = None, w_head: Tensor | None = None,
                w_ratio: Tensor | None = None, *, width: int = 0, n_head: int = 0, ratio: float = 0.0,
                output_mix: bool = False) -> Tensor:
        if w_embd is None:  # single path at the real widths
            hid = hidden_width(width, ratio)
            x = x + self.drop(self.attn(self.ln_1(x, width=width), width=width, n_head=n_head))
            h = F.gelu(self.mlp.c_fc(self.ln_2(x, width=width), out=hid, inp=width))
            return x + self.drop(self.mlp.c_proj(h, out=width, inp=hid))
        w_mlp = torch.outer(w_embd, w_ratio).flatten()  # combi-superposition: every (width, ratio) pair
        x = x + self.drop(self.attn(self.ln_1(x, w_embd), w_embd, w_head, output_mix=output_mix))
        h = F.gelu(self.mlp.c_fc(self.ln_2(x, w_embd), w_mlp, output_mix=output_mix))
        return x + self.drop(self.mlp.c_proj(h, w_mlp, output_mix=output_mix))


class EntangledGPT(nn.Module):
    """The largest GPT of a space, every architecture of the space a slice of it."""

    def __init__(self, space: SearchSpace, **overrides):
        super().__init__()
        self.space = space
        fixed = {**space.fixed, **overrides}
        self.vocab_size, self.block_size = fixed["padded_vocab_size"], fixed["block_size"]
        self.bias, self.dropout = fixed["bias"], fixed["dropout"]
        self.widths = list(space.dims["n_embd"].values)
        self.depths = list(space.dims["n_layer"].values)
        D, L = max(self.widths), space.max_layers
        heads, ratios = list(space.dims["n_head"].values), list(space.dims["mlp_ratio"].values)
        self.transformer = nn.ModuleDict(dict(
            wte=EntangledEmbedding(self.vocab_size, D),
            wpe=EntangledEmbedding(self.block_size, D),
            drop=nn.Dropout(self.dropout),
            h=nn.ModuleList(EntangledBlock(self.widths, heads, ratios, self.bias, self.dropout) for _ in range(L)),
            ln_f=EntangledLayerNorm(D, self.widths, self.bias),
        ))
        self.lm_head = EntangledLinear(D, self.vocab_size, False, [(self.vocab_size, e) for e in self.widths])
        self.lm_head.weight = self.transformer.wte.weight
        self.register_buffer("width_ind", prefix_indicators(self.widths, D), False)
        _init_weights(self, L)

    def forward(self, idx: Tensor, targets: Tensor | None = None, *, weights: dict[str, Tensor] | None = None,
                arch: Arch | None = None, output_mix: bool = False,
                keep_all_params: bool = False) -> tuple[Tensor, Tensor | None]:
        """Logits and loss, superposed over mixing ``weights`` or on the single path ``arch``.

        ``keep_all_params`` (single path) adds a zero-valued term that runs the unused layers on one
        token, so every parameter gets a (zero) gradient: ZeRO needs the same parameters in each step.
        """
        if (weights is None) == (arch is None):
            raise ValueError("pass exactly one of weights= (superposition) or arch= (single path)")
        T = idx.size(1)
        if T > self.block_size:
            raise ValueError(f"sequence length {T} exceeds the context of {self.block_size}")
        pos = torch.arange(T, device=idx.device)
        if arch is not None:
            return self._path(idx, targets, pos, self.space.validate(arch), keep_all_params)
        return self._superposed(idx, targets, pos, weights, output_mix)

    def compile_superposition(self, **options) -> None:
        """``torch.compile`` the superposition forward (it fuses the masks and mixing into few kernels);
        single paths stay eager, since every architecture would be a graph of its own."""
        self._superposed = torch.compile(self._superposed, **options)

    def _superposed(self, idx: Tensor, targets: Tensor | None, pos: Tensor, weights: dict[str, Tensor],
                    output_mix: bool) -> tuple[Tensor, Tensor | None]:
        t = self.transformer
        w_embd = weights["n_embd"]
        mask = w_embd.to(self.width_ind.dtype) @ self.width_ind
        x = t.drop((t.wte(idx) + t.wpe(pos)) * mask.to(t.wte.weight.dtype))
        layers = [partial(block, w_embd=w_embd, w_head=weights["n_head"][i], w_ratio=weights["mlp_ratio"][i],
                          output_mix=output_mix) for i, block in enumerate(t.h)]
        out = superpose_depth(x, layers, self.depths, weights["n_layer"])
        logits = self.lm_head(t.ln_f(out, w_embd), w_embd, output_mix=output_mix)
        return logits, lm_loss(logits, targets)

    def _path(self, idx: Tensor, targets: Tensor | None, pos: Tensor, arch: Arch,
              keep_all_params: bool) -> tuple[Tensor, Tensor | None]:
        t, e, depth = self.transformer, arch["n_embd"], arch["n_layer"]
        x = t.drop(t.wte(idx, width=e) + t.wpe(pos, width=e))
        layers = [partial(block, width=e, n_head=arch["n_head"][i], ratio=arch["mlp_ratio"][i])
                  for i, block in enumerate(t.h)]
        x, zero = path_depth(x, layers, depth, keep_all_params and self.training)
        logits = self.lm_head(t.ln_f(x, width=e), out=self.vocab_size, inp=e)
        loss = lm_loss(logits, targets)
        return logits, (loss + zero if loss is not None and keep_all_params else loss)

    def extract(self, arch: Arch) -> GPT:
        """A standalone ``GPT`` of exactly ``arch`` holding copies of the supernet's weights."""
        arch = self.space.validate(arch)
        e, depth = arch["n_embd"], arch["n_layer"]
        t = self.transformer
        model = GPT(self.arch_config(arch)).to(t.wte.weight.device, t.wte.weight.dtype)
        state = {
            "transformer.wte.weight": t.wte.weight[:, :e],
            "transformer.wpe.weight": t.wpe.weight[:, :e],
            "transformer.ln_f.weight": t.ln_f.weight[:e],
        }
        if self.bias:
            state["transformer.ln_f.bias"] = t.ln_f.bias[:e]
        for i in range(depth):
            block, hid, prefix = t.h[i], hidden_width(e, arch["mlp_ratio"][i]), f"transformer.h.{i}."
            for name, tensor in block.attn.sliced_state(e, arch["n_head"][i]).items():
                state[prefix + "attn." + name] = tensor
            for ln in ("ln_1", "ln_2"):
                lnm = getattr(block, ln)
                state[prefix + ln + ".weight"] = lnm.weight[:e]
                if self.bias:
                    state[prefix + ln + ".bias"] = lnm.bias[:e]
            for name, (o, i_) in (("c_fc", (hid, e)), ("c_proj", (e, hid))):
                weight, bias = getattr(block.mlp, name).sliced(o, i_)
                state[prefix + f"mlp.{name}.weight"] = weight
                if bias is not None:
                    state[prefix + f"mlp.{name}.bias"] = bias
        state["lm_head.weight"] = state["transformer.wte.weight"]
        with torch.no_grad():
            model.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)
        return model

    def arch_config(self, arch: Arch) -> GPTConfig:
        return gpt_config(self.space, arch, dropout=self.dropout)


def gpt_config(space: SearchSpace, arch: Arch, **overrides) -> GPTConfig:
    """The standalone model of one architecture of ``space`` (``overrides`` replace fixed settings)."""
    f = {**space.fixed, **overrides}
    depth = arch["n_layer"]
    return GPTConfig(
        vocab_size=f["padded_vocab_size"], block_size=f["block_size"], n_layer=depth, n_embd=arch["n_embd"],
        n_head=list(arch["n_head"][:depth]), mlp_ratio=list(arch["mlp_ratio"][:depth]),
        bias=f["bias"], dropout=f["dropout"],
    )


# ===================================================================== the family


@register
class GPTFamily(ModelFamily):
    name = "gpt"
    model_class = GPT
    task = "lm"
    depth_dim = "n_layer"
    dims = {"n_layer": False, "n_embd": False, "n_head": True, "mlp_ratio": True}
    integer_dims = ("n_layer", "n_embd", "n_head")
    fixed = {
        "vocab_size": Setting(int), "padded_vocab_size": Setting(int), "block_size": Setting(int),
        "bias": Setting(bool), "dropout": Setting(float),
    }

    def check(self, space: SearchSpace) -> None:
        src, f, dims = space.source, space.fixed, space.dims
        if f["padded_vocab_size"] < f["vocab_size"]:
            raise ConfigError(
                f"{src}: fixed.padded_vocab_size = {f['padded_vocab_size']} must be >= vocab_size = {f['vocab_size']}"
            )
        for key in ("vocab_size", "block_size"):
            if f[key] < 1:
                raise ConfigError(f"{src}: fixed.{key} = {f[key]} must be positive")
        if not 0.0 <= f["dropout"] < 1.0:
            raise ConfigError(f"{src}: fixed.dropout = {f['dropout']} must be in [0, 1)")
        for h in dims["n_head"].values:
            for e in dims["n_embd"].values:
                if e % h:
                    raise ConfigError(
                        f"{src}: per_layer.n_head value {h} does not divide choices.n_embd value {e}; "
                        f"every head count must divide every embedding dim"
                    )
        for r in dims["mlp_ratio"].values:
            for e in dims["n_embd"].values:
                if hidden_width(e, r) < 1:
                    raise ConfigError(f"{src}: per_layer.mlp_ratio value {r} times n_embd {e} gives no MLP width "
                                      f"(it rounds to 0); ratios must be at least 1/{e}")
                if abs(r * e - round(r * e)) > 1e-9:
                    raise ConfigError(
                        f"{src}: per_layer.mlp_ratio value {r} times n_embd {e} is not an integer hidden width"
                    )

    def build_net(self, space: SearchSpace, **overrides) -> EntangledGPT:
        return EntangledGPT(space, **overrides)

    def build_model(self, space: SearchSpace, arch: Arch, **overrides) -> GPT:
        return GPT(gpt_config(space, space.validate(arch), **overrides))

    def model_settings(self, model: GPT) -> dict:
        return {"vocab_size": model.config.vocab_size, "block_size": model.config.block_size}

    def param_count(self, space: SearchSpace, arch: Arch) -> int:
        f = space.fixed
        e, bias = arch["n_embd"], int(f["bias"])
        n = f["padded_vocab_size"] * e + f["block_size"] * e + e * (1 + bias)  # embeddings (tied head), ln_f
        for i in range(arch["n_layer"]):
            hid = hidden_width(e, arch["mlp_ratio"][i])
            n += 2 * e * (1 + bias)  # ln_1, ln_2
            n += 4 * e * e + bias * 4 * e  # c_attn, attn.c_proj
            n += 2 * e * hid + bias * (hid + e)  # mlp
        return n

    def flops(self, space: SearchSpace, arch: Arch) -> int:
        """One sequence of the full context (``block_size`` tokens)."""
        e, seq_len = arch["n_embd"], space.fixed["block_size"]
        matmul = space.fixed["padded_vocab_size"] * e  # lm_head
        for i in range(arch["n_layer"]):
            matmul += 4 * e * e + 2 * e * hidden_width(e, arch["mlp_ratio"][i])
        attention = 4 * arch["n_layer"] * seq_len * seq_len * e  # q k^T and att v
        return 2 * matmul * seq_len + attention

    def superposed_flops(self, space: SearchSpace, samples: int, backward: bool = False) -> int:
        """The largest architecture's matmuls, one attention at the largest width per head-count choice (softmax
        is not linear), and the products that build each weight mask from the mixing weights (once per pass; a
        mask that only scales the input or the output is a vector, left out). The backward pass doubles the
        matmuls (input and weight gradients) and repeats each mask product once (only the mixing weights need
        its gradient), after recomputing the head counts' attentions (kept out of the saved activations)."""
        f, dims = space.fixed, space.dims
        T, V, L = f["block_size"], f["padded_vocab_size"], space.max_layers
        widths, ratios, heads = dims["n_embd"].values, dims["mlp_ratio"].values, dims["n_head"].values
        D, tokens, k = max(widths), samples * T, len(widths)
        per_sample = self.flops(space, space.largest()) + (len(heads) - 1) * 4 * L * T * T * D
        hid = hidden_width(D, max(ratios))
        layer_masks = 2 * (k * len(ratios)) * 2 * hid * D  # the MLP's two layers: (width, ratio) pairs
        layer_masks += 2 * k * 3 * D * D * (tokens >= 3 * D)  # c_attn masks its input's columns below 3D tokens
        layer_masks += 2 * k * D * D * (tokens >= D)  # the attention's c_proj masks its output below D tokens
        masks = L * layer_masks + 2 * k * V * D * (tokens >= V)  # and lm_head
        # backward first recomputes what the superposition does not keep: every head count's attention
        recompute = len(heads) * 4 * L * T * T * D if backward else 0
        return (3 if backward else 1) * samples * per_sample + samples * recompute + (2 if backward else 1) * masks
