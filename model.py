"""
PRISM (D. Huang, arXiv 2601.15540): attention modelled on a step of Maximal Coding Rate Reduction
(MCR²), with one overcomplete dictionary for query, key, value and output, two RoPE bases (π-RoPE) and
a differential read-out: the function the author's code computes (github HuangDongchen/PRISM-Transformer,
commit b7a0024); everything else is nanoGPT's GPT-2. docs/PRISM.md says where each fact comes from.

Read it top to bottom, like the derivation (§1–§8). A statement is marked exact (an identity or a
theorem; tests/test_model.py checks it where it can, docs/PRISM.md §2 has the proofs) or heuristic
(a choice, a reading, or a measurement).
Notation: tokens are rows; Z ∈ R^{n×d} holds n tokens. The dictionary D ∈ R^{2Hp×d} (one Linear's
weight) holds one atom per row; head k owns p consecutive rows, U_kᵀ ∈ R^{p×d}, and reads the
coordinates W_k = Z U_k ∈ R^{n×p}. Heads 0 … H−1 are the signal stream, H … 2H−1 the noise stream.
"""

import importlib.util
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F


# 1. The rates (exact definitions). The coding rate of n tokens up to precision ε,
#     R(Z) = ½ log det(I_d + d/(n ε²) ZᵀZ),
# is a rate per token (MCR², Yu et al. 2020): coding all n tokens takes ((n + d)/2) log det(…) nats,
# so R is the n ≫ d limit of the nats per token. The compressed rate codes each subspace's
# coordinates on their own (CRATE, Yu et al. 2023),
#     R^c(Z; U) = Σ_k R(Z U_k) = Σ_k ½ log det(I_p + β W_kᵀW_k),    β = p/(n ε²).
# A good representation has a large rate reduction ΔR = R(Z) − R^c: diverse as a whole, compact
# inside each subspace. The model never evaluates a rate; analyze_heads.py measures them.
def coding_rate(Z, eps=0.5):
    """R(Z), Z (n, d), float64, via the smaller Gram (det(I_d + aZᵀZ) = det(I_n + aZZᵀ), exact)."""
    Z = Z.double()
    n, d = Z.shape
    gram = Z.T @ Z if d <= n else Z @ Z.T
    return 0.5 * torch.logdet(torch.eye(len(gram), dtype=Z.dtype, device=Z.device)
                              + (d / (n * eps**2)) * gram)


def compressed_coding_rate(Z, subspaces, eps=0.5):
    """R^c(Z; U) for Z (n, d) and subspaces (K, p, d) holding each U_kᵀ: Σ_k R(Z U_k)."""
    return sum(coding_rate(Z.double() @ U_kT.double().T, eps) for U_kT in subspaces)


# 2. From a step on R^c to attention (CRATE's construction). G_k = W_k W_kᵀ ∈ R^{n×n}: how alike
# every two tokens are inside subspace k.
# (a) Exact: ∇_Z R^c = Σ_k β (I_n + β G_k)⁻¹ W_k U_kᵀ (tested against autograd).
# (b) Heuristic: the Neumann series (I + βG)⁻¹ = I − βG + β²G² − … cut after two terms,
#         −∇_Z R^c ≈ Σ_k (−β W_k + β² G_k W_k) U_kᵀ,
#     accurate to O(β³) only where β·λ_max(G_k) < 1 (neumann_radius). Where the model runs it is far
#     above 1 (about 370 at the paper's initial dictionary on isotropic tokens), and there even the
#     two-term series can point uphill (both tested).
# (c) A construction choice (CRATE): keep the second-order term with a causal softmax
#     A_k = softmax_causal(W_k W_kᵀ/√p) in place of G_k, and drop the first-order term, which summed
#     over k is −βZ Σ_k U_kU_kᵀ: exactly the uniform shrink −βZ at a tight frame of bound 1 (§3).
# What is left is one attention head per subspace with query = key = value = W_k:
#         Z ← Z + η Σ_k A_k W_k U_kᵀ.
# It is no descent step on R^c (exact): with G_k, one subspace's own term cannot lower its rate at
# first order; for overlapping subspaces, as in every overcomplete dictionary, the cross terms have
# no sign (a counterexample is tested); with the softmax the tests measure R^c rising (measured, not
# proven). So the layer is CRATE's attention form, motivated by the series, not implied by it.
def neumann_radius(Z, subspaces, eps=0.5):
    """max_k β·λ_max(W_kᵀW_k), β = p/(n ε²): the series of (b) converges only where this is < 1."""
    Z, subspaces = Z.detach().double(), subspaces.detach().double()
    beta = subspaces.shape[1] / (len(Z) * eps**2)
    return max(float(beta * torch.linalg.eigvalsh(W.T @ W)[-1]) for W in Z @ subspaces.mT)


