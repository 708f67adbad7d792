"""
PRISM: the transformer as a signal-denoising operator derived from MCR² (arXiv 2601.15540).

Read it top to bottom, like the derivation (docs/PRISM.md is the design document): 1 the rates
R, R^c and ΔR; 2 attention from a gradient step on R^c (exact gradient, Neumann truncation,
CRATE's construction, each executable and tested); 3 the overcomplete dictionary; 4 π-RoPE; 5 the
conventional rest; 6 the language model (loss, generation with a KV cache, optimizer, MFU); 7
architectures by name and checkpoints. A statement in a comment is marked exact (an identity or
a theorem, tested where it can be) or heuristic (a choice, motivated, not implied).
Notation, as in the code: tokens are rows. Z ∈ R^{n×d} holds n tokens, U_k ∈ R^{d×p} is subspace k
of the dictionary (the model stores U_kᵀ as rows of a Linear weight), W_k = Z U_k ∈ R^{n×p}.
"""

import importlib
import inspect
import math
import pickle
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F

# -----------------------------------------------------------------------------
# 1. The rates (exact definitions). The coding rate of n tokens up to precision ε,
#     R(Z) = ½ log det(I_d + d/(n ε²) ZᵀZ),
# is a rate per token (MCR², Yu et al. 2020): coding all n tokens takes L = ((n + d)/2) log det(…)
# nats, so L/n → R for n ≫ d; it is not the nats for all n. The compressed rate codes each
# projection W_k = Z U_k on its own,
#     R^c(Z; U) = Σ_k R(Z U_k) = Σ_k ½ log det(I_p + β W_kᵀW_k),    β = p/(n ε²),
# CRATE's form (Yu et al. 2023; MCR²'s own R^c partitions the tokens by class-membership matrices
# instead). A good representation has a large rate reduction ΔR = R(Z) − R^c(Z; U): diverse as a
# whole, compact inside each subspace. R^c grows with the scale of U, so analyze_heads.py also
# evaluates it with each U_k replaced by an orthonormal basis of its span. The model itself never
# evaluates a rate.


def coding_rate(Z, eps=0.5):
    """R(Z) for Z (n, d), in nats per token, in float64 through the smaller Gram matrix
    (det(I_d + a ZᵀZ) = det(I_n + a ZZᵀ), exact)."""
    Z = Z.double()
    n, d = Z.shape
    gram = Z.T @ Z if d <= n else Z @ Z.T
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return 0.5 * torch.logdet(eye + (d / (n * eps**2)) * gram)


def compressed_coding_rate(Z, subspaces, eps=0.5):
    """R^c(Z; U) for Z (n, d) and subspaces (K, p, d) holding each U_kᵀ: Σ_k R(Z U_k)."""
    return sum(coding_rate(Z.double() @ U_k.double().T, eps) for U_k in subspaces)


