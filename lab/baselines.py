"""
The baselines PRISM is compared against (docs/PRISM.md §6). Each shares everything but its blocks
with PRISM (model.LanguageModel): the loss, generation, the optimizer, MFU, checkpoints and the
analysis path.
  - gpt2:   learned absolute positions, LayerNorm, GELU MLP, separate q, k, v (nanoGPT's shape).
  - gemma3: RMSNorm before and after each sub-block, GeGLU MLP, QK-norm, RoPE with θ = 10⁴ on
            local (sliding-window) layers and 10⁶ on global ones, five local layers per global
            one, embeddings scaled by √d, tied output.
  - rope-attention: PRISM's block and embedding with the plain attention of a standard
            transformer in its place: q, k, v apart, standard RoPE on q and k (one band), H·p = d.
            What PRISM's two constraints (the overcomplete shared dictionary, π-RoPE) are
            measured against with everything else equal.
`python -m lab.train` trains one at the size lab/variants.py matches to a PRISM config file.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

import model
from lab.attention import WindowedKVCache, apply_rotary, causal_mask, explicit_attention
from model import Block, LanguageModel, _check, rotary_frequencies, rotary_tables


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
    rope_pairs = "halves"  # for analyze_heads.py

    def __init__(self, config):
        super().__init__()
        self._build(config, [GemmaBlock(config, layer) for layer in range(config.n_layer)],
                    nn.RMSNorm(config.n_embd, eps=1e-6))

    def embed(self, idx, start=0):
        return self.transformer.wte(idx) * math.sqrt(self.config.n_embd)

    def new_cache(self):
        return [WindowedKVCache(block.attn.window) for block in self.transformer.h]

    def rope_frequencies(self, layer=0):
        return self.config.rope_frequencies(layer)

    def flops_per_token(self):
        # Local layers form scores over at most sliding_window keys, not block_size.
        c = self.config
        attended = sum(c.block_size if c.is_global(l) else min(c.sliding_window, c.block_size)
                       for l in range(c.n_layer))
        return 6 * self.get_num_params() + 12 * c.n_head * c.head_dim * attended


# -----------------------------------------------------------------------------
# Plain RoPE attention


@dataclass
class RopeAttentionConfig:
    vocab_size: int = 50257       # GPT-2 BPE; the embedding is padded to a multiple of 64 inside
    block_size: int = 512         # context length
    n_layer: int = 8              # blocks (attention + MLP)
    n_embd: int = 512             # d
    n_head: int = 16              # attention heads
    head_dim: int = 32            # dimensions per head (q, k and v alike); H·p = d by default
    rope_theta: float = 10000.0   # RoPE base θ of every head
    dropout: float = 0.0          # dropout rate on the embedding, attention and MLP outputs
    bias: bool = False            # biases in Linear and LayerNorm
    mlp_hidden: int = 0           # GELU MLP width (model.MLP); 0 = 4·n_embd

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_embd", "n_head", "head_dim"):
            _check(self, name, getattr(self, name) > 0, "must be positive")
        _check(self, "head_dim", self.head_dim % 2 == 0, "must be even (RoPE rotates pairs)")
        _check(self, "rope_theta", self.rope_theta > 1, "must be > 1")
        _check(self, "dropout", 0 <= self.dropout < 1, "must be in [0, 1)")

    def rope_frequencies(self):
        return rotary_frequencies(self.head_dim, self.rope_theta).expand(self.n_head, -1)


class RopeSelfAttention(nn.Module):
    """softmax_causal(q kᵀ/√p) v with q, k, v = Z W_q, Z W_k, Z W_v apart and RoPE on q and k. The
    weights are named and ordered as PRISM's (one `dictionary` holding [W_q; W_k; W_v], then
    the `back_projection`), so a seed draws the weights it drew as PRISM with q, k, v apart."""

    def __init__(self, config):
        super().__init__()
        self.n_head, self.head_dim, self.dropout = config.n_head, config.head_dim, config.dropout
        inner = config.n_head * config.head_dim
        self.dictionary = nn.Linear(config.n_embd, 3 * inner, bias=config.bias)
        self.back_projection = nn.Linear(inner, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        cos, sin = rotary_tables(config.rope_frequencies(), config.block_size)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x, record=None, cache=None):
        B, T, _ = x.shape
        qkv = self.dictionary(x).view(B, T, 3 * self.n_head, self.head_dim).transpose(1, 2)
        q, k, v = qkv.split(self.n_head, dim=1)
        start = 0 if cache is None else cache.length  # absolute position of x[:, 0]
        cos, sin = self.rope_cos[:, start:start + T], self.rope_sin[:, start:start + T]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.extend(k, v)
        if record is not None:
            y = explicit_attention(q, k, v, record)
        else:  # one new query sees every cached key: no mask
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=T > 1)
        return self.resid_dropout(self.back_projection(y.transpose(1, 2).reshape(B, T, -1)))


class RopeAttention(LanguageModel):
    arch = "rope-attention"
    rope_pairs = "halves"  # for analyze_heads.py
    residual_outputs = ("back_projection.weight", "proj.weight")  # GPT-2's residual scaling

    def __init__(self, config):
        super().__init__()
        self._build(config, [Block(config, RopeSelfAttention) for _ in range(config.n_layer)],
                    nn.LayerNorm(config.n_embd, bias=config.bias))

    def embed(self, idx, start=0):
        return self.transformer.wte(idx)  # no absolute positions: RoPE carries them

    def rope_frequencies(self, layer=0):
        return self.config.rope_frequencies()


model.ARCHS.update(gpt2=(GPT2Config, GPT2), gemma3=(Gemma3Config, Gemma3),
                   **{"rope-attention": (RopeAttentionConfig, RopeAttention)})
