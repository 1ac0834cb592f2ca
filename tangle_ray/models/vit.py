"""ViT (AutoFormer): the weight-entangled supernet of a ViT space and the standalone model it extracts to.

``ViT`` is an AutoFormer-style vision transformer: patch embedding (a linear map of each flattened patch, i.e.
a stride-``patch_size`` convolution), class token, absolute position embedding, pre-norm blocks with per-layer
head counts (heads of a fixed ``head_dim``) and MLP ratios (hidden width ``int(ratio * E)`` as AutoFormer),
optional 2-D relative positions, final norm, class token or mean of the patch tokens (``global_pool``), linear
classifier. ``EntangledViT`` holds the largest choice of every dimension under the same names and runs
superposition (``weights=W``), single path (``arch=A``) and extraction (``extract(A)`` -> ``ViT``);
``weights=W, output_mix=True`` is the weight-sharing baseline for benchmarks (every choice of every op on its
own slice, outputs padded and mixed).
``ViTFamily`` registers the family: the schema of its space files, parameter and FLOP counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tangle_ray.errors import ConfigError
from tangle_ray.models.registry import ModelFamily, Pretrained, Setting, register
from tangle_ray.ops import EntangledAttention, EntangledLayerNorm, EntangledLinear
from tangle_ray.ops.attention import RelativePosition2D, fixed_head_attention
from tangle_ray.ops.depth import path_depth, superpose_depth
from tangle_ray.ops.linear import prefix_indicators
from tangle_ray.space import Arch, SearchSpace


def hidden_width(embed_dim: int, mlp_ratio: float) -> int:
    """AutoFormer's MLP width: ``int(embed_dim * mlp_ratio)`` (truncated, never rounded)."""
    return int(embed_dim * mlp_ratio)


def patchify(img: Tensor, patch: int) -> Tensor:
    """[B, C, H, W] -> [B, (H/p)(W/p), C p p]: patches in row-major order, features in (channel, row, column)
    order, so a linear map of them is a stride-``p`` convolution with the weight flattened."""
    B, C, H, W = img.shape
    x = img.reshape(B, C, H // patch, patch, W // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // patch) * (W // patch), C * patch * patch)


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: zero a sample's residual branch with probability ``p`` and rescale the rest."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *(1,) * (x.ndim - 1)).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


def classify_loss(logits: Tensor, targets: Tensor | None) -> Tensor | None:
    """Mean cross-entropy in float32 at least; ``targets`` are class ids [B] or class probabilities [B, C] (mixup)."""
    if targets is None:
        return None
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, targets.to(logits.dtype) if targets.is_floating_point() else targets)


def _init_weights(model: nn.Module) -> None:
    """AutoFormer's initialisation: truncated N(0, 0.02) weights, tokens and tables; zero biases; unit norms."""
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            nn.init.zeros_(p)
        elif "norm" in name:
            nn.init.ones_(p)
        else:
            nn.init.trunc_normal_(p, std=0.02)


# ===================================================================== standalone model


@dataclass
class ViTConfig:
    img_size: int
    patch_size: int
    in_chans: int
    num_classes: int
    depth: int
    embed_dim: int
    num_heads: list[int]
    mlp_ratio: list[float]
    head_dim: int = 64
    qkv_bias: bool = True
    relative_position: bool = False
    max_relative_position: int = 14
    global_pool: bool = False
    drop_path: float = 0.0  # the last layer's rate; layer i has drop_path * i / (depth - 1)
    dropout: float = 0.0  # after the embedding, in the MLP and on both residual branches

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size


class PatchEmbed(nn.Module):
    """Image -> tokens: the projected patches behind the class token, plus the absolute position embedding."""

    def __init__(self, c: ViTConfig):
        super().__init__()
        self.patch_size = c.patch_size
        self.proj = nn.Linear(c.in_chans * c.patch_size**2, c.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + c.grid**2, c.embed_dim))

    def forward(self, img: Tensor) -> Tensor:
        tokens = self.proj(patchify(img, self.patch_size))
        return torch.cat([self.cls_token.expand(len(img), -1, -1), tokens], 1) + self.pos_embed