# -----------------------------------------------------------------------------
# 2. From a gradient step on R^c to attention (CRATE), step by step. G_k = W_k W_kᵀ ∈ R^{n×n} is
# the token Gram matrix of subspace k: how similar every two tokens are inside it.
# (a) Exact:  ∇_Z R^c = Σ_k β (I_n + β G_k)⁻¹ W_k U_kᵀ                 (compressed_rate_gradient)
# (b) Heuristic: the Neumann series (I + βG)⁻¹ = I − βG + β²G² − …, cut after two terms,
#         −∇_Z R^c ≈ Σ_k (−β W_k + β² G_k W_k) U_kᵀ                  (neumann_descent_direction)
#     accurate to O(β³) only where β·λ_max(G_k) < 1 (neumann_radius). Where the model runs it is
#     far above 1: 121–132 per layer for PRISM-50M's initial dictionary on 512 isotropic tokens
#     (one draw; the tests check 115–135), 1.5·10⁴ to 8.8·10⁴ per layer in the study's trained
#     cpu-small PRISMs (lab/results/cpu-small/prism/lr0.016/seed*/heads.json, 9 seeds). There
#     even the two-term series can point uphill (tested).
# (c) A construction choice: keep only the second-order term and put a softmax in place of the
#     similarity G_k (CRATE); for language the softmax is causal, as in CRATE's own language model
#     (model/crate_gpt.py in Ma-Lab-Berkeley/CRATE): row t of softmax(G_k/√p) weighs tokens s ≤ t.
# (d) The first-order term −β W_k U_kᵀ is dropped and β² goes into a learned step. Summed over k
#     it is −βZ Σ_k U_kU_kᵀ: a uniform shrink −cβZ for any tight frame (Σ_k U_kU_kᵀ = cI, exact),
#     not in general.
# What is left is multi-head self-attention with query = key = value = W_k, one head per subspace:
#         Z ← Z + η Σ_k softmax_causal(W_k W_kᵀ/√p) W_k U_kᵀ    (the model learns B_k for ηU_kᵀ, §3).
# This is not a descent step on R^c. For one subspace the kept term cannot lower R^c to first
# order (exact): ⟨G_k W_k U_kᵀ, ∇R^c⟩ = β tr(W_kᵀ G_k (I + βG_k)⁻¹ W_k · U_kᵀU_k) ≥ 0, the trace
# of a product of two positive semi-definite matrices; the same holds for mutually orthogonal
# subspaces, whose cross terms vanish (U_jᵀU_k = 0), and there all the descent of the truncated
# series lives in the dropped term. For overlapping subspaces (every overcomplete dictionary) the
# cross terms have no sign, and the sum can point either way (the tests hold a case where it is
# −69100/559 ≈ −124). With the softmax, on random tokens and subspaces, the tests measure a
# negative cosine with −∇R^c and a rise of R^c along the step (measured, not proven). So the
# layer is CRATE's attention form, motivated by the series, not implied by it; training decides
# what it does to R^c. Nor is it a step on ΔR: the expansion term +∇R(Z) is not in the layer.


def compressed_rate_gradient(Z, subspaces, eps=0.5):
    """(a) ∇_Z R^c(Z; U) in closed form (exact; tested against autograd). Z (n, d), subspaces
    (K, p, d) holding each U_kᵀ; float64."""
    Z, n = Z.detach().double(), Z.shape[0]
    beta = subspaces.shape[1] / (n * eps**2)
    eye = torch.eye(n, dtype=Z.dtype, device=Z.device)
    grad = torch.zeros_like(Z)
    for U_kT in subspaces.detach().double():
        W = Z @ U_kT.T
        grad += beta * torch.linalg.solve(eye + beta * (W @ W.T), W) @ U_kT
    return grad


def neumann_descent_direction(Z, subspaces, eps=0.5):
    """(b) −∇_Z R^c to second order in β: Σ_k (−β W_k + β² W_k W_kᵀ W_k) U_kᵀ. Its relative error
    falls as β² where β·λ_max(G_k) → 0 (tested)."""
    Z = Z.detach().double()
    beta = subspaces.shape[1] / (Z.shape[0] * eps**2)
    out = torch.zeros_like(Z)
    for U_kT in subspaces.detach().double():
        W = Z @ U_kT.T
        out += (-beta * W + beta**2 * (W @ W.T) @ W) @ U_kT
    return out


def neumann_radius(Z, subspaces, eps=0.5):
    """max_k β·λ_max(W_kᵀW_k): the series of (b) converges only where this is < 1."""
    Z = Z.detach().double()
    beta = subspaces.shape[1] / (Z.shape[0] * eps**2)
    return max(float(beta * torch.linalg.eigvalsh((Z @ U.T).T @ (Z @ U.T))[-1])
               for U in subspaces.detach().double())


# -----------------------------------------------------------------------------
# The model's settings. The defaults are the paper's PRISM-50M: d = 512, 8 layers, 16 heads of
# p = 64 (ρ = 2, 8 signal + 8 noise heads), context 512, GPT-2's vocabulary: 50.93M parameters.
# config/cpu_small.py and config/prism_50m.py state the sizes they train.


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


