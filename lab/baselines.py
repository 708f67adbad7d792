"""
The baselines PRISM is compared against (docs/PRISM.md §7), the registry of every arch by name
(PRISM's included) with the checkpoint helpers, the size presets at which every arch has the same
parameter count (±5%), and the ablations of PRISM as config values. Imports run one way:
model.py <- this file <- train.py, sample.py, analyze_heads.py, compare.py, bench.py.

Both baselines share everything but their blocks with PRISM (model.LanguageModel): the loss,
generation, the optimizer, MFU, checkpoints and the analysis path.
  - gpt2:   learned absolute positions, LayerNorm, GELU MLP, separate q, k, v (nanoGPT's shape).
  - gemma3: RMSNorm before and after each sub-block, GeGLU MLP, QK-norm, RoPE with θ = 10⁴ on
            local (sliding-window) layers and 10⁶ on global ones, five local layers per global
            one, embeddings scaled by √d, tied output.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

import model
from model import (Block, KVCache, LanguageModel, _check, apply_rotary, build_model,
                   causal_mask, explicit_attention, get_arch, mlp_width, rotary_frequencies,
                   rotary_tables)

# -----------------------------------------------------------------------------
# GPT-2


@dataclass
class GPT2Config:
    vocab_size: int = 50257       # GPT-2 BPE; the embedding is padded to a multiple of 64 inside
    block_size: int = 512         # context length, also the number of learned positions
    n_layer: int = 8              # blocks (attention + MLP)
    n_embd: int = 512             # d
    n_head: int = 8               # heads of d / n_head dimensions each
    dropout: float = 0.0          # dropout rate on the embedding, attention and MLP outputs
    bias: bool = False            # biases in Linear and LayerNorm
    mlp_hidden: int = 0           # GELU MLP width (model.MLP); 0 = 4·n_embd

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_embd", "n_head"):
            _check(self, name, getattr(self, name) > 0, "must be positive")
        _check(self, "n_embd", self.n_embd % self.n_head == 0, "must be a multiple of n_head")
        _check(self, "dropout", 0 <= self.dropout < 1, "must be in [0, 1)")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.dropout = config.n_head, config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, record=None, cache=None):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2)
                   for t in self.c_attn(x).split(C, dim=2))
        if cache is not None:
            k, v = cache.extend(k, v)
        if record is None:
            y = F.scaled_dot_product_attention(  # one new query sees every cached key: no mask
                q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=T > 1)
        else:
            y = explicit_attention(q, k, v, record)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))


class GPT2(LanguageModel):
    arch = "gpt2"

    def __init__(self, config):
        super().__init__()
        self._build(config, [Block(config, CausalSelfAttention) for _ in range(config.n_layer)],
                    nn.LayerNorm(config.n_embd, bias=config.bias),
                    wpe=nn.Embedding(config.block_size, config.n_embd))

    def embed(self, idx, start=0):
        pos = torch.arange(start, start + idx.shape[1], device=idx.device)
        return self.transformer.wte(idx) + self.transformer.wpe(pos)


# -----------------------------------------------------------------------------
# Gemma 3 style


@dataclass
class Gemma3Config:
    vocab_size: int = 50257       # GPT-2 BPE; the embedding is padded to a multiple of 64 inside
    block_size: int = 512         # context length
    n_layer: int = 8              # blocks (attention + MLP)
    n_embd: int = 512             # d
    n_head: int = 8               # attention heads
    head_dim: int = 64            # dimensions per head (q, k and v alike)
    mlp_hidden: int = 1376        # GeGLU width; 3·d·h ≈ the 8d² of a 4d GELU MLP
    sliding_window: int = 128     # keys a local layer sees
    global_every: int = 6         # layer l is global when (l + 1) % global_every == 0: 5 local : 1
    rope_local_theta: float = 1e4   # RoPE base θ of the local layers
    rope_global_theta: float = 1e6  # RoPE base θ of the global layers
    dropout: float = 0.0          # dropout rate on the embedding, attention and MLP outputs
    bias: bool = False            # biases in Linear

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_embd", "n_head", "head_dim",
                     "mlp_hidden", "sliding_window", "global_every"):
            _check(self, name, getattr(self, name) > 0, "must be positive")
        _check(self, "head_dim", self.head_dim % 2 == 0, "must be even (RoPE rotates pairs)")
        _check(self, "dropout", 0 <= self.dropout < 1, "must be in [0, 1)")

    def is_global(self, layer):
        return (layer + 1) % self.global_every == 0

    def rope_frequencies(self, layer):
        theta = self.rope_global_theta if self.is_global(layer) else self.rope_local_theta
        return rotary_frequencies(self.head_dim, theta).expand(self.n_head, -1)


class GemmaAttention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.n_head, self.head_dim, self.dropout = config.n_head, config.head_dim, config.dropout
        self.window = None if config.is_global(layer) else config.sliding_window
        inner = config.n_head * config.head_dim
        self.qkv = nn.Linear(config.n_embd, 3 * inner, bias=config.bias)
        self.q_norm = nn.RMSNorm(config.head_dim, eps=1e-6)  # QK-norm: bounded logits
        self.k_norm = nn.RMSNorm(config.head_dim, eps=1e-6)
        self.o_proj = nn.Linear(inner, config.n_embd, bias=config.bias)
        cos, sin = rotary_tables(config.rope_frequencies(layer), config.block_size)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        mask = causal_mask(config.block_size, "cpu", self.window)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x, record=None, cache=None):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3 * self.n_head, self.head_dim).transpose(1, 2).split(
            self.n_head, dim=1)
        start = 0 if cache is None else cache.length  # absolute position of x[:, 0]
        cos, sin = self.rope_cos[:, start:start + T], self.rope_sin[:, start:start + T]
        q = apply_rotary(self.q_norm(q), cos, sin)
        k = apply_rotary(self.k_norm(k), cos, sin)
        if cache is not None:  # normed, rotated keys; a local layer's cache holds its window
            k, v = cache.extend(k, v)
        if record is not None:
            y = explicit_attention(q, k, v, record, self.window)
        elif self.window is None or T == 1:  # one new query sees every (cached) key it may
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=T > 1)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=self.mask[:T, :T],
                dropout_p=self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class GeGLU(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_up = nn.Linear(config.n_embd, 2 * config.mlp_hidden, bias=config.bias)
        self.down_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=config.bias)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class GemmaBlock(nn.Module):
    """Sandwich norm: x ← x + N(f(N(x))) for attention and the MLP alike."""

    def __init__(self, config, layer):
        super().__init__()
        self.pre_attn_norm = nn.RMSNorm(config.n_embd, eps=1e-6)
        self.attn = GemmaAttention(config, layer)
        self.post_attn_norm = nn.RMSNorm(config.n_embd, eps=1e-6)
        self.pre_mlp_norm = nn.RMSNorm(config.n_embd, eps=1e-6)
        self.mlp = GeGLU(config)
        self.post_mlp_norm = nn.RMSNorm(config.n_embd, eps=1e-6)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, record=None, cache=None):
        z = self.pre_attn_norm(x)
        if record is not None:
            before = len(record)
            x = x + self.dropout(self.post_attn_norm(self.attn(z, record)))
            record[before]["z"] = z
        else:
            x = x + self.dropout(self.post_attn_norm(self.attn(z, cache=cache)))
        return x + self.dropout(self.post_mlp_norm(self.mlp(self.pre_mlp_norm(x))))


class Gemma3(LanguageModel):
    arch = "gemma3"

    def __init__(self, config):
        super().__init__()
        self._build(config, [GemmaBlock(config, layer) for layer in range(config.n_layer)],
                    nn.RMSNorm(config.n_embd, eps=1e-6))

    def embed(self, idx, start=0):
        return self.transformer.wte(idx) * math.sqrt(self.config.n_embd)

    def new_cache(self):
        return [KVCache(block.attn.window) for block in self.transformer.h]

    def rope_frequencies(self, layer=0):
        return self.config.rope_frequencies(layer)

    def flops_per_token(self):
        # Local layers form scores over at most sliding_window keys, not block_size.
        c = self.config
        attended = sum(c.block_size if c.is_global(l) else min(c.sliding_window, c.block_size)
                       for l in range(c.n_layer))
        return 6 * self.get_num_params() + 12 * c.n_head * c.head_dim * attended


model.ARCHS.update(gpt2=(GPT2Config, GPT2), gemma3=(Gemma3Config, Gemma3))


# -----------------------------------------------------------------------------
# What the comparison runs: size presets and PRISM's ablations, all as config values.

# Sizes at which every arch has PRISM's parameter count within ±5% (check_preset says so). The
# shipped training configs name one (train.py's `preset`), so that every arch trains from them.
PRESETS = {
    # config/cpu_tiny.py: PRISM d = 64, 4 layers, 4 heads of p = 32; 3.4M parameters, nearly all
    # of them the GPT-2-vocabulary embedding.
    "cpu-tiny": {
        "block_size": 128,
        "prism": dict(n_layer=4, n_embd=64, n_head=4, head_dim=32),
        "gpt2": dict(n_layer=4, n_embd=64, n_head=2),
        "gemma3": dict(n_layer=4, n_embd=64, n_head=2, head_dim=32, mlp_hidden=172,
                       sliding_window=64, global_every=4),
    },
    # 4 layers hold no 5-local-to-1-global group: Gemma's last layer is its global one here.
    "cpu-small": {
        "block_size": 128,
        "prism": dict(n_layer=4, n_embd=128, n_head=8, head_dim=32),
        "gpt2": dict(n_layer=4, n_embd=128, n_head=4),
        "gemma3": dict(n_layer=4, n_embd=128, n_head=4, head_dim=32, mlp_hidden=344,
                       sliding_window=64, global_every=4),
    },
    # PRISM.md §5 and config/prism_50m.py: d = 512, 8 layers, 16 heads of p = 64, context 512;
    # the baselines at the same d.
    "paper-50m": {
        "block_size": 512,
        "prism": dict(n_layer=8, n_embd=512, n_head=16, head_dim=64),
        "gpt2": dict(n_layer=8, n_embd=512, n_head=8),
        "gemma3": dict(n_layer=8, n_embd=512, n_head=8, head_dim=64, mlp_hidden=1376,
                       sliding_window=128),
    },
}

# The scout's best three changes to PRISM's attention (PRISM.md §8), which prism-white combines.
WHITE = {"normalize_subspaces": True, "mask_self": True, "rotate_values": True}

# name -> (arch, overrides of the preset's sizes). PRISM's ablations change one constraint each;
# variant_args then gives each PRISM-arch variant the MLP width that brings it back to PRISM's
# parameter count, so "does this constraint help?" is asked at the same size.
VARIANTS = {
    "prism": ("prism", {}),
    "gpt2": ("gpt2", {}),
    "gemma3": ("gemma3", {}),
    "prism-pi-off": ("prism", {"rope_ratio": 1.0}),                # both groups in one band: is a second band needed?
    "prism-band-split": ("prism", {"rope_bands": "split"}),        # disjoint slow/fast bands instead of the ×π overlap
    "prism-complete": ("prism", {"overcompleteness": 1}),          # ρ = 1: H·p = d
    "prism-tied": ("prism", {"tie_dictionary": True}),             # back-project with U itself
    "prism-qk": ("prism", {"qkv_sharing": "qk"}),                  # q = k, a value of its own
    "prism-separate": ("prism", {"qkv_sharing": "none"}),          # q, k, v apart, π-RoPE kept
    # Plain RoPE attention as a standard transformer has it: q, k, v apart, one frequency band,
    # H·p = d.
    "rope-attention": ("prism", {"qkv_sharing": "none", "rope_ratio": 1.0, "overcompleteness": 1}),
    # White-box candidates (PRISM.md §8): the paper's PRISM plus one MCR²-motivated change each,
    # and the scout's best three together.
    "prism-head-step": ("prism", {"head_step": True}),
    "prism-head-temperature": ("prism", {"head_temperature": True}),
    "prism-normalized": ("prism", {"normalize_subspaces": True}),
    "prism-no-self": ("prism", {"mask_self": True}),
    "prism-rotated-values": ("prism", {"rotate_values": True}),
    "prism-rho-init": ("prism", {"rho_init": True}),
    "prism-ista": ("prism", {"mlp": "ista"}),
    "prism-ista-tied": ("prism", {"mlp": "ista-tied"}),
    "prism-white": ("prism", WHITE),
    # prism-white less one of its three changes each: which of them carries it.
    "prism-white-unnormalized": ("prism", {"mask_self": True, "rotate_values": True}),
    "prism-white-with-self": ("prism", {"normalize_subspaces": True, "rotate_values": True}),
    "prism-white-unrotated": ("prism", {"normalize_subspaces": True, "mask_self": True}),
    # prism-white with the screen's next lead, the decoupled sparse-coding MLP ...
    "prism-white-ista": ("prism", {**WHITE, "mlp": "ista"}),
    # ... and what the paper's two constraints cost on top of it: π-RoPE off, ρ = 1.
    "prism-white-ista-pi-off": ("prism", {**WHITE, "mlp": "ista", "rope_ratio": 1.0}),
    "prism-white-ista-complete": ("prism", {**WHITE, "mlp": "ista", "overcompleteness": 1}),
}


def preset_sizes(preset, arch):
    """The model fields (block_size included) of `arch` at a size preset."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    get_arch(arch)
    return dict(PRESETS[preset][arch], block_size=PRESETS[preset]["block_size"])