class Attention(nn.Module):
    """Heads of a fixed width; ``c_attn`` rows in (head, q/k/v, feature) order, as the supernet holds them."""

    def __init__(self, c: ViTConfig, n_head: int):
        super().__init__()
        inner = n_head * c.head_dim
        self.head_dim = c.head_dim
        self.c_attn = nn.Linear(c.embed_dim, 3 * inner, bias=c.qkv_bias)
        self.c_proj = nn.Linear(inner, c.embed_dim)
        rel = (c.head_dim, c.grid, c.max_relative_position)
        self.rel_k = RelativePosition2D(*rel) if c.relative_position else None
        self.rel_v = RelativePosition2D(*rel) if c.relative_position else None

    def forward(self, x: Tensor) -> Tensor:
        rel = None if self.rel_k is None else (self.rel_k, self.rel_v)
        return self.c_proj(fixed_head_attention(self.c_attn(x), self.head_dim, causal=False, rel=rel))


class Block(nn.Module):
    def __init__(self, c: ViTConfig, layer: int):
        super().__init__()
        hid = hidden_width(c.embed_dim, c.mlp_ratio[layer])
        self.norm1 = nn.LayerNorm(c.embed_dim)
        self.attn = Attention(c, c.num_heads[layer])
        self.norm2 = nn.LayerNorm(c.embed_dim)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(c.embed_dim, hid)
        self.mlp.fc2 = nn.Linear(hid, c.embed_dim)
        self.drop = nn.Dropout(c.dropout)
        self.drop_path = c.drop_path * layer / max(c.depth - 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = x + drop_path(self.drop(self.attn(self.norm1(x))), self.drop_path, self.training)
        h = self.drop(F.gelu(self.mlp.fc1(self.norm2(x))))
        return x + drop_path(self.drop(self.mlp.fc2(h)), self.drop_path, self.training)


class ViT(Pretrained):
    """An AutoFormer-style vision transformer of one architecture."""

    family = "vit"
    config_class = ViTConfig

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = c = config
        self.embed = PatchEmbed(c)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c, i) for i in range(c.depth))
        self.norm = nn.LayerNorm(c.embed_dim)
        self.head = nn.Linear(c.embed_dim, c.num_classes)
        _init_weights(self)

    def forward(self, img: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        x = self.drop(self.embed(img))
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        logits = self.head(x[:, 1:].mean(1) if self.config.global_pool else x[:, 0])
        return logits, classify_loss(logits, targets)


# ===================================================================== supernet


class EntangledPatchEmbed(nn.Module):
    """``PatchEmbed`` of the largest width; width ``e`` uses the first ``e`` features of the projection, class token
    and position embedding. Their superposition is the full embedding times m[j] = sum_e w_e 1[j < e]."""

    def __init__(self, in_features: int, widths: list[int], num_tokens: int):
        super().__init__()
        D = max(widths)
        self.proj = EntangledLinear(in_features, D, True, [(e, in_features) for e in widths])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, D))
        self.register_buffer("width_ind", prefix_indicators(widths, D), False)
        self.widths = [int(e) for e in widths]

    def forward(self, patches: Tensor, w: Tensor | None = None, *, width: int | None = None,
                output_mix: bool = False) -> Tensor:
        D = self.cls_token.size(-1)
        if output_mix:  # the weight-sharing baseline: every width's embedding on its own slice, padded and mixed
            w = w.to(self.cls_token.dtype)
            return sum(wc * F.pad(self.forward(patches, width=e), (0, D - e)) for wc, e in zip(w, self.widths))
        e = D if width is None else width
        tokens = self.proj(patches, out=e, inp=self.proj.in_features)
        x = torch.cat([self.cls_token[..., :e].expand(len(patches), -1, -1), tokens], 1) + self.pos_embed[..., :e]
        return x if w is None else x * (w.to(x.dtype) @ self.width_ind.to(x.dtype))