def _check(config, name, ok, why):
    if not ok:
        raise ValueError(f"{type(config).__name__}.{name} = {getattr(config, name)!r} {why}")


# -----------------------------------------------------------------------------
# 3. Constraint 1, the overcomplete dictionary. U = [U_1 … U_H] ∈ R^{d×H·p} with ρ = H·p/d > 1
# (default 2): more directions than the tokens have dimensions. One projection gives query, key
# and value, so at ρ = 2 the dictionary and the back-projection hold 4d² weights, what standard
# attention spends on separate q, k, v and output (exact count, tested): the overcompleteness is
# bought with the weights that q = k = v saves. The back-projection B_k ∈ R^{p×d} is a learned,
# decoupled matrix, as CRATE's output projection is (§2's own form would tie it: B_k = U_kᵀ with
# one learned step η).
# A consequence of q = k (exact): a token's score with itself is ‖w_t‖² and w_tᵀw_s ≤ ‖w_t‖‖w_s‖
# (Cauchy–Schwarz; RoPE keeps norms), so the diagonal is the row's largest score against keys no
# longer than w_t, but not against longer ones. analyze_heads.py reports the self-attention mass
# and the distance without self, so that "local" is not mistaken for "attends to itself".
#
# 4. Constraint 2, π-RoPE. Every head rotates the 2-D pairs (x_i, x_{i+p/2}) of its q = k by the
# angle t·ω_i at position t, so q_sᵀk_t depends on the positions only through s − t (exact).
# Signal heads use the standard ladder ω_i = θ^(−2i/p), i = 0 … p/2 − 1; noise heads use π·ω_i.
# What the shift does, computed by band_facts (docs/PRISM.md §4 has the numbers and the proofs):
# the bands overlap (p = 32: 14 of the 16 noise pairs lie inside the signal band, 2 above it); the
# fastest noise pair sits at ω = π, the Nyquist frequency, where it sees only the parity of a
# distance; no phase ever re-aligns exactly, for the ratio π (π is transcendental, the ω_i
# algebraic) as for 3 (3ω_j ≠ ω_i); and a rotation inside each head's p coordinates leaves
# span(U_k) unchanged, so it cannot make the subspaces incoherent. The two groups get different
# but overlapping bands (heuristic: which frequencies a head relies on is learned, and is what
# analyze_heads.py measures). RoPE rotates q = k but not the value: one more departure from §2,
# whose exact form for the rotated tokens would rotate each value by R_{s−t} too.


