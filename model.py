"""
PRISM: the transformer as a signal-denoising operator derived from MCR² (arXiv 2601.15540).

This file reads top to bottom like the derivation (docs/PRISM.md holds the design):
  1. the coding rate R and the rate reduction ΔR, the objective everything is derived from;
  2. attention from a gradient step on the compressed rate R^c: what is exact (the gradient), what
     is heuristic (the series truncation, the softmax, the dropped term), and why the result is
     not itself a descent step — each statement executable and tested;
  3. constraint 1, the overcomplete dictionary: q = k = v = Z U_k with H·p > d;
  4. constraint 2, π-RoPE: the noise heads' frequency band is the signal band shifted up ×π;
  5. the conventional rest: pre-norm block, GELU MLP, tied embeddings;
  6. what every language model here shares (the baselines in baselines.py too): loss, generation,
     the optimizer and MFU.
The registry of archs by name and the checkpoint helpers live in baselines.py, which builds on
this file: imports run one way, model.py <- baselines.py <- the scripts.
Notation throughout, as in the code: tokens are rows. Z ∈ R^{n×d} holds n tokens, U_k ∈ R^{d×p} is
subspace k of the dictionary (the model stores U_kᵀ as rows of a Linear weight), W_k = Z U_k.
"""

import importlib
import inspect
import math
import pickle
import re
import warnings
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F

# -----------------------------------------------------------------------------
# 1. Coding rate and rate reduction (exact definitions, MCR², Yu et al. 2020).
# The number of nats needed to code n tokens Z ∈ R^{n×d} up to precision ε is
#     R(Z) = ½ log det(I_d + d/(n ε²) ZᵀZ).
# Given subspaces U_k ∈ R^{d×p}, the compressed rate codes each projection W_k = Z U_k separately,
#     R^c(Z; U) = Σ_k ½ log det(I_p + β W_kᵀW_k),    β = p/(n ε²),
# and MCR² seeks a large rate reduction ΔR = R(Z) − R^c(Z; U): diverse overall, compact per subspace.
# R^c grows with the scale of U (U → cU changes every term), so analyze_heads.py also evaluates it
# with each U_k replaced by an orthonormal basis of its span. The model never evaluates these rates.


def coding_rate(Z, eps=0.5):
    """R(Z) for Z of shape (n, d), in nats, computed in float64 through the smaller Gram matrix
    (det(I_d + a ZᵀZ) = det(I_n + a ZZᵀ))."""
    Z = Z.double()
    n, d = Z.shape
    gram = Z.T @ Z if d <= n else Z @ Z.T
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return 0.5 * torch.logdet(eye + (d / (n * eps**2)) * gram)


def compressed_coding_rate(Z, subspaces, eps=0.5):
    """R^c(Z; U) for Z (n, d) and subspaces (K, p, d) holding each U_kᵀ: Σ_k R(Z U_k)."""
    return sum(coding_rate(Z.double() @ U_k.double().T, eps) for U_k in subspaces)


# -----------------------------------------------------------------------------
# 2. From a gradient step on R^c to attention (CRATE, Yu et al. 2023), step by step.
# (a) Exact. With the token Gram matrix G_k = W_k W_kᵀ ∈ R^{n×n} (how similar every two tokens are
#     inside subspace k),
#         ∇_Z R^c = Σ_k β (I_n + β G_k)⁻¹ W_k U_kᵀ                 (compressed_rate_gradient)
# (b) Heuristic: the Neumann series (I + βG)⁻¹ = I − βG + β²G² − …, cut after the second term:
#         −∇_Z R^c ≈ Σ_k (−β W_k + β² G_k W_k) U_kᵀ                  (neumann_descent_direction)
#     accurate to O(β³) only while β·λ_max(G_k) < 1. Where the model runs, this number is far
#     above 1 (about 110 at PRISM-50M's initialisation on isotropic tokens, thousands in a trained
#     cpu-small PRISM: analyze_heads.py reports it per layer as `neumann_radius`), and there even
#     the two-term series points uphill (negative cosine with −∇R^c).
# (c) A construction choice (CRATE's): keep only the second-order term, with a causal softmax in
#     place of the similarity G_k: row t of softmax(G_k/√p) weighs the tokens s ≤ t.
# (d) The first-order term −β W_k U_kᵀ is dropped (for a complete orthonormal dictionary it is
#     the uniform shrink −βZ; here it is not), and β² goes into a learned step.
# What is left is multi-head self-attention with query = key = value = W_k, one head per subspace:
#         Z ← Z + η Σ_k softmax_causal(W_k W_kᵀ/√p) W_k U_kᵀ.
# This is not a descent step on R^c. The kept term on its own raises it: exactly, for one
# subspace ⟨G_k W_k U_kᵀ, ∇R^c⟩ = β tr(W_kᵀ G_k (I + βG_k)⁻¹ W_k · U_kᵀU_k) ≥ 0 (the trace of a
# product of two positive semi-definite matrices), and with the softmax the tests measure a negative cosine
# between +U·SA and −∇R^c and a rise of R^c along it. In the truncated series all the descent
# lives in the dropped shrink term. So the layer is CRATE's attention form, motivated by the
# series, not implied by it; with a learned η and back-projection, training decides what it does.
# The expansion term +∇R(Z) of ΔR = R − R^c is not part of the layer either.


def compressed_rate_gradient(Z, subspaces, eps=0.5):
    """(a) ∇_Z R^c(Z; U) in closed form (exact; tests check it against autograd). Z (n, d),
    subspaces (K, p, d) holding each U_kᵀ; float64."""
    Z = Z.double()
    n = Z.shape[0]
    beta = subspaces.shape[1] / (n * eps**2)
    eye = torch.eye(n, dtype=Z.dtype, device=Z.device)
    grad = torch.zeros_like(Z)
    for U_kT in subspaces.double():
        W = Z @ U_kT.T
        grad += beta * torch.linalg.solve(eye + beta * (W @ W.T), W) @ U_kT
    return grad


