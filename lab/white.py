"""
The white-box PRISM family: our reconstruction of PRISM (lab/reconstruction.py) with the changes that survived the
screen (lab/RESULTS.md, "Screening"), each a module of its own with its reading in MCR² terms.

  - normalised subspaces (normalize_subspaces): scores from RMS-normalised W_k;
  - the masked diagonal with a sink (mask_self): no token scores with itself;
  - rotated values (rotate_values): the values in the rotated frame of their keys;
  - the sparse-coding MLP (mlp = "ista"): one decoupled ISTA step in place of the GELU MLP;
  - its attribution controls (mlp = "gelu-bias", "relu-bias", "relu", "crate-alpha"): the GELU
    and ReLU MLPs with a hidden bias, the ReLU MLP without one, and CRATE-α's two-step block;
  - the gated sparse-coding MLP (mlp = "gated-ista"): support and values from encoders apart, and
    its controls without the threshold (mlp = "gated-relu", ReGLU; mlp = "geglu", Gemma 3's MLP).

prism-white is the first three together; prism-white-ista adds the fourth (the study's best
PRISM). Each piece says below whether it is exact, heuristic, or an empirical fix. The screen's
rejected candidates (a step or a temperature per head, a ρ-scaled init, the tied ISTA block) are
not here: lab/variants.py's RETIRED names the commit that ran them.
Notation as in model.py: tokens are rows, W_k = Z U_k ∈ R^{n×p}, w_t its row t.
"""

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
from torch.nn import functional as F

from lab.attention import apply_rotary, explicit_attention
from lab.reconstruction import Reconstruction, ReconstructionAttention, ReconstructionConfig
from model import MLP, mlp_width


@dataclass
class WhiteConfig(ReconstructionConfig):
    normalize_subspaces: bool = False  # scores from RMS-normalised W_k (learned gain)
    mask_self: bool = False            # no score with itself; a learned sink takes the spare mass
    rotate_values: bool = False        # values rotated like their keys, the output rotated back
    mlp: str = "gelu"                  # one of MLPS (white_mlp): "gelu" is model.MLP

    def __post_init__(self):
        super().__post_init__()
        if self.mlp not in MLPS:
            raise ValueError(f"WhiteConfig.mlp = {self.mlp!r} must be one of "
                             + ", ".join(repr(k) for k in MLPS))


# -----------------------------------------------------------------------------
# Attention: the reconstruction's step, q = k = v = W_k, with three changes.
#
# Normalised subspaces. Scores from q = k = R_t · (g ⊙ w_t / rms(w_t)), RMS norm over the p
# coordinates of a head with a learned gain g (as QK-norm); the value stays w_t. MCR² reading: MCR²
# codes features on the unit sphere (Yu et al. 2020); here the tokens' coordinates in each subspace
# are put on a sphere before they are compared. Heuristic: §2's G_k = W_k W_kᵀ is unnormalised.
# What it changes, exactly: ‖U_k‖ no longer sets the softmax's temperature (|score| ≤ √p·max g²),
# only the value's size.
#
# The masked diagonal, an empirical fix. With q = k, token t's score with itself is ‖w_t‖² (RoPE
# keeps norms), and w_tᵀ R_{s−t} w_s ≤ ‖w_t‖‖w_s‖ (Cauchy–Schwarz): the diagonal is the row's
# largest score against keys no longer than w_t, and only against those. Longer keys can beat it
# (for random directions in p = 32 with log-normal norms e^{σg}, σ = 1, T = 128, it is the row
# maximum in about 45% of rows; tests measure it). Masking it departs from §2, whose G_k has its
# diagonal, and is not derived from MCR²; the screen found it helps (−0.26 nats alone, at one
# seed), so it is kept as what it is. Masked, position 0 has no key at all, so every head gets a
# sink: a zero key and a zero value with a learned logit b, where attention can put mass that
# moves nothing.
#
# Rotated values. The reconstruction rotates q and k but not the value. If RoPE is read as rotating the
# tokens themselves (w̃_s = R_s w_s), §2's kept term on the rotated tokens mixes rotated values,
# Σ_s A_ts R_s w_s, which back in token t's frame (R_t⁻¹ = R_{−t}) is
#     y_t = Σ_s A_ts R_{s−t} w_s.
# Exact as the form of §2's term for the rotated tokens (with the softmax in place of βG_k, the
# same heuristic as the reconstruction's); it costs no weight.