def rotary_frequencies(head_dim, theta):
    """The standard RoPE frequencies θ^(−2i/p), i = 0 … p/2 − 1, float64."""
    i = torch.arange(head_dim // 2, dtype=torch.float64)
    return theta ** (-2 * i / head_dim)


def rope_frequencies(config):
    """(n_head, head_dim // 2) float64 angular frequencies; the signal heads come first."""
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
    """One MSSA step (§2-4): Σ_k softmax_causal(q_k k_kᵀ/√p) W_k B_k, which Block adds to the
    residual, with W_k = Z U_k the one projection, q_k = k_k = W_k rotated by π-RoPE, and the value
    W_k itself."""

    def __init__(self, config):
        super().__init__()
        self.n_head, self.head_dim, self.dropout = config.n_head, config.head_dim, config.dropout
        inner = config.n_head * config.head_dim
        self.dictionary = nn.Linear(config.n_embd, inner, bias=config.bias)  # the rows are Uᵀ
        self.back_projection = nn.Linear(inner, config.n_embd, bias=config.bias)  # B
        self.resid_dropout = nn.Dropout(config.dropout)
        # RoPE tables, built once; they move with the module to its device.
        cos, sin = rotary_tables(rope_frequencies(config), config.block_size)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def subspaces(self):
        """(H, p, d): each head's U_kᵀ, the subspace its queries, keys and values live in."""
        return self.dictionary.weight.view(self.n_head, self.head_dim, -1)

    def forward(self, x, record=None, cache=None):
        B, T, _ = x.shape
        w = self.dictionary(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # W_k: (B, H, T, p)
        start = 0 if cache is None else cache.length  # the absolute position of x[:, 0]
        q = k = apply_rotary(w, self.rope_cos[:, start:start + T], self.rope_sin[:, start:start + T])
        v = w
        if cache is not None:
            # The cache keeps the rotated key and W, two tensors although q = k = v: keeping W
            # alone would rotate every past position again at every new token.
            k, v = cache.extend(k, v)
        if record is not None:  # the analysis path: the same numbers, probabilities kept
            y = explicit_attention(q, k, v, record)
        else:  # one new query against the cache sees every cached key: no mask
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1,
                                               dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, -1)  # the heads side by side
        return self.resid_dropout(self.back_projection(y))


def causal_mask(T, device, window=None):
    """(T, T) bool, True where query i may attend to key j: j ≤ i, and i − j < window if given."""
    i = torch.arange(T, device=device)
    distance = i[:, None] - i[None, :]
    return (distance >= 0) & (distance < (window or T))


def explicit_attention(q, k, v, record, window=None, attn_mask=None):
    """softmax(qkᵀ/√p + mask) v, spelled out so that the probabilities can be kept: causal (and
    windowed) by default, or the additive `attn_mask` (H, T, S) whose first S − T keys are extra
    (a sink, in the lab). The analysis path of every model; equal to the fused kernel up to float
    rounding (tested). The record keeps the probabilities of the T real keys."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    T = q.shape[-2]
    if attn_mask is None:
        attn = scores.masked_fill(~causal_mask(T, q.device, window), float("-inf")).softmax(dim=-1)
    else:
        attn = (scores + attn_mask).softmax(dim=-1)
    record.append({"attn": attn[..., -T:], "q": q, "k": k[..., -T:, :]})
    return attn @ v


# -----------------------------------------------------------------------------
# 5. The rest of the block is deliberately conventional (docs/PRISM.md §5): pre-norm residual,
# LayerNorm, a GELU MLP of width 4d, tied input/output embeddings, no learned positions.


def mlp_width(config):
    """The MLP's hidden width (any arch's config): mlp_hidden, or 4·n_embd."""
    return config.mlp_hidden or 4 * config.n_embd


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden = mlp_width(config)
        self.fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """x ← x + attention(LN(x)); x ← x + mlp(LN(x)). Both classes are called with the config."""

    def __init__(self, config, attention=PrismAttention, mlp=MLP):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = attention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = mlp(config)

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
# 6. The language model: what PRISM shares with the lab's baselines.


def padded_vocab_size(vocab_size):
    return 64 * math.ceil(vocab_size / 64)  # matmuls on multiples of 64 run faster


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


class LanguageModel(nn.Module):
    """Base of PRISM and the lab's models. A subclass calls `_build` with its blocks and final
    norm and implements `embed(idx, start)` -> the residual stream entering the first block, for
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
        # GPT-2's residual scaling: the layers that write into the residual stream start smaller.
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
        """One line for the log: the arch and its parameter counts by part. Callers print it
        (train.py on rank 0 only): building a model never writes anything."""
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
            with torch.no_grad():  # padding columns out of the softmax (exact, gradient 0),
                logits[..., vocab:] = float("-inf")  # cheaper than cross-entropy on a slice
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-1)
        return logits[..., :vocab], loss  # drop the padding columns

    # What analyze_heads.py asks of a model; None where a model has no such thing.
    def rope_frequencies(self, layer=0):
        return None  # (n_head, head_dim // 2) angular frequencies of the layer's heads

    def head_groups(self):
        return None  # each head's designed group, 'signal' or 'noise'

    def subspaces(self, layer):
        return None  # (H, p, d): the layer's dictionary, for the MCR² diagnostics

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
            logits = self._head(hidden[:, -1:], None)[0][:, -1, :].float()  # the last position only
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
        scalars; the fused kernel where this PyTorch has it for the device."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas,
                                 **({"fused": True} if fused else {}))

    def flops_per_token(self):
        """Training FLOPs per token (forward + backward): 6 per weight (PaLM, appendix B) plus the
        attention matmuls qkᵀ and AV, 12·L·(H·p)·T. PRISM's shared q = k = v changes only the
        weight count; each head still forms scores and mixes values over T positions."""
        c = self.config
        return 6 * self.get_num_params() + 12 * c.n_layer * c.n_head * c.head_dim * c.block_size

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops):
        """Model FLOPs utilisation of `fwdbwd_per_iter` sequences in `dt` seconds, as a fraction of
        the device's dense `peak_flops` (FLOP/s, given by the caller: train.py knows the GPU).
        None, a device with no known peak, gives NaN, which fails every comparison."""
        if peak_flops is None:
            return math.nan
        return self.flops_per_token() * self.config.block_size * fwdbwd_per_iter / dt / peak_flops