def neumann_descent_direction(Z, subspaces, eps=0.5):
    """(b) −∇_Z R^c to second order in β: Σ_k (−β W_k + β² W_k W_kᵀ W_k) U_kᵀ. Its relative error
    shrinks as O(β²) when β·λ_max(G_k) → 0 (tests check the order)."""
    Z = Z.double()
    beta = subspaces.shape[1] / (Z.shape[0] * eps**2)
    out = torch.zeros_like(Z)
    for U_kT in subspaces.double():
        W = Z @ U_kT.T
        out += (-beta * W + beta**2 * (W @ W.T) @ W) @ U_kT
    return out


def neumann_radius(Z, subspaces, eps=0.5):
    """max_k β·λ_max(W_kᵀW_k): the series of (b) converges only where this is < 1."""
    Z = Z.double()
    beta = subspaces.shape[1] / (Z.shape[0] * eps**2)
    return max(float(beta * torch.linalg.eigvalsh((Z @ U.T).T @ (Z @ U.T))[-1])
               for U in subspaces.double())


# -----------------------------------------------------------------------------
# 3-4. The PRISM attention.


@dataclass
class PrismConfig:
    vocab_size: int = 50257      # GPT-2 BPE; the embedding is padded to a multiple of 64 inside
    block_size: int = 512        # context length
    n_layer: int = 8             # blocks (attention + MLP)
    n_embd: int = 512            # d
    n_head: int = 16             # H: one head = one subspace U_k of the dictionary
    head_dim: int = 64           # p: overcompleteness ρ = H·p / d = 2 by default
    signal_heads: int = -1       # H_s: heads at the base RoPE frequencies; -1 means n_head // 2
    rope_theta: float = 10000.0  # θ: base of the signal frequencies θ^(−2i/p)
    rope_ratio: float = math.pi  # "shift" bands: noise = rope_ratio × signal; 1.0 = π-RoPE off
    rope_bands: str = "shift"    # "shift" (π-RoPE) or "split": disjoint slow/fast halves of one ladder
    tie_dictionary: bool = False  # back-project with the same U (white-box) or a decoupled matrix
    qkv_sharing: str = "qkv"     # "qkv": q = k = v = Z U_k (PRISM); "qk": own value; "none": q, k, v apart
    dropout: float = 0.0         # dropout rate on the embedding, attention and MLP outputs
    bias: bool = False           # biases in Linear and LayerNorm
    mlp_hidden: int = 0          # MLP width; 0 = 4·n_embd (8·n_embd for "ista-tied"); the ablations match PRISM's size with it
    # Candidates for a white-box PRISM that trains better (PRISM.md §8; PrismAttention, §5):
    head_step: bool = False          # a learned step η_k per head instead of one for all
    head_temperature: bool = False   # a learned softmax temperature per head
    normalize_subspaces: bool = False  # scores from RMS-normalised W_k (tokens on a sphere)
    mask_self: bool = False          # no score with itself; a learned sink takes the spare mass
    rotate_values: bool = False      # values rotated too: the step of §2 on the rotated tokens
    rho_init: bool = False           # dictionary init std 0.02/√ρ: the variance of ρ = 1
    mlp: str = "gelu"                # "gelu"; "ista": one sparse-coding step; "ista-tied": D₁ = D

    def __post_init__(self):
        if self.signal_heads == -1:
            self.signal_heads = self.n_head // 2
        for name in ("vocab_size", "block_size", "n_layer", "n_embd", "n_head", "head_dim"):
            _check(self, name, getattr(self, name) > 0, "must be positive")
        _check(self, "head_dim", self.head_dim % 2 == 0, "must be even (RoPE rotates pairs)")
        _check(self, "signal_heads", 0 <= self.signal_heads <= self.n_head, "must be in [0, n_head]")
        _check(self, "rope_theta", self.rope_theta > 1, "must be > 1")
        _check(self, "rope_ratio", self.rope_ratio > 0, "must be positive")
        _check(self, "rope_bands", self.rope_bands in ("shift", "split"), "must be 'shift' or 'split'")
        _check(self, "dropout", 0 <= self.dropout < 1, "must be in [0, 1)")
        _check(self, "qkv_sharing", self.qkv_sharing in ("qkv", "qk", "none"),
               "must be 'qkv', 'qk' or 'none'")
        _check(self, "mlp", self.mlp in ("gelu", "ista", "ista-tied"),
               "must be 'gelu', 'ista' or 'ista-tied'")


def _check(config, name, ok, why):
    if not ok:
        raise ValueError(f"{type(config).__name__}.{name} = {getattr(config, name)!r} {why}")


# π-RoPE. Every head rotates the 2-D pairs (x_i, x_{i+p/2}) of its q and k by angle t·ω_i at
# position t, so q_sᵀk_t depends on positions only through s − t. Signal heads use the standard
# ladder ω_i = θ^(−2i/p), i = 0 … p/2 − 1; noise heads use π·ω_i. What this does, and does not do
# (band_facts computes the numbers; for p = 32, θ = 10⁴):
#   - it shifts the noise band up by ×π. The bands overlap: 14 of the 16 noise pairs lie inside
#     the signal band, 2 above it, and the fastest noise pair sits exactly at ω = π, the Nyquist
#     rate, where e^{iπΔ} = (−1)^Δ encodes only the parity of the distance Δ;
#   - slow pairs see no full turn within the context: at T = 128, 10 of 16 signal and 8 of 16
#     noise pairs have wavelengths 2π/ω longer than T;
#   - "irrational, so the phases never re-align" holds for a ratio r = 3 just as for r = π: θ^(−2i/p)
#     is algebraic, so Δ(r·ω_j − ω_i) ∈ 2πZ has no integer solution Δ ≥ 1 for either, and near
#     re-alignments within 512 tokens come within ~1e-5 rad for both;
#   - it cannot make subspaces incoherent: a rotation acts inside each head's p coordinates and
#     leaves span(U_k) ⊂ R^d unchanged.
# So the ×π shift gives the two groups different but overlapping bands; nothing forces a head to
# use one end of its band, and which frequencies a head relies on is what analyze_heads measures.
# Controls: rope_ratio = 1 (π-off) gives both groups the same band; rope_bands = "split" gives them
# disjoint bands over the standard range (signal the slow half, noise the fast half of the twice
# as dense ladder θ^(−i/p), i = 0 … p − 1): the clean form of "slow signal, fast noise" heads.
# RoPE rotates q and k but not the value, which is one more way the layer departs from the
# gradient of §2: for the rotated tokens, the exact form would rotate each value by R_{s−t} too.