def _preset_args(preset, variant, vocab_size):
    """(arch, model_args) of a variant at a size preset, before its size is matched."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    arch, overrides = VARIANTS[variant]
    args = dict(preset_sizes(preset, arch), vocab_size=vocab_size)
    overrides = dict(overrides)
    if "overcompleteness" in overrides:  # ρ is a ratio of sizes, not a config field
        args["head_dim"] = overrides.pop("overcompleteness") * args["n_embd"] // args["n_head"]
    return arch, {**args, **overrides}


def variant_args(preset, variant, vocab_size):
    """(arch, model_args) of a variant at a size preset. A PRISM-arch variant's MLP width is the
    one whose parameter count is nearest PRISM's (parameters are linear in the width, so one
    unit's cost, measured, gives it); the MLP's default width stays unset."""
    arch, args = _preset_args(preset, variant, vocab_size)
    if arch != "prism" or variant == "prism" or "mlp_hidden" in VARIANTS[variant][1]:
        return arch, args
    target = count_params(*_preset_args(preset, "prism", vocab_size))
    width = mlp_width(get_arch(arch)[0](**args))
    per_unit = (count_params(arch, {**args, "mlp_hidden": width + 1})
                - count_params(arch, {**args, "mlp_hidden": width}))
    hidden = width + round((target - count_params(arch, args)) / per_unit)
    if hidden < 1:
        raise ValueError(f"preset {preset!r}: no MLP width brings {variant} down to PRISM's "
                         f"{target:,} parameters")
    if hidden != width:
        args["mlp_hidden"] = hidden
    return arch, args


def count_params(arch, model_args):
    """Parameter count of a model without allocating its weights."""
    return model_size(arch, model_args)[0]


def model_size(arch, model_args):
    """(parameters, training FLOPs per token) of a model, without allocating its weights."""
    with torch.device("meta"):
        model = build_model(arch, **model_args)
        return model.get_num_params(), model.flops_per_token()


def check_preset(preset, vocab_size, tolerance=0.05, variants=None):
    """{variant: params} at a preset (every variant of VARIANTS, or those given); ValueError if one
    is more than `tolerance` off PRISM."""
    variants = list(VARIANTS) if variants is None else variants
    prism = count_params(*variant_args(preset, "prism", vocab_size))
    params = {v: count_params(*variant_args(preset, v, vocab_size)) for v in variants}
    for v, n in params.items():
        if abs(n / prism - 1) > tolerance:
            raise ValueError(f"preset {preset!r}: {v} has {n:,} parameters, "
                             f"{100 * (n / prism - 1):+.1f}% off PRISM's "
                             f"{prism:,} (allowed ±{100 * tolerance:.0f}%)")
    return params