# The model's settings. The defaults are the paper's PRISM (config/prism_50m.py; heads of p = 128):
# 51,192,320 parameters, 50,930,176 without the position embedding.
@dataclass
class PrismConfig:
    vocab_size: int = 50257      # GPT-2 BPE; the embedding is padded to a multiple of 64 (50304)
    block_size: int = 512        # context length, also the number of learned positions
    n_layer: int = 8             # blocks (attention + MLP)
    n_embd: int = 512            # d
    n_head: int = 8              # H: heads per stream, so H signal + H noise heads
    expansion: int = 2           # R: head width p = R·d/H; the dictionary has 2·H·p = 2R·d atoms
    signal_base: float = 1e4 * math.pi   # RoPE base of the signal heads (slower)
    noise_base: float = 1e4 / math.pi    # RoPE base of the noise heads (faster)
    lambda_start: float = 0.01   # λ, the noise stream's read-out weight, at the first iteration
    lambda_end: float = 0.1      # λ at the last iteration, after a cosine ramp (model.py §5)
    dropout: float = 0.0         # on the embedding, the attention probabilities and the outputs
    bias: bool = False           # biases in the LayerNorms and the MLP (never in the dictionary)
    mlp_hidden: int = 0          # MLP width; 0 = 4·d (nanoGPT's)

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_embd", "n_head", "expansion"):
            _check(self, name, getattr(self, name) > 0, "must be positive")
        _check(self, "n_head", self.expansion * self.n_embd % self.n_head == 0,
               "must divide expansion·n_embd (p = R·d/H)")
        _check(self, "expansion", self.head_dim % 2 == 0, "must make p = R·d/H even (RoPE pairs)")
        for name in ("signal_base", "noise_base"):
            _check(self, name, getattr(self, name) > 1, "must be > 1")
        _check(self, "dropout", 0 <= self.dropout < 1, "must be in [0, 1)")
        _check(self, "mlp_hidden", self.mlp_hidden >= 0, "must be >= 0 (0 = 4·n_embd)")

    @property
    def head_dim(self):
        return self.expansion * self.n_embd // self.n_head  # p


def _check(config, name, ok, why):
    if not ok:
        raise ValueError(f"{type(config).__name__}.{name} = {getattr(config, name)!r} {why}")