def rotary_frequencies(head_dim, theta):
    """The standard RoPE frequencies θ^(−2i/p), i = 0 … p/2 − 1, float64."""
    i = torch.arange(head_dim // 2, dtype=torch.float64)
    return theta ** (-2 * i / head_dim)


def rope_frequencies(config):
    """(n_head, head_dim // 2) float64 angular frequencies; signal heads come first."""
    pairs = config.head_dim // 2
    if config.rope_bands == "split":
        ladder = rotary_frequencies(2 * config.head_dim, config.rope_theta)  # θ^(−i/p), p rungs
        slow, fast = ladder[pairs:], ladder[:pairs]
        return torch.stack([slow if h < config.signal_heads else fast for h in range(config.n_head)])
    ratio = torch.ones(config.n_head, 1, dtype=torch.float64)
    ratio[config.signal_heads:] = config.rope_ratio
    return ratio * rotary_frequencies(config.head_dim, config.rope_theta)


def band_facts(head_dim, theta=10000.0, ratio=math.pi, context=128, max_distance=512):
    """What the ×ratio shift does to the noise band, computed: counts of noise pairs inside /
    above the signal band, the fastest noise frequency and pairs at or past Nyquist (ω ≥ π), pairs
    of each group with wavelength 2π/ω > context, and the closest phase re-alignment of a signal
    pair and a noise pair at an integer distance 1 … max_distance (radians from a multiple of 2π;
    0 means exact)."""
    signal = rotary_frequencies(head_dim, theta)
    noise = ratio * signal
    lo, hi = float(signal.min()), float(signal.max())
    tol = 1e-12
    delta = torch.arange(1, max_distance + 1, dtype=torch.float64)[:, None, None]
    phase = torch.remainder(delta * (noise[None, None, :] - signal[None, :, None]), 2 * math.pi)
    return dict(
        pairs=len(signal),
        noise_inside_signal_band=int(((noise >= lo - tol) & (noise <= hi + tol)).sum()),
        noise_above_signal_band=int((noise > hi + tol).sum()),
        fastest_noise=float(noise.max()),
        noise_at_or_past_nyquist=int((noise >= math.pi - tol).sum()),
        signal_longer_than_context=int((2 * math.pi / signal > context).sum()),
        noise_longer_than_context=int((2 * math.pi / noise > context).sum()),
        closest_realignment=float(torch.minimum(phase, 2 * math.pi - phase).min()),
    )


def rotary_tables(freqs, length):
    """cos and sin of t·ω for t < length: (n_head, length, pairs) each, float32."""
    angles = torch.arange(length, dtype=torch.float64)[None, :, None] * freqs[:, None, :]
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x, cos, sin):
    """Rotate x (B, H, T, p) pair-wise; cos, sin (H, T, p/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class PrismAttention(nn.Module):
    """One MSSA step (§2): Z ← Z + η Σ_k softmax_causal(W_k W_kᵀ/√p) W_k B_k,   W_k = Z U_k.

    Query, key and value are the same projection W_k = Z U_k (one head = one subspace, no separate
    W_q, W_k, W_v), q = k are rotated by π-RoPE and v is not. The step is CRATE's form, built
    from the second-order term of a truncated series (§2), not a gradient step: that term alone
    raises R^c, and the tests check the exact parts and how far the rest is from them.

    The overcomplete dictionary. U = [U_1 … U_H] ∈ R^{d×H·p} with ρ = H·p/d > 1 (default 2): more
    subspaces than dimensions to explain the tokens with. Sharing q = k = v pays for it: ρ = 2
    costs 2d² weights (with the tied back-projection), against 3d² for q, k, v apart.

    The back-projection B_k into R^d. Decoupled (the default): a learned d×H·p matrix, which is
    what CRATE's attention itself does with its output projection (CRATE-α's "decoupled
    dictionary" is in its sparse-coding MLP block, not in attention). Tied: B_k = U_kᵀ with one
    learned scalar η, the form of §2 and stricter than any reference model; η is learned freely:
    with η > 0, the sign of §2, the step raises R^c to first order, a learned η < 0 would make it
    descent-aligned.

    A consequence of q = k (sharing "qkv" or "qk"): a token's score with itself is ‖w_t‖², and
    w_tᵀw_s ≤ ‖w_t‖‖w_s‖ (Cauchy–Schwarz; RoPE keeps norms), so the token scores at least as high
    as any key no longer than itself. Every head leans towards self-attention; analyze_heads
    reports the self-attention mass and the distance without self, so "local" is not mistaken
    for "attends to itself".
    """

    def __init__(self, config):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.qkv_sharing = config.qkv_sharing
        self.dropout = config.dropout
        self.rotate_values = config.rotate_values
        inner = config.n_head * config.head_dim
        # The first `inner` rows are the dictionary Uᵀ; "qk" adds a value, "none" a key and a value.
        n_proj = {"qkv": 1, "qk": 2, "none": 3}[config.qkv_sharing]
        self.dictionary = nn.Linear(config.n_embd, n_proj * inner, bias=config.bias)
        if config.tie_dictionary:
            self.back_projection = None
            self.step_size = nn.Parameter(torch.ones(()))  # η
        else:
            self.back_projection = nn.Linear(inner, config.n_embd, bias=config.bias)
        # The candidates of the white-box search (docs/PRISM.md §8), each off by default.
        # η_k per head: §2's step is Σ_k η U_k SA(W_k); nothing in the derivation ties the heads'
        # steps together, and the dropped β² factor differs per subspace (β·‖G_k‖).
        self.head_step = nn.Parameter(torch.ones(config.n_head)) if config.head_step else None
        # Temperature per head: the softmax stands in for β G_k, whose scale is per subspace.
        self.log_temperature = (nn.Parameter(torch.zeros(config.n_head))
                                if config.head_temperature else None)
        # Normalised subspaces: MCR² codes features on the unit sphere (Yu et al. 2020); scoring
        # RMS-normalised W_k (learned gain, as QK-norm) decouples the softmax's temperature from
        # ‖U_k‖, which otherwise sets both it and the size of the value.
        self.subspace_norm = nn.RMSNorm(config.head_dim, eps=1e-6) if config.normalize_subspaces else None
        # No self-preference: the diagonal of G_k only rescales w_t along itself (the residual
        # already carries the token), yet with q = k it is the largest score a token can have.
        # Masking it leaves position 0 with no key, so every head gets a sink: a zero key and
        # value with a learned logit, where attention can put mass that should move nothing.
        self.sink_logit = nn.Parameter(torch.zeros(config.n_head)) if config.mask_self else None
        self.resid_dropout = nn.Dropout(config.dropout)
        # RoPE tables are built once here and move with the module to its device.
        cos, sin = rotary_tables(rope_frequencies(config), config.block_size)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def subspaces(self):
        """(H, p, d): each head's U_kᵀ, the projection its queries and keys live in."""
        inner = self.n_head * self.head_dim
        return self.dictionary.weight[:inner].view(self.n_head, self.head_dim, -1)

    def forward(self, x, record=None, cache=None):
        B, T, _ = x.shape
        heads = self.dictionary(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, n_proj·H, T, p)
        start = 0 if cache is None else cache.length  # absolute position of x[:, 0]
        cos, sin = self.rope_cos[:, start:start + T], self.rope_sin[:, start:start + T]
        norm = self.subspace_norm or (lambda t: t)
        if self.qkv_sharing == "none":
            q, k, v = heads.split(self.n_head, dim=1)
            q, k = apply_rotary(norm(q), cos, sin), apply_rotary(norm(k), cos, sin)
        else:
            w, v = heads.split(self.n_head, dim=1) if self.qkv_sharing == "qk" else (heads, heads)
            q = k = apply_rotary(norm(w), cos, sin)  # W_k = Z U_k; q = k: rotate once
        if self.rotate_values:  # v_s = R_s w_s: the values live in the same rotated frame as k
            v = apply_rotary(v, cos, sin)
        if self.log_temperature is not None:
            q = q * self.log_temperature.exp()[:, None, None]
        if cache is not None:
            # Even with q = k = v the cache keeps two tensors, the rotated key and W: keeping W
            # alone would mean rotating every past position again for every new token, about
            # as much memory traffic as the attention itself, where the key costs one more
            # (H, T, p) tensor per layer.
            k, v = cache.extend(k, v)
        mask = None
        if self.sink_logit is not None and (cache is not None or record is not None):
            zeros = q.new_zeros(B, self.n_head, 1, self.head_dim)  # the sink: a zero key and value
            k, v = torch.cat((zeros, k), dim=2), torch.cat((zeros, v), dim=2)
            mask = self_masked_bias(T, k.shape[-2] - 1, self.sink_logit, q.dtype)
        if record is not None:
            y = explicit_attention(q, k, v, record, attn_mask=mask)
        elif self.sink_logit is not None and mask is None:  # training: the same, as causal attention
            q, k, v = sink_behind_shifted_keys(q, k, v, self.sink_logit)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.head_dim ** -0.5,
                                               dropout_p=self.dropout if self.training else 0.0)
            y = y[..., :self.head_dim]
        elif mask is None:
            y = F.scaled_dot_product_attention(  # one new query sees every cached key: no mask
                q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=T > 1)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        if self.rotate_values:  # back to token t's frame: y_t = Σ_s A_ts R_{s−t} w_s
            y = apply_rotary(y, cos, -sin)
        if self.head_step is not None:
            y = y * self.head_step[:, None, None]
        y = y.transpose(1, 2).reshape(B, T, -1)
        if self.back_projection is None:
            value_weight = self.dictionary.weight[-y.shape[-1]:]  # U (the value rows) back to R^d
            y = self.step_size * F.linear(y, value_weight.t())
        else:
            y = self.back_projection(y)
        return self.resid_dropout(y)


