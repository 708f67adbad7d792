"""
Attention pieces the lab's models share and the tutorial does not need: RoPE on half-split pairs
(dims i and i + p/2, the convention of our earlier reconstruction, GPT-NeoX and Gemma), masks
with a sliding window or an additive bias (a sink), and a KV cache that keeps only a window.
model.py's PRISM rotates interleaved pairs, as its author's code does.
"""

import math

import torch

from model import KVCache


def apply_rotary(x, cos, sin):
    """Rotate x (B, H, T, p) on the half-split pairs (x_i, x_{i+p/2}); cos, sin (H, T, p/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def causal_mask(T, device, window=None):
    """(T, T) bool, True where query i may attend to key j: j ≤ i, and i − j < window if given."""
    i = torch.arange(T, device=device)
    distance = i[:, None] - i[None, :]
    return (distance >= 0) & (distance < (window or T))


def explicit_attention(q, k, v, record, window=None, attn_mask=None):
    """softmax(qkᵀ/√p + mask) v with the probabilities kept in `record`: causal (and windowed)
    by default, or the additive `attn_mask` (H, T, S) whose first S − T keys are extra (a sink).
    The record keeps the probabilities of the T real keys. Analysis only (no cache)."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    T = q.shape[-2]
    if attn_mask is None:
        attn = scores.masked_fill(~causal_mask(T, q.device, window), float("-inf")).softmax(dim=-1)
    else:
        attn = (scores + attn_mask).softmax(dim=-1)
    record.append({"attn": attn[..., -T:], "q": q, "k": k[..., -T:, :]})
    return attn @ v


class WindowedKVCache(KVCache):
    """A sliding-window layer's cache: it sees its last `window` positions, so it keeps window − 1
    of them (the new token is the window-th) and its memory stays bounded."""

    def __init__(self, window=None):
        super().__init__()
        self.window = window

    def extend(self, *new):
        full = super().extend(*new)
        n = full[0].shape[-2]
        keep = n if self.window is None else min(n, self.window - 1)
        self.tensors = tuple(t[:, :, n - keep:] for t in full)
        return full