class WhiteAttention(ReconstructionAttention):
    """ReconstructionAttention (dictionary U, decoupled back-projection, π-RoPE) with the three
    changes above, each off unless its WhiteConfig field is set."""

    def __init__(self, config):
        super().__init__(config)  # the same weights, in the same order, as the reconstruction
        self.rotate_values = config.rotate_values
        self.subspace_norm = (nn.RMSNorm(config.head_dim, eps=1e-6)
                              if config.normalize_subspaces else None)
        self.sink_logit = nn.Parameter(torch.zeros(config.n_head)) if config.mask_self else None

    def project(self, x):
        """(query, key, value) before RoPE, each (B, H, T, p): W_k = Z U_k three times."""
        B, T, _ = x.shape
        w = self.dictionary(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # W_k
        return w, w, w

    def forward(self, x, record=None, cache=None):
        B, T, _ = x.shape
        wq, wk, wv = self.project(x)
        start = 0 if cache is None else cache.length  # absolute position of x[:, 0]
        cos, sin = self.rope_cos[:, start:start + T], self.rope_sin[:, start:start + T]
        norm = self.subspace_norm or (lambda w: w)
        q = apply_rotary(norm(wq), cos, sin)
        k = q if wk is wq else apply_rotary(norm(wk), cos, sin)
        v = apply_rotary(wv, cos, sin) if self.rotate_values else wv  # v_s = R_s w_s
        if cache is not None:
            k, v = cache.extend(k, v)
        dropout = self.dropout if self.training else 0.0
        if self.sink_logit is None:
            if record is not None:
                y = explicit_attention(q, k, v, record)
            else:  # one new query sees every cached key: no mask
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=T > 1)
        elif record is not None or cache is not None:  # the sink as a key, the explicit bias
            zeros = q.new_zeros(B, self.n_head, 1, self.head_dim)
            k, v = torch.cat((zeros, k), dim=2), torch.cat((zeros, v), dim=2)
            mask = self_masked_bias(T, k.shape[-2] - 1, self.sink_logit, q.dtype)
            y = (explicit_attention(q, k, v, record, attn_mask=mask) if record is not None else
                 F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout))
        else:  # training: the same attention, as causal attention on shifted keys
            q, k, v = sink_behind_shifted_keys(q, k, v, self.sink_logit)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout,
                                               scale=self.head_dim ** -0.5)[..., :self.head_dim]
        if self.rotate_values:  # back to token t's frame: y_t = Σ_s A_ts R_{s−t} w_s
            y = apply_rotary(y, cos, -sin)
        return self.resid_dropout(self.back_projection(y.transpose(1, 2).reshape(B, T, -1)))