def self_masked_bias(T, S, sink_logit, dtype):
    """(H, T, S + 1) additive attention bias for mask_self, T queries at the last T of S positions
    (S > T with a generation cache): column 0 is the sink (its learned logit), column 1 + j is key
    j, allowed (0) where j is before the query's position, −inf elsewhere, the diagonal too."""
    device = sink_logit.device
    query_pos = torch.arange(S - T, S, device=device)
    allowed = torch.arange(S, device=device)[None, :] < query_pos[:, None]
    bias = torch.zeros(T, S, device=device, dtype=dtype).masked_fill(~allowed, float("-inf"))
    sink = sink_logit.to(dtype)[:, None, None].expand(-1, T, 1)
    return torch.cat((sink, bias.expand(sink_logit.shape[0], T, S)), dim=-1)


def sink_behind_shifted_keys(q, k, v, sink_logit):
    """mask_self's attention rewritten as plain causal attention, exactly: query t sees the sink
    and keys 0..t−1, which are positions 0..t of [sink, k_0, ..., k_{T−2}]. The sink's learned
    logit b rides on one extra channel (1 in every query, b·√p in the sink's key, 0 in the real
    keys), so with the scale kept at 1/√p the real scores q·k/√p are unchanged and the sink's is
    b. Zero channels pad q, k and v to one width, a multiple of 8, as the fused (flash) kernels
    want them; the values' extra channels stay 0 and are cut from the output. Unlike
    self_masked_bias this needs no (T, T) float mask, which keeps SDPA on its causal kernels."""
    B, H, T, p = q.shape
    pad = 8 - p % 8  # at least the one channel b needs
    one, zero = q.new_ones(B, H, T, 1), q.new_zeros(B, H, T, pad - 1)
    q = torch.cat((q, one, zero), dim=-1)
    sink = (sink_logit * math.sqrt(p)).to(q.dtype)[None, :, None, None].expand(B, H, 1, 1)
    sink_key = torch.cat((q.new_zeros(B, H, 1, p), sink, q.new_zeros(B, H, 1, pad - 1)), dim=-1)
    shifted = torch.cat((k[:, :, :-1], q.new_zeros(B, H, T - 1, pad)), dim=-1)
    k = torch.cat((sink_key, shifted), dim=2)
    v = F.pad(torch.cat((v.new_zeros(B, H, 1, p), v[:, :, :-1]), dim=2), (0, pad))
    return q, k, v