# 3. The dictionary: 2·H·p = 2R·d atoms in R^d, overcomplete R times per stream (4× in all at R = 2),
# and no other attention weight: D gives the queries, keys and values (W = Z Dᵀ) and, tied, the
# read-out back to R^d (§5). At R = 2 its 4d² weights are what GPT-2 spends on its q, k, v and
# output projections (exact, tested). It starts as a tight frame, DᵀD = I_d (torch's orthogonal
# init, after the usual N(0, 0.02) one). Exactly then: ‖W‖ = ‖Z‖; Σ_k U_kU_kᵀ = I_d, so §2's dropped
# term is −βZ; and reading out what a head reads in gives the token back, (Z Dᵀ) D = Z. Training
# moves D far off it: DᵀD's extreme eigenvalues (the frame bounds, which analyze_heads.py reports)
# are 0.37–0.44 and 43–274 across the layers of the study's 8 report seeds at cpu-small (measured;
# docs/PRISM.md §5).
# With q = k a token's score with itself, ‖w_t‖², tops its score with every key no longer than w_t
# (Cauchy–Schwarz; RoPE keeps norms; exact); analyze_heads.py reports the attention on itself.
#
# 4. π-RoPE: two RoPE bases. Every head rotates the interleaved pairs (w_2i, w_2i+1) of its q = k by
# t·ω_i at position t, ω_i = b^(−2i/p), i = 0 … p/2 − 1, b = 10⁴·π in the signal heads and 10⁴/π in
# the noise heads; the value is not rotated. Scores depend on positions only through their
# difference (exact). Computed in the tests: both ladders start at ω_0 = 1 rad/token; below it noise
# pair i turns π^(4i/p) times faster than signal pair i, so the noise band lies inside the signal
# band and only signal heads reach the slowest frequencies (at p = 128 and T = 512, 36 of 64 signal
# and 29 of 64 noise pairs turn less than once over the context). A rotation acts inside a head's p
# coordinates: the streams differ in the frequencies they can use, not in the subspaces they read
# (exact). Which of its frequencies a head relies on is learned (heuristic; analyze_heads.py
# measures it).
def rotary_frequencies(head_dim, base):
    return base ** (-2 * torch.arange(head_dim // 2, dtype=torch.float64) / head_dim)


def rope_frequencies(config):
    """(2H, p/2) angular frequencies of the heads, signal heads first."""
    H, p = config.n_head, config.head_dim
    return torch.cat((rotary_frequencies(p, config.signal_base).expand(H, -1),
                      rotary_frequencies(p, config.noise_base).expand(H, -1)))


def rotary_tables(freqs, length):
    """cos and sin of t·ω for t < length: (heads, length, pairs) each, built in float64 once."""
    angles = torch.arange(length, dtype=torch.float64)[None, :, None] * freqs[:, None, :]
    return angles.cos().float(), angles.sin().float()


def rotate_pairs(x, cos, sin):
    """RoPE on interleaved pairs: pair i of x (B, heads, T, p), (x_2i, x_2i+1), turned by t·ω_i:
    x·cos + (x_2i+1, x_2i)·sin, with cos = (c_i, c_i) and sin = (−s_i, s_i) per pair (heads, T, p)."""
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return x * cos.to(x.dtype) + swapped * sin.to(x.dtype)


# 5. The differential, tied read-out S − λN. The layer adds
#         Δ = c·(Σ_{k∈S} A_k W_k U_kᵀ − λ Σ_{k∈N} A_k W_k U_kᵀ),      c = 1/√(2HR),
# §2's step with η = c for the signal heads and −λc for the noise heads, read out through the
# dictionary itself: head k's term lies in span(U_k), the subspace it read (exact; an untied
# read-out B_k would put it in span(B_k) instead).
# The signs in MCR² terms. Exact with G_k in place of A_k: head k's term moves its own subspace's
# rate R(Z U_k) at first order with the sign of η_k: a signal head expands its subspace, a noise
# head compresses its own (the paper's "denoising"). With the causal softmax this is exact only as
# β → 0 with U_kᵀU_k = I and unrotated scores; at finite β with other U_k it can fail (the tests hold
# such draws), and with RoPE the argument does not go through. What is read into it: each term also
# moves the other subspaces' rates, with no sign for overlapping subspaces (§2), and ΔR's R(Z) does
# not enter.
# λ is not learned: a buffer of every layer, saved with the model, that train.py sets before each
# iteration from a cosine ramp over the run (noise_weight_at; from 0.01 to 0.1). Every path from a
# noise atom to the output carries the factor λ (exact); AdamW's step does not grow with a constant
# factor on a gradient, so a small λ quiets the noise stream's output rather than its learning
# (heuristic, for a slowly moving λ).
# The "iso-energy" factor c is no reparametrisation of D (exact): scaling D by a scales the scores by
# a² and, at fixed attention, Δ by a², so c is D's scale only together with a softmax temperature.
# Measured at the start (paper's config, random tokens; tested): the update's RMS is about 2% of its
# input's, so about 11% without c (Δ is linear in c); no energy is conserved by it.
def noise_weight_at(progress, start, end):
    """λ after `progress` (0 … 1, clipped) of the run: start + (end − start)·½(1 − cos(π·progress))."""
    progress = min(1.0, max(0.0, progress))
    return start + (end - start) * 0.5 * (1.0 - math.cos(math.pi * progress))


# 6. The layer: one projection, one fused attention call for all 2H heads, one read-out.
class PrismAttention(nn.Module):
    """Δ = c·Σ_k η_k softmax_causal(q_k q_kᵀ/√p) W_k U_kᵀ, q_k = RoPE(W_k), η_S = 1, η_N = −λ."""

    def __init__(self, config):
        super().__init__()
        self.n_head, self.head_dim, self.dropout = 2 * config.n_head, config.head_dim, config.dropout
        self.dictionary = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)  # D
        self.register_buffer("noise_weight", torch.tensor(config.lambda_start))  # λ, saved
        self.iso_energy = 1 / math.sqrt(2 * config.n_head * config.expansion)  # c
        self.resid_dropout = nn.Dropout(config.dropout)
        cos, sin = rotary_tables(rope_frequencies(config), config.block_size)  # built once
        self.register_buffer("rope_cos", cos.repeat_interleave(2, dim=-1), persistent=False)
        self.register_buffer("rope_sin", torch.stack((-sin, sin), dim=-1).flatten(-2), persistent=False)

    def subspaces(self):  # (2H, p, d): each head's U_kᵀ, the atoms its q, k and v come from
        return self.dictionary.weight.view(self.n_head, self.head_dim, -1)

    def forward(self, z, record=None, cache=None):
        B, T, _ = z.shape
        w = self.dictionary(z).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # W_k
        start = 0 if cache is None else cache.length  # the position of z[:, 0]
        q = rotate_pairs(w, self.rope_cos[:, start:start + T], self.rope_sin[:, start:start + T])
        k, v = (q, w) if cache is None else cache.extend(q, w)  # keep RoPE(W) and W: q = k = v
        if record is not None:  # the analysis path: the same numbers, probabilities kept
            y = explicit_attention(q, k, v, record)
        else:  # one new query against the cache sees every cached key: no mask
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1,
                                               dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, -1)  # the heads side by side: [Y_S, Y_N]
        return self.resid_dropout(y @ self.read_out())

    def read_out(self):
        """c·diag(η)·D: the tied dictionary, each atom weighted by its head's η_k (1 or −λ) and c, so
        [Y_S, Y_N] times it is c·(Y_S D_S − λ Y_N D_N) (exact). Cheaper than weighting Y in training;
        when generating one token it costs about as many products as the read-out's matmul."""
        return self.iso_energy * self.atom_weights()[:, None] * self.dictionary.weight

    def atom_weights(self):  # η_k repeated over head k's p atoms: 1 (signal), −λ (noise)
        half = self.n_head // 2 * self.head_dim
        return torch.cat((self.noise_weight.new_ones(half), -self.noise_weight.expand(half)))