class EntangledBlock(nn.Module):
    def __init__(self, widths: list[int], heads: list[int], ratios: list[float], fixed: dict,
                 rel_pos: tuple[int, int] | None, drop_path_rate: float):
        super().__init__()
        D, R = max(widths), max(ratios)
        combos = [(e, hidden_width(e, r)) for e in widths for r in ratios]  # the order of outer(w_embd, w_ratio)
        self.norm1 = EntangledLayerNorm(D, widths, True)
        self.attn = EntangledAttention(widths, heads, fixed["qkv_bias"], 0.0, head_dim=fixed["head_dim"],
                                       causal=False, proj_bias=True, rel_pos=rel_pos)
        self.norm2 = EntangledLayerNorm(D, widths, True)
        self.mlp = nn.Module()
        self.mlp.fc1 = EntangledLinear(D, hidden_width(D, R), True, [(hid, e) for e, hid in combos])
        self.mlp.fc2 = EntangledLinear(hidden_width(D, R), D, True, combos)
        self.drop = nn.Dropout(fixed["dropout"])
        self.drop_path = drop_path_rate

    def forward(self, x: Tensor, w_embd: Tensor | None = None, w_head: Tensor | None = None,
                w_ratio: Tensor | None = None, *, width: int = 0, n_head: int = 0, ratio: float = 0.0,
                output_mix: bool = False) -> Tensor:
        if w_embd is None:  # single path at the real widths
            hid = hidden_width(width, ratio)
            x = x + self._branch(self.attn(self.norm1(x, width=width), width=width, n_head=n_head))
            h = self.drop(F.gelu(self.mlp.fc1(self.norm2(x, width=width), out=hid, inp=width)))
            return x + self._branch(self.mlp.fc2(h, out=width, inp=hid))
        w_mlp = torch.outer(w_embd, w_ratio).flatten()  # combi-superposition: every (width, ratio) pair
        if output_mix:  # the weight-sharing baseline: every choice of each op on its own slice, outputs mixed
            x = x + self._branch(self.attn(self.norm1(x, w_embd), w_embd, w_head, output_mix=True))
            h = self.drop(F.gelu(self.mlp.fc1(self.norm2(x, w_embd), w_mlp, output_mix=True)))
            return x + self._branch(self.mlp.fc2(h, w_mlp, output_mix=True))
        x = x + self._branch(self.attn(self.norm1(x, w_embd), w_embd, w_head))
        h = self.drop(F.gelu(self.mlp.fc1(self.norm2(x, w_embd), w_mlp)))
        return x + self._branch(self.mlp.fc2(h, w_mlp))

    def _branch(self, y: Tensor) -> Tensor:
        return drop_path(self.drop(y), self.drop_path, self.training)