def causal_mask(T, device, window=None):
    """(T, T) bool, True where query i may attend to key j: j ≤ i, and i − j < window if given."""
    i = torch.arange(T, device=device)
    distance = i[:, None] - i[None, :]
    return (distance >= 0) & (distance < (window or T))


def explicit_attention(q, k, v, record, window=None, attn_mask=None):
    """softmax(qkᵀ/√p + mask) v, spelled out so the probabilities can be kept: causal (and
    windowed) by default, or the additive `attn_mask` (H, T, S) whose first S − T keys are extra
    (a sink). The analysis path of every model; equal to the fused kernel up to float rounding.
    The record keeps the probabilities of the T real keys (a sink's share is 1 − their sum)."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    T = q.shape[-2]
    if attn_mask is None:
        attn = scores.masked_fill(~causal_mask(T, q.device, window), float("-inf")).softmax(dim=-1)
    else:
        attn = (scores + attn_mask).softmax(dim=-1)
    record.append({"attn": attn[..., -T:], "q": q, "k": k[..., -T:, :]})
    return attn @ v


# -----------------------------------------------------------------------------
# 5. The rest of the block is deliberately conventional (PRISM.md §5): pre-norm residual,
# LayerNorm, a GELU MLP of width 4d, tied input/output embeddings, no learned positions.
# The white-box alternative to the MLP (mlp = "ista"): one step of ISTA on the non-negative LASSO
# of each token z ∈ R^d against a dictionary D ∈ R^{d×m},
#     min_{a ≥ 0} ½‖z − D a‖² + λ‖a‖₁,
# whose proximal-gradient step is a ← ReLU(a + η Dᵀ(z − D a) − ηλ) (exact ISTA; it decreases
# the objective for η ≤ 1/λ_max(DᵀD) and λ ≥ 0). CRATE takes this step with a complete d×d
# dictionary from a = z and outputs the code itself; CRATE-α makes D overcomplete, starts from
# a = 0, decouples the encoder and adds the reconstruction D a to the residual, as here:
# a = ReLU(η Dᵀz − ηλ), x ← x + D a. "ista-tied" keeps one dictionary (learned step η and
# threshold λ per atom); "ista" learns the encoder D₁ in place of ηDᵀ, which makes it a ReLU MLP
# with a learned threshold. η and λ are learned without constraints, so the descent guarantee
# holds for the step as derived, not necessarily for the trained values.


def ista_step(z, D, threshold, step, a=None):
    """One ISTA step of the non-negative LASSO: ReLU(a + η Dᵀ(z − D a) − ηλ), tokens as rows
    (z (…, d), D (d, m), threshold λ (m,), step η); a = 0 when not given."""
    grad = F.linear(z, D.t()) if a is None else F.linear(z - F.linear(a, D), D.t())
    a = 0 if a is None else a
    return F.relu(a + step * grad - step * threshold)


def lasso_objective(z, D, threshold, a):
    """½‖z − D a‖² + Σ λ_i a_i per token (a ≥ 0, so ‖a‖₁ = Σ a_i)."""
    return 0.5 * (z - F.linear(a, D)).pow(2).sum(-1) + (a * threshold).sum(-1)


def mlp_width(config):
    """The MLP's hidden width (any arch's config): mlp_hidden, or by default 4d — 8d for the tied
    ISTA block, whose one d×8d dictionary holds the GELU MLP's 8d² weights."""
    return config.mlp_hidden or (8 if getattr(config, "mlp", "gelu") == "ista-tied" else 4) * config.n_embd


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden = mlp_width(config)
        self.fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class SparseCodingMLP(nn.Module):
    """x ← D · ReLU(D₁ x − ηλ): one ISTA step from 0 (see above); D₁ = ηDᵀ when tied."""

    def __init__(self, config):
        super().__init__()
        width = mlp_width(config)
        self.tied = config.mlp == "ista-tied"
        self.proj = nn.Linear(width, config.n_embd, bias=False)  # the dictionary D (d × m)
        self.encoder = None if self.tied else nn.Linear(config.n_embd, width, bias=False)  # D₁
        self.step = nn.Parameter(torch.ones(())) if self.tied else None  # η
        self.threshold = nn.Parameter(torch.zeros(width))  # ηλ (decoupled) or λ (tied), per atom
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        if self.tied:
            code = ista_step(x, self.proj.weight, self.threshold, self.step)
        else:
            code = F.relu(self.encoder(x) - self.threshold)
        return self.dropout(self.proj(code))


class Block(nn.Module):
    def __init__(self, config, attention=PrismAttention):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = attention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        # The baselines share this block; their configs have no `mlp` field and keep the GELU MLP.
        self.mlp = MLP(config) if getattr(config, "mlp", "gelu") == "gelu" else SparseCodingMLP(config)

    def forward(self, x, record=None, cache=None):
        z = self.ln_1(x)
        if record is not None:
            before = len(record)
            x = x + self.attn(z, record)
            record[before]["z"] = z  # the tokens Z this layer's MCR² step acts on
        else:
            x = x + self.attn(z, cache=cache)
        return x + self.mlp(self.ln_2(x))