def explicit_attention(q, k, v, record):
    """softmax_causal(q kᵀ/√p) v spelled out, so that the probabilities can be kept in `record`;
    equal to the fused kernel up to float rounding (tested)."""
    T, S = q.shape[-2], k.shape[-2]
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    future = torch.ones(T, S, dtype=torch.bool, device=q.device).triu(S - T + 1)
    attn = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
    record.append({"attn": attn, "q": q, "k": k})
    return attn @ v


# 7. The rest is nanoGPT's GPT-2: learned absolute positions added to the token embeddings (as
# well as RoPE), pre-LayerNorm residual blocks, a GELU MLP of width 4d, a final LayerNorm and the
# output layer tied to the token embedding.
def mlp_width(config):
    """The MLP's hidden width (any arch's config): mlp_hidden, or 4·n_embd."""
    return config.mlp_hidden or 4 * config.n_embd


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, mlp_width(config), bias=config.bias)
        self.proj = nn.Linear(mlp_width(config), config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """x ← x + attention(LN(x)); x ← x + mlp(LN(x)). The lab passes other attention classes."""

    def __init__(self, config, attention=PrismAttention, mlp=MLP):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = attention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = mlp(config)

    def forward(self, x, record=None, cache=None):
        z = self.ln_1(x)
        x = x + self.attn(z, record, cache)
        if record is not None:  # the attention appended this layer's record
            record[-1]["z"] = z  # the tokens Z this layer's step acts on
        return x + self.mlp(self.ln_2(x))


class KVCache:
    """One attention layer's (B, heads, T, p) tensors of the tokens seen so far, while generating."""

    def __init__(self):
        self.length, self.tensors = 0, None  # positions seen so far = the position of the next token

    def extend(self, *new):
        """Append the new positions, -> past + new. Several at once (the prompt) only when empty."""
        T = new[0].shape[-2]
        if self.tensors is not None:
            if T != 1:
                raise ValueError(f"{T} positions into a non-empty cache: one at a time")
            new = tuple(torch.cat((past, t), dim=-2) for past, t in zip(self.tensors, new))
        self.length += T
        self.tensors = new
        return new


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
    """What PRISM shares with the lab's models: embedding, blocks, final norm, tied output, the
    loss, generation with a KV cache, the optimizer and the FLOPs. A subclass calls `_build` and
    implements `embed(idx, start)`, the residual stream entering the first block."""

    arch = None  # the name train.py and the checkpoints use
    residual_outputs = ("proj.weight",)  # names of the layers that write into the residual stream

    def _build(self, config, blocks, final_norm, **extra_modules):
        self.config = config
        vocab = 64 * math.ceil(config.vocab_size / 64)  # padded: matmuls on multiples of 64 run faster
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, config.n_embd), **extra_modules,
            drop=nn.Dropout(config.dropout), h=nn.ModuleList(blocks), ln_f=final_norm))
        self.lm_head = nn.Linear(config.n_embd, vocab, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied input/output embeddings
        for module in self.modules():  # GPT-2's init
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        # GPT-2's residual scaling: the layers that write into the residual stream start smaller.
        for name, p in self.named_parameters():
            if name.endswith(self.residual_outputs):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def get_num_params(self):
        return sum(p.numel() for p in self.parameters())  # the tied output counted once

    def describe_parameters(self):
        """One line for the log: the arch and its parameter counts by part."""
        parts = dict(embedding=0, attention=0, mlp=0, norm=0)
        for name, p in self.named_parameters():
            parts["attention" if ".attn." in name else "mlp" if ".mlp." in name else "embedding"
                  if name.startswith(("transformer.wte", "transformer.wpe")) else "norm"] += p.numel()
        sizes = ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in parts.items())
        return f"{self.arch}: {self.get_num_params() / 1e6:.2f}M parameters ({sizes})"

    def set_progress(self, progress):
        """train.py calls it before every iteration with the fraction of the run done (PRISM: λ)."""

    def forward_hidden(self, idx, record=None, cache=None):
        """The final hidden states (B, T, d); `record` collects each layer's analysis; with
        `cache` (from new_cache(), generation only) idx continues the tokens it holds."""
        start = 0 if cache is None else cache[0].length
        if (length := start + idx.shape[1]) > self.config.block_size:
            raise ValueError(f"sequence of length {length} is longer than block_size = {self.config.block_size}")
        x = self.transformer.drop(self.embed(idx, start))
        for i, block in enumerate(self.transformer.h):
            x = block(x, record, None if cache is None else cache[i])
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None):
        """idx (B, T) -> logits (B, T, vocab_size), mean cross-entropy against targets (-1: ignored)."""
        return self._head(self.forward_hidden(idx), targets)

    def analyze(self, idx, targets=None):
        """(logits, loss, layers): forward()'s numbers, and per layer the attention
        probabilities `attn` (B, heads, T, T), the rotated `q`, `k` and the layer's input `z`."""
        record = []
        return *self._head(self.forward_hidden(idx, record), targets), record

    def _head(self, x, targets):
        logits = self.lm_head(x)  # (B, T, padded vocab)
        loss = None
        if targets is not None:
            with torch.no_grad():  # the padding columns out of the softmax (exact, gradient 0)
                logits[..., self.config.vocab_size:] = float("-inf")
            loss = F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=-1)
        return logits[..., :self.config.vocab_size], loss

    def new_cache(self):
        return [KVCache() for _ in self.transformer.h]

    @torch.no_grad()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                        use_cache=True):
        """Yield (B, 1) sampled tokens one at a time (temperature 0: greedy), the context cropped to
        block_size. With the cache only the newest token runs through the model: the same tokens,
        up to float rounding in near-ties."""
        cache = self.new_cache() if use_cache else None
        for _ in range(max_new_tokens):
            if cache is not None and idx.shape[1] > self.config.block_size:
                cache = None  # cropping moves every position: recompute, as without a cache
            window = idx[:, -self.config.block_size:] if cache is None else idx[:, cache[0].length:]
            hidden = self.forward_hidden(window, cache=cache)
            logits = self._head(hidden[:, -1:], None)[0][:, -1, :].float()
            if temperature == 0:
                next_token = logits.argmax(dim=-1, keepdim=True)
            else:
                probs = filter_logits(logits / temperature, top_k, top_p).softmax(dim=-1)
                next_token = torch.multinomial(probs, num_samples=1)
            idx = torch.cat((idx, next_token), dim=1)
            yield next_token

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True):
        """idx (B, T) -> (B, T + max_new_tokens): generate_stream's tokens appended."""
        new = self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, use_cache)
        return torch.cat([idx, *new], dim=1)

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW, weight decay on matrices and embeddings only; fused on CUDA."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        fused = True if device_type == "cuda" else None  # None: torch's default (foreach on CPU)
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)

    def flops_per_token(self):
        """Training FLOPs per token: 6 per weight (PaLM, app. B) + the attention's 12·L·H·p·T."""
        c = self.config
        return 6 * self.get_num_params() + 12 * c.n_layer * c.n_head * c.head_dim * c.block_size

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops):
        """Model FLOPs utilisation of `fwdbwd_per_iter` sequences in `dt` s; NaN without a peak."""
        return (math.nan if peak_flops is None else
                self.flops_per_token() * self.config.block_size * fwdbwd_per_iter / dt / peak_flops)