class Prism(LanguageModel):
    """The paper's model: token embedding (no absolute positions: π-RoPE carries them), n_layer
    blocks of PrismAttention and MLP, the final LayerNorm and the tied output layer. The lab
    subclasses it and swaps the two class attributes."""

    arch = "prism"
    attention_class = PrismAttention
    mlp_class = MLP

    def __init__(self, config):
        super().__init__()
        blocks = [Block(config, type(self).attention_class, type(self).mlp_class)
                  for _ in range(config.n_layer)]
        self._build(config, blocks, nn.LayerNorm(config.n_embd, bias=config.bias))

    @property
    def overcompleteness(self):
        """ρ = H·p / d: how many more dictionary directions than token dimensions."""
        return self.config.n_head * self.config.head_dim / self.config.n_embd

    def embed(self, idx, start=0):
        return self.transformer.wte(idx)

    def rope_frequencies(self, layer=0):
        return rope_frequencies(self.config)  # the same in every layer

    def head_groups(self):
        c = self.config
        return ["signal"] * c.signal_heads + ["noise"] * (c.n_head - c.signal_heads)

    def subspaces(self, layer):
        return self.transformer.h[layer].attn.subspaces()


# -----------------------------------------------------------------------------
# 7. Architectures by name, and the checkpoints train.py writes.
# The tutorial has one architecture. THE ONE HOOK from the tutorial into the lab: get_arch imports
# the `lab` package on the first name this table lacks, and lab/__init__.py adds the lab's models
# (GPT-2, Gemma 3, the white-box variants) to ARCHS. That is what makes `python train.py
# --arch=gpt2` and sample.py on a lab checkpoint work from the top level; nothing else in the
# tutorial imports the lab, and without a lab/ folder the tutorial runs on its own.
ARCHS = {"prism": (PrismConfig, Prism)}
LAB_PACKAGE = "lab"


def get_arch(name):
    """(ConfigClass, ModelClass) for an architecture name."""
    if name not in ARCHS:
        try:
            importlib.import_module(LAB_PACKAGE)  # the one hook: registers the lab's archs
        except ModuleNotFoundError as e:
            if e.name != LAB_PACKAGE:  # the lab is there but cannot import: say why
                raise
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
    except Exception:  # a truncated or damaged archive; torch's own message is not for the user
        raise CheckpointError(f"{path} is damaged or truncated (not a complete PyTorch "
                              "checkpoint)") from None


def load_model(path, device="cpu"):
    """Load the model of a checkpoint written by train.py, in eval mode, on `device`."""
    ckpt = read_checkpoint(path, device)
    if not isinstance(ckpt, dict) or not {"arch", "model_config", "model"} <= ckpt.keys():
        raise CheckpointError(f"{path} is not a prism-nano checkpoint (no arch/model_config/model)")
    model = build_model(ckpt["arch"], **ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    model.vocabulary = ckpt.get("vocabulary")
    # What train.py's checkpoint says of its run, for the scripts' "loaded ..." line (None: absent).
    model.training_run = {k: ckpt.get(k) for k in ("iter_num", "best_val_loss", "train_config")}
    return model.to(device).eval()