# The sink's attention in two exact forms: the explicit additive bias, which the analysis path and
# the generation cache use (any number of past positions), and plain causal attention over keys
# shifted behind the sink, which training uses (no (T, T) float mask: SDPA stays on its causal,
# fused kernels). Tests check that they agree, in the loss and in its gradient.


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
    b; the values' extra channels stay 0 and are cut from the output. One F.pad per tensor does
    the shift and the channels: on CUDA q, k and v get zero channels up to a multiple of 8, the
    width the fused (flash) kernels want; elsewhere the one channel b needs."""
    B, H, T, p = q.shape
    pad = 8 - p % 8 if q.is_cuda else 1
    channel_p = F.one_hot(torch.tensor(p, device=q.device), p + pad).to(q.dtype)  # e_p
    q = F.pad(q, (0, pad)) + channel_p
    sink_key = (sink_logit * math.sqrt(p)).to(q.dtype)[:, None, None] * channel_p  # (H, 1, p + pad)
    k = F.pad(k, (0, pad, 1, -1)) + F.pad(sink_key, (0, 0, 0, T - 1))
    v = F.pad(v, (0, pad, 1, -1))
    return q, k, v


# -----------------------------------------------------------------------------
# The sparse-coding MLP (mlp = "ista").
#
# ISTA, exact. The non-negative LASSO of a token z ∈ R^d against a dictionary D ∈ R^{d×m},
#     min_{a ≥ 0} ½‖z − D a‖² + λᵀa        (λᵀa = λ‖a‖₁ for a ≥ 0 and a constant λ),
# has the proximal-gradient step a ← ReLU(a + η Dᵀ(z − D a) − ηλ) (ista_step). With
# L = λ_max(DᵀD), each step satisfies F(a⁺) ≤ F(a) − (1/η − L/2)‖a⁺ − a‖², so η < 2/L suffices
# for the objective not to increase (η ≤ 1/L is the textbook choice, not the condition), and the
# sign of λ does not enter: λᵀa plus the constraint a ≥ 0 is convex for any λ, and its prox is the
# same ReLU. Above 2/L a step can increase it. Tests check all three statements.
#
# CRATE's MLP takes one such step from a = z with a complete d×d dictionary and outputs the code.
# CRATE-α's (UCSC-VLAA/CRATE-alpha) takes two steps from a = 0 with one overcomplete dictionary
# and a fixed η = λ = 0.1, then decodes the code with a separate matrix: its decoder is decoupled,
# its encoder is the dictionary.
#
# Ours, what it is. One step from a = 0 gives a = ReLU(ηDᵀz − ηλ); we learn an encoder D₁ ∈
# R^{m×d} in place of ηDᵀ and a threshold θ = ηλ per atom, and decode with D:
#     x ← x + D · ReLU(D₁ x − θ).
# That is a ReLU MLP without biases but with a learned threshold per hidden unit. With D₁ ≠ ηDᵀ it
# is an ISTA step of no LASSO in general, so the descent property above is a motivation, not a
# property of the trained block. (The GELU MLP it replaces has no biases either; the screen did
# not separate the sparse code from the hidden threshold.)


def ista_step(z, D, threshold, step, a=None):
    """One ISTA step of the non-negative LASSO: ReLU(a + η Dᵀ(z − D a) − ηλ), tokens as rows
    (z (…, d), D (d, m), threshold λ (m,), step η); a = 0 when not given."""
    grad = F.linear(z, D.t()) if a is None else F.linear(z - F.linear(a, D), D.t())
    a = 0 if a is None else a
    return F.relu(a + step * grad - step * threshold)


def lasso_objective(z, D, threshold, a):
    """½‖z − D a‖² + Σ λ_i a_i per token (a ≥ 0, so λ‖a‖₁ = Σ λ a_i)."""
    return 0.5 * (z - F.linear(a, D)).pow(2).sum(-1) + (a * threshold).sum(-1)


class SparseCodingMLP(nn.Module):
    """x ← D · ReLU(D₁ x − θ): the decoupled one-step ISTA block (above); m = mlp_width."""

    def __init__(self, config):
        super().__init__()
        width = mlp_width(config)
        self.proj = nn.Linear(width, config.n_embd, bias=False)     # the dictionary D (d × m)
        self.encoder = nn.Linear(config.n_embd, width, bias=False)  # D₁, in place of ηDᵀ
        self.threshold = nn.Parameter(torch.zeros(width))           # θ = ηλ, per atom
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.proj(F.relu(self.encoder(x) - self.threshold)))


# -----------------------------------------------------------------------------
# The attribution controls: which part of the "ista" block's gain is the sparse code?
#
# mlp = "gelu-bias": x ← W₂ GELU(W₁x + b), model.MLP with a learned hidden bias b (fc has a bias,
# proj none). It separates "a hidden bias" from "a sparse code" on the GELU side.
#
# mlp = "relu-bias": x ← W₂ ReLU(W₁x + b). Exactly the "ista" block's function class, with
# W₁ = D₁, b = −θ, W₂ = D: the same forward for copied weights. Training is the same too: b and θ
# are 1-D, so configure_optimizers decays neither, both start at 0, and AdamW's step is odd in the
# gradient (−g gives −m, the same v, the negated update), so b tracks −θ step for step (up to
# rounding; tests train both). W₁, W₂ start as D₁, D do (std 0.02, W₂ residual-scaled like D). So
# they are the same model up to the initialiser's draws: the same distributions, drawn in another
# order (SparseCodingMLP creates D before D₁, and nn.Linear's bias draws numbers at construction
# that θ does not, which shifts every later draw), so one seed starts them from different weights.
# Its arm measures the noise of the initialisation at a fixed seed and data order.
#
# mlp = "relu": x ← W₂ ReLU(W₁x), model.MLP with ReLU for GELU and no bias anywhere. Against
# "relu-bias" it prices the hidden threshold with the activation fixed; against prism-white's GELU
# MLP, the activation with no bias in either.
#
# mlp = "crate-alpha": CRATE-α's MLP (UCSC-VLAA/CRATE-alpha, OvercompleteISTABlock). Two ISTA steps
# of the non-negative LASSO above from a = 0, with one dictionary D ∈ R^{d×m} and fixed
# η = λ = 0.1 (not learned), then a decoder D₂ of its own, m → d:
#     a₁ = ReLU(η Dᵀx − ηλ),  a₂ = ReLU(a₁ + η Dᵀ(x − D a₁) − ηλ),  x ← x + D₂ a₂.
# a₁, a₂ are exact ISTA iterates of min_{a≥0} ½‖x − Da‖² + λ‖a‖₁ (ista_step twice; tests check it);
# each step does not increase it while η < 2/λ_max(DᵀD), which holds at init (λ_max ≈ 0.46 for
# d = 128, m = 512, std 0.02, so 2/L ≈ 4) but nothing keeps it in training. Decoding with D₂ in
# place of D (the LASSO's reconstruction) is CRATE-α's decoupling, a heuristic. Two d·m matrices,
# no 1-D parameter: the GELU MLP's count at the same width. D is used three times (Dᵀx, D a₁,
# Dᵀ(x − D a₁)), so it costs two d·m matmuls more than its weights say (flops_per_token). What
# differs from their code: the width m = mlp_width (theirs 4d), and the init, std 0.02 with D₂
# residual-scaled like every proj (theirs Kaiming-uniform).


class ActivationMLP(nn.Module):
    """x ← W₂ σ(W₁x + b): model.MLP's shape with activation σ and, if hidden_bias, a learned
    hidden bias b (fc has one, proj none)."""

    def __init__(self, config, activation, hidden_bias):
        super().__init__()
        width = mlp_width(config)
        self.fc = nn.Linear(config.n_embd, width, bias=hidden_bias)  # W₁, b
        self.proj = nn.Linear(width, config.n_embd, bias=False)      # W₂
        self.activation = activation
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.proj(self.activation(self.fc(x))))


class CrateAlphaMLP(nn.Module):
    """x ← D₂ a₂, a₂ two ISTA steps from 0 against one dictionary D, η = λ = 0.1 (above)."""

    step, threshold = 0.1, 0.1  # η, λ: fixed, as CRATE-α has them

    def __init__(self, config):
        super().__init__()
        width = mlp_width(config)
        self.dictionary = nn.Linear(width, config.n_embd, bias=False)  # D (d × m)
        self.proj = nn.Linear(width, config.n_embd, bias=False)        # D₂, the decoder
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        D, eta, lam = self.dictionary.weight, self.step, self.threshold
        a1 = F.relu(eta * F.linear(x, D.t()) - eta * lam)                            # a₁
        a2 = F.relu(a1 + eta * F.linear(x - F.linear(a1, D), D.t()) - eta * lam)     # a₂
        return self.dropout(self.proj(a2))


# -----------------------------------------------------------------------------
# The gated sparse-coding MLP (mlp = "gated-ista").
#
# One ISTA step from a = 0, a = ReLU(ηDᵀz − ηλ), does two jobs with one matrix: it picks the
# support S (the atoms with (ηDᵀz)_i > ηλ) and sets the code's value there ((ηDᵀz − ηλ)_i, shrunk
# by the threshold). The gated block gives each job an encoder of its own and decodes with D:
#     x ← D · (ReLU(E_s x − θ) ⊙ E_v x).
# The value, exact where the atoms of the support are orthonormal (D_SᵀD_S = I, which needs |S| ≤ d;
# the whole d × m dictionary, m > d, cannot be): on a fixed support S the least-squares code
# argmin_a ‖z − D_S a‖² is then (D_SᵀD_S)⁻¹D_Sᵀz = D_Sᵀz, one linear map of z restricted to S, with
# no shrinkage (the debiasing step of the relaxed LASSO, Meinshausen 2007); E_v learns that map.
# Where the support's atoms are coherent the least-squares map depends on S and one E_v is an
# approximation. The
# support, heuristic: ReLU(E_s x − θ) is a soft weight (zero off the support, growing with the
# margin over the threshold), not the 0/1 indicator of S, so the block is not an ISTA step or a
# relaxed-LASSO step of any LASSO. As an MLP it is ReGLU (Shazeer 2020) with a learned threshold on
# the gate; Gemma 3's GeGLU uses GELU and no threshold. Three d×m matrices: at equal parameters its
# width m is about ⅔ of the one-encoder block's, at the same FLOPs per parameter.
#
# Its two controls take the block apart: mlp = "gated-relu", x ← D · (ReLU(E_s x) ⊙ E_v x), is ReGLU,
# the same block without θ (against "gated-ista": what the threshold adds to the gating); mlp =
# "geglu", x ← D · (GELU(E_s x) ⊙ E_v x), is Gemma 3's MLP (lab/baselines.py's GeGLU, tanh GELU, no
# bias) in the white model (against "gated-relu": ReLU's exact zeros, the sparse support, against
# GELU's smooth gate).


class GatedMLP(nn.Module):
    """x ← D · (σ(E_s x − θ) ⊙ E_v x): support and values from encoders apart (above); θ a learned
    threshold per atom, or none."""

    def __init__(self, config, activation, threshold):
        super().__init__()
        width = mlp_width(config)
        self.proj = nn.Linear(width, config.n_embd, bias=False)         # the dictionary D
        self.support = nn.Linear(config.n_embd, width, bias=False)      # E_s
        self.value = nn.Linear(config.n_embd, width, bias=False)        # E_v
        self.threshold = nn.Parameter(torch.zeros(width)) if threshold else None  # θ, per atom
        self.activation = activation
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        gate = self.support(x)
        if self.threshold is not None:
            gate = gate - self.threshold
        return self.dropout(self.proj(self.activation(gate) * self.value(x)))


MLPS = {
    "gelu": MLP,
    "ista": SparseCodingMLP,
    "gelu-bias": lambda config: ActivationMLP(config, F.gelu, hidden_bias=True),
    "relu-bias": lambda config: ActivationMLP(config, F.relu, hidden_bias=True),
    "relu": lambda config: ActivationMLP(config, F.relu, hidden_bias=False),
    "crate-alpha": CrateAlphaMLP,
    "gated-ista": lambda config: GatedMLP(config, F.relu, threshold=True),
    "gated-relu": lambda config: GatedMLP(config, F.relu, threshold=False),
    "geglu": lambda config: GatedMLP(config, partial(F.gelu, approximate="tanh"), threshold=False),
}


def white_mlp(config):
    """The block's MLP for a WhiteConfig: MLPS[config.mlp]."""
    return MLPS[config.mlp](config)


class PrismWhite(Reconstruction):
    """The reconstruction with the white-box changes its WhiteConfig switches on (all off: the
    reconstruction, with the same parameters)."""

    arch = "prism-white"
    attention_class = WhiteAttention
    mlp_class = staticmethod(white_mlp)

    def flops_per_token(self):
        """The shared count, plus CRATE-α's two extra uses of D per layer: 6 · L · 2·d·m."""
        c = self.config
        extra = 6 * c.n_layer * 2 * c.n_embd * mlp_width(c) if c.mlp == "crate-alpha" else 0
        return super().flops_per_token() + extra