# -----------------------------------------------------------------------------
# 6. What every language model in this project shares.


def padded_vocab_size(vocab_size):
    return 64 * math.ceil(vocab_size / 64)  # matmuls on multiples of 64 run faster


class LanguageModel(nn.Module):
    """Base of PRISM and the baselines. A subclass calls `_build` with its blocks and final norm
    and implements `embed(idx, start)` -> the residual stream entering the first block, for
    tokens at positions start, start + 1, ..."""

    arch = None  # the name train.py and the checkpoints use

    def _build(self, config, blocks, final_norm, **extra_modules):
        """Token embedding, the blocks, the final norm and the tied output layer; then the init."""
        self.config = config
        vocab = padded_vocab_size(config.vocab_size)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, config.n_embd), **extra_modules,
            drop=nn.Dropout(config.dropout), h=nn.ModuleList(blocks), ln_f=final_norm))
        self.lm_head = nn.Linear(config.n_embd, vocab, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied input/output embeddings
        self.apply(self._init_weights)
        # GPT-2's residual scaling: layers that write into the residual stream start smaller.
        for name, p in self.named_parameters():
            if name.endswith(("back_projection.weight", "proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def parameter_report(self):
        """Parameter counts split into embedding / attention / mlp / norm, and the total."""
        report = dict(embedding=0, attention=0, mlp=0, norm=0)
        for name, p in self.named_parameters():  # the tied lm_head is listed once, as wte
            part = ("attention" if ".attn." in name else "mlp" if ".mlp." in name
                    else "embedding" if name.startswith(("transformer.wte", "transformer.wpe"))
                    else "norm")
            report[part] += p.numel()
        report["total"] = sum(report.values())
        return report

    def describe_parameters(self):
        """One line for the log: the arch and its parameter counts by part. The callers print
        it (train.py on rank 0 only), so that building a model never writes anything."""
        report = self.parameter_report()
        return (f"{self.arch}: {report['total'] / 1e6:.2f}M parameters ("
                + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in report.items() if k != "total") + ")")

    def get_num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward_hidden(self, idx, record=None, cache=None):
        """The final hidden states (B, T, d); `record` collects the analysis of each layer.
        With `cache` (from new_cache(), generation only) idx continues the tokens it holds."""
        start = 0 if cache is None else cache[0].length
        if start + idx.shape[1] > self.config.block_size:
            raise ValueError(f"sequence of length {start + idx.shape[1]} is longer than "
                             f"block_size = {self.config.block_size}")
        x = self.transformer.drop(self.embed(idx, start))
        for i, block in enumerate(self.transformer.h):
            x = block(x, record, None if cache is None else cache[i])
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None):
        """idx (B, T) token ids -> logits (B, T, vocab_size) and the mean cross-entropy loss
        against targets (B, T) when given (-1 marks positions to ignore)."""
        return self._head(self.forward_hidden(idx), targets)

    def analyze(self, idx, targets=None):
        """The analysis path: (logits, loss, layers) where layers[l] holds, for layer l, the
        attention probabilities `attn` (B, H, T, T), the rotated per-head `q`, `k` (B, H, T, p) and
        the layer's normalised input tokens `z` (B, T, d). Same numbers as forward()."""
        record = []
        logits, loss = self._head(self.forward_hidden(idx, record), targets)
        return logits, loss, record

    def _head(self, x, targets):
        logits = self.lm_head(x)  # (B, T, padded vocab)
        vocab = self.config.vocab_size
        loss = None
        if targets is not None:
            if logits.size(-1) > vocab:
                # The padding rows take no part in the softmax: -inf there is exactly the loss
                # over the first vocab_size columns, and their gradient is exactly 0 either way
                # (softmax weight e^-inf = 0), so the fill needs no autograd record. Cross-entropy
                # on the contiguous padded logits avoids copying the whole (B·T, vocab) tensor,
                # which the sliced view cost forward (log_softmax) and backward (SliceBackward).
                with torch.no_grad():
                    logits[..., vocab:] = float("-inf")
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-1)
        return logits[..., :vocab], loss  # drop the padding rows

    def rope_frequencies(self, layer=0):
        """(n_head, head_dim // 2) angular frequencies of a layer's heads, or None for a model
        without rotary heads."""
        return None

    def head_groups(self):
        """Each head's designed group ('signal' / 'noise'), or None where there are no groups."""
        return None

    def subspaces(self, layer):
        """(H, p, d) dictionary of a layer for the MCR² diagnostics, or None where there is none."""
        return None

    # -- generation -------------------------------------------------------------------------

    def new_cache(self):
        """One empty KVCache per layer, for forward_hidden(..., cache=)."""
        return [KVCache() for _ in self.transformer.h]

    @torch.no_grad()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                        use_cache=True):
        """Yield (B, 1) sampled tokens one at a time, feeding each back in. The context is cropped
        to the last block_size tokens, so it runs past block_size. temperature 0 is greedy.
        use_cache: each layer keeps the keys and values of the tokens so far and only the newest
        token runs through the model, one position per token instead of the whole context; the
        tokens are the same as without it (up to float rounding in near-ties)."""
        cache = self.new_cache() if use_cache else None
        for _ in range(max_new_tokens):
            if cache is not None and idx.shape[1] > self.config.block_size:
                # Cropping shifts every position of the window at every token, and each cached
                # key depends on tokens that just fell out of it: recompute, as without a cache.
                cache = None
            if cache is None:
                hidden = self.forward_hidden(idx[:, -self.config.block_size:])
            else:
                hidden = self.forward_hidden(idx[:, cache[0].length:], cache=cache)
            logits, _ = self._head(hidden[:, -1:], None)  # only the last position is sampled
            logits = logits[:, -1, :].float()
            if temperature == 0:
                next_token = logits.argmax(dim=-1, keepdim=True)
            else:
                probs = filter_logits(logits / temperature, top_k, top_p).softmax(dim=-1)
                next_token = torch.multinomial(probs, num_samples=1)
            idx = torch.cat((idx, next_token), dim=1)
            yield next_token

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 use_cache=True):
        """idx (B, T) -> (B, T + max_new_tokens)."""
        new = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, use_cache))
        return torch.cat([idx, *new], dim=1)

    # -- training helpers -------------------------------------------------------------------

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW with weight decay on matrices (and embeddings) only, never on norms, biases or
        scalar step sizes; the fused kernel where this PyTorch has it for the device."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas,
                                 **({"fused": True} if fused else {}))

    def flops_per_token(self):
        """Training FLOPs per token (forward + backward): 6 per weight (PaLM appendix B) plus the
        attention matmuls qkᵀ and AV, 12·L·(H·p)·T. PRISM's shared q = k = v changes only the
        weight count; each head still forms scores and mixes values over T positions."""
        c = self.config
        return 6 * self.get_num_params() + 12 * c.n_layer * c.n_head * c.head_dim * c.block_size

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops=None, dtype=None):
        """Model FLOPs utilisation of `fwdbwd_per_iter` sequences in `dt` seconds, as a fraction of
        `peak_flops`; None: the current CUDA device's dense peak for `dtype` (gpu_peak_flops;
        None = the 16-bit type train.py's dtype=auto picks). On a device with no known peak the
        MFU is NaN, with a warning, rather than a number against some other GPU's peak: NaN
        prints as nan and fails every comparison, so callers' `mfu > 0` checks leave it out."""
        if peak_flops is None:
            peak_flops = current_gpu_peak_flops(dtype)
            if peak_flops is None:
                return math.nan
        flops = self.flops_per_token() * self.config.block_size * fwdbwd_per_iter
        return flops / dt / peak_flops