class EntangledViT(nn.Module):
    """The largest ViT of a space, every architecture of the space a slice of it.

    Drop-path rates rise linearly over the maximum depth (AutoFormer's supernet); an extracted model spreads the
    same maximum rate over its own depth (timm).
    """

    def __init__(self, space: SearchSpace, **overrides):
        super().__init__()
        self.space = space
        self.fixed = f = {**space.fixed, **overrides}
        self.widths = list(space.dims["embed_dim"].values)
        self.depths = list(space.dims["depth"].values)
        heads, ratios = list(space.dims["num_heads"].values), list(space.dims["mlp_ratio"].values)
        D, L, grid = max(self.widths), space.max_layers, f["img_size"] // f["patch_size"]
        rel_pos = (grid, f["max_relative_position"]) if f["relative_position"] else None
        self.embed = EntangledPatchEmbed(f["in_chans"] * f["patch_size"] ** 2, self.widths, 1 + grid**2)
        self.drop = nn.Dropout(f["dropout"])
        self.blocks = nn.ModuleList(
            EntangledBlock(self.widths, heads, ratios, f, rel_pos, f["drop_path"] * i / max(L - 1, 1)) for i in range(L)
        )
        self.norm = EntangledLayerNorm(D, self.widths, True)
        self.head = EntangledLinear(D, f["num_classes"], True, [(f["num_classes"], e) for e in self.widths])
        _init_weights(self)

    def forward(self, img: Tensor, targets: Tensor | None = None, *, weights: dict[str, Tensor] | None = None,
                arch: Arch | None = None, output_mix: bool = False,
                keep_all_params: bool = False) -> tuple[Tensor, Tensor | None]:
        """Logits and loss, superposed over mixing ``weights`` or on the single path ``arch``.

        ``output_mix`` (with ``weights``; benchmarks only) is the weight-sharing baseline: the patch embedding,
        attention, MLP layers and classifier compute every choice on its own slice and mix the padded outputs
        (as ``EntangledGPT``'s); layer norms and depth are output mixes already and run as in superposition.
        ``keep_all_params`` (single path) adds a zero-valued term that runs the unused layers on one
        token, so every parameter gets a (zero) gradient: ZeRO needs the same parameters in each step.
        """
        if (weights is None) == (arch is None):
            raise ValueError("pass exactly one of weights= (superposition) or arch= (single path)")
        patches = patchify(img, self.fixed["patch_size"])
        if arch is not None:  # validated: lists may stop after the active layers
            return self._path(patches, targets, self.space.validate(arch), keep_all_params)
        if output_mix:
            return self._output_mixed(patches, targets, weights)
        return self._superposed(patches, targets, weights)

    def compile_superposition(self, **options) -> None:
        """``torch.compile`` the superposition forward (it fuses the masks and mixing into few kernels);
        single paths stay eager, since every architecture would be a graph of its own."""
        self._superposed = torch.compile(self._superposed, **options)

    def _pool(self, x: Tensor) -> Tensor:
        return x[:, 1:].mean(1) if self.fixed["global_pool"] else x[:, 0]

    def _superposed(self, patches: Tensor, targets: Tensor | None,
                    weights: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        w_embd = weights["embed_dim"]
        x = self.drop(self.embed(patches, w_embd))
        layers = [partial(block, w_embd=w_embd, w_head=weights["num_heads"][i], w_ratio=weights["mlp_ratio"][i])
                  for i, block in enumerate(self.blocks)]
        x = superpose_depth(x, layers, self.depths, weights["depth"])
        logits = self.head(self._pool(self.norm(x, w_embd)), w_embd)
        return logits, classify_loss(logits, targets)

    def _output_mixed(self, patches: Tensor, targets: Tensor | None,
                      weights: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """The weight-sharing (output-mixing) baseline of ``_superposed``: same mixing weights, every choice of
        the embedding, attention, MLP layers and classifier run on its own slice."""
        w_embd = weights["embed_dim"]
        x = self.drop(self.embed(patches, w_embd, output_mix=True))
        layers = [partial(block, w_embd=w_embd, w_head=weights["num_heads"][i], w_ratio=weights["mlp_ratio"][i],
                          output_mix=True) for i, block in enumerate(self.blocks)]
        x = superpose_depth(x, layers, self.depths, weights["depth"])
        logits = self.head(self._pool(self.norm(x, w_embd)), w_embd, output_mix=True)
        return logits, classify_loss(logits, targets)

    def _path(self, patches: Tensor, targets: Tensor | None, arch: Arch,
              keep_all_params: bool) -> tuple[Tensor, Tensor | None]:
        e = arch["embed_dim"]
        x = self.drop(self.embed(patches, width=e))
        layers = [partial(block, width=e, n_head=arch["num_heads"][i], ratio=arch["mlp_ratio"][i])
                  for i, block in enumerate(self.blocks)]
        x, zero = path_depth(x, layers, arch["depth"], keep_all_params and self.training)
        logits = self.head(self._pool(self.norm(x, width=e)), out=self.head.out_features, inp=e)
        loss = classify_loss(logits, targets)
        return logits, (loss + zero if loss is not None and keep_all_params else loss)

    def extract(self, arch: Arch) -> ViT:
        """A standalone ``ViT`` of exactly ``arch`` holding copies of the supernet's weights."""
        arch = self.space.validate(arch)
        e = arch["embed_dim"]
        model = ViT(self.arch_config(arch)).to(self.head.weight.device, self.head.weight.dtype)
        state: dict[str, Tensor] = {}

        def linear(name: str, lin: EntangledLinear, out: int, inp: int) -> None:
            state[f"{name}.weight"], state[f"{name}.bias"] = lin.sliced(out, inp)

        def norm(name: str, ln: EntangledLayerNorm) -> None:
            state[f"{name}.weight"], state[f"{name}.bias"] = ln.weight[:e], ln.bias[:e]

        linear("embed.proj", self.embed.proj, e, self.embed.proj.in_features)
        state["embed.cls_token"] = self.embed.cls_token[..., :e]
        state["embed.pos_embed"] = self.embed.pos_embed[..., :e]
        for i in range(arch["depth"]):
            block, hid, prefix = self.blocks[i], hidden_width(e, arch["mlp_ratio"][i]), f"blocks.{i}."
            norm(prefix + "norm1", block.norm1)
            norm(prefix + "norm2", block.norm2)
            for name, tensor in block.attn.sliced_state(e, arch["num_heads"][i]).items():
                state[prefix + "attn." + name] = tensor
            linear(prefix + "mlp.fc1", block.mlp.fc1, hid, e)
            linear(prefix + "mlp.fc2", block.mlp.fc2, e, hid)
        norm("norm", self.norm)
        linear("head", self.head, self.head.out_features, e)
        with torch.no_grad():
            model.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)
        return model

    def arch_config(self, arch: Arch) -> ViTConfig:
        return vit_config(self.space, arch, **{k: self.fixed[k] for k in ("dropout", "drop_path")})


def vit_config(space: SearchSpace, arch: Arch, **overrides) -> ViTConfig:
    """The standalone model of one architecture of ``space`` (``overrides`` replace fixed settings)."""
    f = {**space.fixed, **overrides}
    depth = arch["depth"]
    return ViTConfig(
        depth=depth, embed_dim=arch["embed_dim"], num_heads=list(arch["num_heads"][:depth]),
        mlp_ratio=list(arch["mlp_ratio"][:depth]), **{k: f[k] for k in ViTFamily.fixed},
    )


# ===================================================================== the family


@register
class ViTFamily(ModelFamily):
    """AutoFormer's space: embedding dim and depth for the whole net, MLP ratio and head count per layer."""

    name = "vit"
    model_class = ViT
    task = "classify"
    depth_dim = "depth"
    dims = {"depth": False, "embed_dim": False, "mlp_ratio": True, "num_heads": True}
    integer_dims = ("depth", "embed_dim", "num_heads")
    fixed = {
        "img_size": Setting(int), "patch_size": Setting(int), "in_chans": Setting(int, 3),
        "num_classes": Setting(int), "head_dim": Setting(int, 64), "qkv_bias": Setting(bool, True),
        "relative_position": Setting(bool, False), "max_relative_position": Setting(int, 14),
        "global_pool": Setting(bool, False), "drop_path": Setting(float, 0.0), "dropout": Setting(float, 0.0),
    }

    def check(self, space: SearchSpace) -> None:
        src, f = space.source, space.fixed
        for key in ("img_size", "patch_size", "in_chans", "num_classes", "head_dim", "max_relative_position"):
            if f[key] < 1:
                raise ConfigError(f"{src}: fixed.{key} = {f[key]} must be a positive integer")
        if f["img_size"] % f["patch_size"]:
            divisors = [p for p in range(1, f["img_size"] + 1) if f["img_size"] % p == 0]
            raise ConfigError(
                f"{src}: fixed.img_size = {f['img_size']} is not divisible by fixed.patch_size = "
                f"{f['patch_size']}; allowed patch sizes: {divisors}"
            )
        for key in ("dropout", "drop_path"):
            if not 0.0 <= f[key] < 1.0:
                raise ConfigError(f"{src}: fixed.{key} = {f[key]} must be in [0, 1)")
        small = [(r, e) for r in space.dims["mlp_ratio"].values for e in space.dims["embed_dim"].values
                 if hidden_width(e, r) < 1]
        if small:
            r, e = small[0]
            raise ConfigError(f"{src}: per_layer.mlp_ratio value {r} times embed_dim {e} gives no MLP width; "
                              f"ratios must be at least 1/{e}")

    def build_net(self, space: SearchSpace, **overrides) -> EntangledViT:
        return EntangledViT(space, **overrides)

    def build_model(self, space: SearchSpace, arch: Arch, **overrides) -> ViT:
        return ViT(vit_config(space, space.validate(arch), **overrides))

    def model_settings(self, model: ViT) -> dict:
        return {k: getattr(model.config, k) for k in ("img_size", "in_chans", "num_classes")}

    def param_count(self, space: SearchSpace, arch: Arch) -> int:
        """Every parameter of the extracted model, as AutoFormer counts them: patch projection, class token,
        position embedding, per layer two norms, qkv (with its bias if ``qkv_bias``), projection, fc1, fc2 and,
        with relative positions, the four tables (keys and values, vertical and horizontal: 2 max + 2 rows of
        ``head_dim``), the final norm and the classifier."""
        f = space.fixed
        e, d, tokens = arch["embed_dim"], f["head_dim"], 1 + (f["img_size"] // f["patch_size"]) ** 2
        n = (f["in_chans"] * f["patch_size"] ** 2 + 1) * e + (1 + tokens) * e  # patches, class token, positions
        n += 2 * e + (e + 1) * f["num_classes"]  # final norm, classifier
        for i in range(arch["depth"]):
            q, hid = arch["num_heads"][i] * d, hidden_width(e, arch["mlp_ratio"][i])
            n += 4 * e  # norm1, norm2
            n += 3 * q * (e + int(f["qkv_bias"])) + (q + 1) * e  # qkv, projection
            n += (e + 1) * hid + (hid + 1) * e  # fc1, fc2
            n += 4 * (2 * f["max_relative_position"] + 2) * d if f["relative_position"] else 0
        return n

    def flops(self, space: SearchSpace, arch: Arch) -> int:
        """One image: 2 per multiply-add of the patch projection, every block's linear layers and attention
        products (q k^T and a v; with relative positions also the queries against both tables of R_k and the
        per-offset sums of the attention weights against both tables of R_v, 2 max_distance + 2 rows each) and
        the classifier; norms, softmax, gathers and elementwise operations are not counted."""
        f = space.fixed
        e, d, patches = arch["embed_dim"], f["head_dim"], (f["img_size"] // f["patch_size"]) ** 2
        T, rows = 1 + patches, 2 * f["max_relative_position"] + 2
        macs = patches * f["in_chans"] * f["patch_size"] ** 2 * e + e * f["num_classes"]
        for i in range(arch["depth"]):
            q, hid = arch["num_heads"][i] * d, hidden_width(e, arch["mlp_ratio"][i])
            macs += T * (3 * q * e + q * e + 2 * e * hid)
            macs += 2 * T * T * q + (4 * T * rows * q if f["relative_position"] else 0)
        return 2 * macs

    def no_weight_decay(self, name: str, param: nn.Parameter, module: nn.Module) -> bool:
        """Biases, norms, the class token, position embedding and relative-position tables (as AutoFormer)."""
        return (super().no_weight_decay(name, param, module) or isinstance(module, RelativePosition2D)
                or name.endswith(("cls_token", "pos_embed")))