class Prism(LanguageModel):
    """The paper's model: GPT-2 with PrismAttention for its attention."""

    arch = "prism"
    rope_pairs = "interleaved"  # for analyze_heads.py: which coordinates each RoPE pair holds

    def __init__(self, config):
        super().__init__()
        self._build(config, [Block(config) for _ in range(config.n_layer)],
                    nn.LayerNorm(config.n_embd, bias=config.bias),
                    wpe=nn.Embedding(config.block_size, config.n_embd))
        for block in self.transformer.h:  # §3: the dictionary starts as a tight frame
            nn.init.orthogonal_(block.attn.dictionary.weight)

    def embed(self, idx, start=0):
        pos = torch.arange(start, start + idx.shape[1], device=idx.device)
        return self.transformer.wte(idx) + self.transformer.wpe(pos)

    def set_progress(self, progress):
        lam = noise_weight_at(progress, self.config.lambda_start, self.config.lambda_end)
        for block in self.transformer.h:
            block.attn.noise_weight.fill_(lam)

    def flops_per_token(self):
        """The shared count (the signal heads' matmuls), the noise heads' matmuls, and 6 per weight
        for the tied read-out's second use of each dictionary."""
        c = self.config
        return (super().flops_per_token() + 12 * c.n_layer * c.n_head * c.head_dim * c.block_size
                + 6 * sum(b.attn.dictionary.weight.numel() for b in self.transformer.h))

    # What analyze_heads.py asks of a model.
    def rope_frequencies(self, layer=0):
        return rope_frequencies(self.config)  # the same in every layer

    def head_groups(self):
        return ["signal"] * self.config.n_head + ["noise"] * self.config.n_head

    def subspaces(self, layer):
        return self.transformer.h[layer].attn.subspaces()


# 8. Architectures by name (a checkpoint names its model's). THE ONE HOOK from the tutorial into the
# lab: get_arch imports the `lab` package on the first name ARCHS lacks, and the lab registers its
# models (GPT-2, Gemma 3, our earlier reconstruction, ...) there. Without lab/ the tutorial runs alone.
ARCHS = {"prism": (PrismConfig, Prism)}
LAB_PACKAGE = "lab"


def get_arch(name):
    """(ConfigClass, ModelClass) for an architecture name."""
    if name not in ARCHS and importlib.util.find_spec(LAB_PACKAGE):  # a lab that fails to import says why
        importlib.import_module(LAB_PACKAGE)
    if name not in ARCHS:
        raise ValueError(f"unknown arch {name!r}; choose from {', '.join(ARCHS)}")
    return ARCHS[name]


def build_model(arch, **model_args):
    """A fresh model of `arch`; unknown or bad model_args raise ValueError naming the field."""
    config_cls, model_cls = get_arch(arch)
    if unknown := sorted(set(model_args) - {f.name for f in fields(config_cls)}):
        raise ValueError(f"{config_cls.__name__} has no field {unknown[0]!r}")
    return model_cls(config_cls(**model_args))
