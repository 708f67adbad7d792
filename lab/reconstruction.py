"""
Our reconstruction of PRISM from the paper's abstract alone (arch and variant `recon`): model.py's
PRISM until the author's code was read (issue 25). The lab keeps it because its white-box family
(white.py, sandwich.py) is built on it and its study's records (lab/results/cpu-small/recon*) are
about it. It differs from the author's PRISM in nearly every structural choice:

  author's PRISM (model.py)                       | this reconstruction
  2H heads of p = R·d/H from one 2R·d-atom dict.  | H heads of p, ρ = H·p/d (default 2)
  read-out tied: S − λN through the dictionary    | every head summed through a learned B
  two RoPE bases 10⁴·π and 10⁴/π, interleaved     | one base 10⁴, noise frequencies ×π, half-split
  learned absolute positions as well as RoPE      | RoPE only
  dictionary starts as a tight frame              | N(0, 0.02)

Layer: Z ← Z + Σ_k softmax_causal(W̃_k W̃_kᵀ/√p) W_k B_k with W_k = Z U_k, W̃_k = W_k rotated.
The derivation of model.py §2 applies with B_k learned in place of ηU_kᵀ. π-RoPE here shifts the
noise heads' ladder θ^(−2i/p) up by ×rope_ratio, which puts the fastest noise pair at ω = π, the
Nyquist frequency, where it sees only the parity of a distance.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from lab.attention import apply_rotary, explicit_attention
from model import MLP, Block, LanguageModel, _check, rotary_frequencies, rotary_tables


@dataclass
class ReconstructionConfig:
    vocab_size: int = 50257      # GPT-2 BPE; the embedding is padded to a multiple of 64 inside
    block_size: int = 512        # context length
    n_layer: int = 8             # blocks (attention + MLP)
    n_embd: int = 512            # d
    n_head: int = 16             # H: one head = one subspace U_k of the dictionary
    head_dim: int = 64           # p: overcompleteness ρ = H·p / d = 2 by default
    signal_heads: int = -1       # H_s: heads at the base RoPE frequencies; -1 means n_head // 2
    rope_theta: float = 10000.0  # θ: base of the signal frequencies θ^(−2i/p)
    rope_ratio: float = math.pi  # noise frequencies = rope_ratio × signal; 1.0 = π-RoPE off
    dropout: float = 0.0         # dropout on the embedding, attention and MLP outputs
    bias: bool = False           # biases in Linear and LayerNorm
    mlp_hidden: int = 0          # MLP width; 0 = 4·n_embd

    def __post_init__(self):
        if self.signal_heads == -1:
            self.signal_heads = self.n_head // 2
        for name in ("vocab_size", "block_size", "n_layer", "n_embd", "n_head", "head_dim"):
            _check(self, name, getattr(self, name) > 0, "must be positive")
        _check(self, "head_dim", self.head_dim % 2 == 0, "must be even (RoPE rotates pairs)")
        _check(self, "signal_heads", 0 <= self.signal_heads <= self.n_head, "must be in [0, n_head]")
        _check(self, "rope_theta", self.rope_theta > 1, "must be > 1")
        _check(self, "rope_ratio", self.rope_ratio > 0, "must be positive")
        _check(self, "dropout", 0 <= self.dropout < 1, "must be in [0, 1)")
        _check(self, "mlp_hidden", self.mlp_hidden >= 0, "must be >= 0 (0 = 4·n_embd)")


def rope_frequencies(config):
    """(n_head, head_dim // 2) float64 angular frequencies; the signal heads come first."""
    ratio = torch.ones(config.n_head, 1, dtype=torch.float64)
    ratio[config.signal_heads:] = config.rope_ratio
    return ratio * rotary_frequencies(config.head_dim, config.rope_theta)


class ReconstructionAttention(nn.Module):
    """Σ_k softmax_causal(q_k k_kᵀ/√p) W_k B_k, q_k = k_k = W_k rotated, the value W_k itself."""

    def __init__(self, config):
        super().__init__()
        self.n_head, self.head_dim, self.dropout = config.n_head, config.head_dim, config.dropout
        inner = config.n_head * config.head_dim
        self.dictionary = nn.Linear(config.n_embd, inner, bias=config.bias)  # the rows are Uᵀ
        self.back_projection = nn.Linear(inner, config.n_embd, bias=config.bias)  # B
        self.resid_dropout = nn.Dropout(config.dropout)
        cos, sin = rotary_tables(rope_frequencies(config), config.block_size)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def subspaces(self):
        """(H, p, d): each head's U_kᵀ."""
        return self.dictionary.weight.view(self.n_head, self.head_dim, -1)

    def forward(self, x, record=None, cache=None):
        B, T, _ = x.shape
        w = self.dictionary(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # W_k
        start = 0 if cache is None else cache.length  # the absolute position of x[:, 0]
        q = k = apply_rotary(w, self.rope_cos[:, start:start + T], self.rope_sin[:, start:start + T])
        v = w
        if cache is not None:  # the rotated key and W: two tensors, though q = k = v
            k, v = cache.extend(k, v)
        if record is not None:
            y = explicit_attention(q, k, v, record)
        else:  # one new query against the cache sees every cached key: no mask
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1,
                                               dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.back_projection(y.transpose(1, 2).reshape(B, T, -1)))


class Reconstruction(LanguageModel):
    """Token embedding (no absolute positions), n_layer blocks of ReconstructionAttention and MLP,
    the final LayerNorm, the tied output. white.py subclasses it and swaps the two classes."""

    arch = "recon"
    rope_pairs = "halves"
    residual_outputs = ("back_projection.weight", "proj.weight")  # GPT-2's residual scaling
    attention_class = ReconstructionAttention
    mlp_class = MLP

    def __init__(self, config):
        super().__init__()
        blocks = [Block(config, type(self).attention_class, type(self).mlp_class)
                  for _ in range(config.n_layer)]
        self._build(config, blocks, nn.LayerNorm(config.n_embd, bias=config.bias))

    @property
    def overcompleteness(self):
        """ρ = H·p / d."""
        return self.config.n_head * self.config.head_dim / self.config.n_embd

    def embed(self, idx, start=0):
        return self.transformer.wte(idx)

    def rope_frequencies(self, layer=0):
        return rope_frequencies(self.config)

    def head_groups(self):
        c = self.config
        return ["signal"] * c.signal_heads + ["noise"] * (c.n_head - c.signal_heads)

    def subspaces(self, layer):
        return self.transformer.h[layer].attn.subspaces()