# Dense (no 2:4 sparsity) peak TFLOP/s by GPU, as torch.cuda.get_device_name() spells it, from
# the vendors' datasheets and architecture whitepapers; the datasheets quote tensor-core rates
# "with sparsity", twice the dense ones given here. bfloat16 / float16: tensor cores with float32
# accumulation (what PyTorch's matmuls use); tf32: float32 matmuls with allow_tf32 (train.py and
# bench.py set it); float32: the plain CUDA cores. None: the GPU has no such unit.
# A name that no pattern matches gets no MFU: a guess from a similar name would be a wrong number.
GPU_PEAK_TFLOPS = (
    # (regex searched in the name, bfloat16, float16, tf32, float32)
    # NVIDIA H100 Tensor Core GPU Architecture whitepaper (SXM5, PCIe); H100 datasheet (NVL)
    (r"H100 80GB HBM3$", 989.4, 989.4, 494.7, 66.9),  # H100 SXM5 reports this name
    (r"H100 PCIe$", 756.5, 756.5, 378.0, 51.2),
    (r"H100 NVL$", 835.5, 835.5, 417.5, 60.0),
    # H200 datasheet: the SXM part has the H100 SXM5's compute, the NVL part the H100 NVL's
    (r"H200$", 989.4, 989.4, 494.7, 66.9),
    (r"H200 NVL$", 835.5, 835.5, 417.5, 60.0),
    # A100 datasheet: the same peaks for SXM4 and PCIe, 40 GB and 80 GB
    (r"A100[- ]", 312.0, 312.0, 156.0, 19.5),
    (r"NVIDIA A10$", 125.0, 125.0, 62.5, 31.2),         # A10 datasheet
    (r"NVIDIA L4$", 121.0, 121.0, 60.0, 30.3),          # L4 datasheet
    (r"NVIDIA L40S$", 362.05, 362.05, 183.0, 91.6),     # L40S datasheet
    # NVIDIA Ada Lovelace (RTX 4090) and Ampere GA102 (RTX 3090) architecture whitepapers; the
    # GeForce cards' tensor cores run at half rate with float32 accumulation, given here
    (r"GeForce RTX 4090$", 165.2, 165.2, 82.6, 82.6),
    (r"GeForce RTX 3090$", 71.0, 71.0, 35.6, 35.6),
    # V100 and T4 datasheets: float16 tensor cores only
    (r"V100-SXM2", None, 125.0, None, 15.7),
    (r"V100-PCIE", None, 112.0, None, 14.0),
    (r"Tesla T4$", None, 65.0, None, 8.1),
)
PEAK_DTYPES = ("bfloat16", "float16", "tf32", "float32")


def gpu_peak_flops(device_name, dtype="bfloat16"):
    """Dense peak FLOP/s of the GPU called `device_name` for matmuls in `dtype` (one of
    PEAK_DTYPES, or a torch dtype), or None where GPU_PEAK_TFLOPS does not know it."""
    dtype = str(dtype).removeprefix("torch.")
    if dtype not in PEAK_DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose from {', '.join(PEAK_DTYPES)}")
    for pattern, *peaks in GPU_PEAK_TFLOPS:
        if re.search(pattern, device_name):
            tflops = peaks[PEAK_DTYPES.index(dtype)]
            return None if tflops is None else tflops * 1e12
    return None


def current_gpu_peak_flops(dtype=None):
    """gpu_peak_flops of the current CUDA device (None without one, with a warning); dtype None:
    bfloat16 where torch.cuda.is_bf16_supported(), else float16, as train.py's dtype=auto."""
    if not torch.cuda.is_available():
        warnings.warn("no CUDA device: MFU not reported", stacklevel=3)
        return None
    name = torch.cuda.get_device_name()
    if dtype is None:
        dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    peak = gpu_peak_flops(name, dtype)
    if peak is None:
        warnings.warn(f"unknown device {name!r} for {dtype}: MFU not reported (its peak is not in "
                      "model.GPU_PEAK_TFLOPS)", stacklevel=3)
    return peak


class Prism(LanguageModel):
    arch = "prism"

    def __init__(self, config):
        super().__init__()
        self._build(config, [Block(config) for _ in range(config.n_layer)],
                    nn.LayerNorm(config.n_embd, bias=config.bias))
        if config.rho_init:  # ρ times the directions at 1/ρ the variance: ‖U‖_F² of ρ = 1
            for block in self.transformer.h:
                nn.init.normal_(block.attn.dictionary.weight, std=0.02 / math.sqrt(self.overcompleteness))

    def flops_per_token(self):
        """The base count, plus the second use of each tied matrix: the tied back-projection
        reads the dictionary again (d·H·p per layer), the tied ISTA block its D (d·m per layer);
        6·params counts a weight once."""
        c = self.config
        reused = (c.n_embd * c.n_head * c.head_dim if c.tie_dictionary else 0) + (
            c.n_embd * mlp_width(c) if c.mlp == "ista-tied" else 0)
        return super().flops_per_token() + 6 * c.n_layer * reused

    @property
    def overcompleteness(self):
        """ρ = H·p / d: how many more dictionary directions than token dimensions."""
        return self.config.n_head * self.config.head_dim / self.config.n_embd

    def embed(self, idx, start=0):
        return self.transformer.wte(idx)  # no absolute positions: RoPE carries them

    def rope_frequencies(self, layer=0):
        return rope_frequencies(self.config)  # the same in every layer

    def head_groups(self):
        c = self.config
        return ["signal"] * c.signal_heads + ["noise"] * (c.n_head - c.signal_heads)

    def subspaces(self, layer):
        return self.transformer.h[layer].attn.subspaces()


class KVCache:
    """What one attention layer keeps of the tokens it has seen while generating: the tensors
    (B, H, T, p) that later queries read, keys and values in the order the layer passes them.
    `window`: a sliding-window layer sees only its last `window` positions, so it keeps window − 1
    (the new token is the window-th) and its memory stays bounded."""

    def __init__(self, window=None):
        self.window = window
        self.length = 0  # positions seen so far = the absolute position of the next token
        self.tensors = None

    def extend(self, *new):
        """Append the new positions; return past + new, what the new queries attend to. Several
        positions at once (the prompt) only into an empty cache, so the layer's usual causal mask
        is the right one; after that one position per call, which sees everything returned."""
        T = new[0].shape[-2]
        if self.tensors is None:
            full = new
        else:
            if T != 1:
                raise ValueError(f"{T} positions into a non-empty cache: one at a time")
            # cat copies the past once per token: the same bytes the attention reads anyway.
            full = tuple(torch.cat((past, t), dim=-2) for past, t in zip(self.tensors, new))
        self.length += T
        n = full[0].shape[-2]
        keep = n if self.window is None else min(n, self.window - 1)
        self.tensors = tuple(t[:, :, n - keep:] for t in full)
        return full


def filter_logits(logits, top_k=None, top_p=None):
    """Keep the top_k largest logits and the smallest set whose probability reaches top_p."""
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # the token that crosses top_p stays
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return logits


# -----------------------------------------------------------------------------
# Architectures by name, and the checkpoints train.py writes.

# The tutorial has one architecture. The lab (lab/) adds its baselines and white-box variants to
# this table when it is imported, and get_arch imports it on the first name the table lacks:
# that import is the one place the tutorial reaches into the lab, so that
# `python train.py --arch=gpt2` and sample.py on a lab checkpoint work from the top level.
ARCHS = {"prism": (PrismConfig, Prism)}
LAB_PACKAGE = "lab"


def get_arch(name):
    """(ConfigClass, ModelClass) for an architecture name."""
    if name not in ARCHS:
        try:
            importlib.import_module(LAB_PACKAGE)  # registers the lab's archs
        except ModuleNotFoundError:
            pass
    if name not in ARCHS:
        raise ValueError(f"unknown arch {name!r}; choose from {', '.join(ARCHS)}")
    return ARCHS[name]


def build_model(arch, **model_args):
    """A fresh model of `arch`; unknown or bad model_args raise ValueError naming the field."""
    config_cls, model_cls = get_arch(arch)
    known = {f.name for f in fields(config_cls)}
    unknown = sorted(set(model_args) - known)
    if unknown:
        raise ValueError(f"{config_cls.__name__} has no field {unknown[0]!r}")
    return model_cls(config_cls(**model_args))


def checkpoint_payload(model):
    """What identifies a model in a checkpoint: its arch, its config, its weights, and the
    vocabulary its token ids belong to (meta.json's tokenizer fields, set by train.py)."""
    return {"arch": model.arch, "model_config": asdict(model.config), "model": model.state_dict(),
            "vocabulary": getattr(model, "vocabulary", None)}


class CheckpointError(ValueError):
    """A file that cannot be loaded as a checkpoint; the message is one line for the user."""


def read_checkpoint(path, device="cpu"):
    """torch.load of a checkpoint with weights_only=True: tensors and plain data only. A pickle
    can carry code that runs while it loads; the restricted unpickler refuses it before anything
    runs, and so does this (CheckpointError), as it does a file that is no checkpoint at all."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except FileNotFoundError:
        raise FileNotFoundError(f"no checkpoint at {path}") from None
    # torch.save writes a zip archive (or, in its legacy format, a pickle: protocol byte 0x80).
    if not (head == b"PK\x03\x04" or head[:1] == b"\x80"):
        raise CheckpointError(f"{path} is not a PyTorch checkpoint file")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path} is not a safe checkpoint: it contains code/objects other "
                              "than tensors and plain data; refusing to load") from None
    except Exception as e:  # a truncated or damaged archive
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} is not a PyTorch checkpoint file, or a damaged one "
                              f"({reason})") from None


def load_model(path, device="cpu"):
    """Load the model of a checkpoint written by train.py, in eval mode, on `device`."""
    ckpt = read_checkpoint(path, device)
    if not isinstance(ckpt, dict) or not {"arch", "model_config", "model"} <= ckpt.keys():
        raise CheckpointError(f"{path} is not a prism-nano checkpoint (no arch/model_config/model)")
    model = build_model(ckpt["arch"], **ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    model.vocabulary = ckpt.get("vocabulary")
    return model.to(device).eval()
