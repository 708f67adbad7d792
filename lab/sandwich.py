"""
The white-box PRISM with Gemma 3's normalisation (lab/baselines.py): RMSNorm before and after
each step (sandwich norms) and token embeddings scaled by √d. lab/white.py's attention and MLP are
unchanged; only what carries the tokens between the steps is.

What each piece is, in MCR² terms (notation as in model.py and lab/white.py; rms(x) is the root
mean square of a token's d coordinates):

  - RMSNorm before a step, N(x) = g ⊙ x / rms(x), in place of LayerNorm. Both put every token on a
    sphere of radius √d before the step compares tokens (MCR² codes features on the unit sphere,
    Yu et al. 2020), up to the learned gain g; LayerNorm also removes each token's mean
    coordinate, RMSNorm does not. Heuristic: which sphere is not derived.
  - RMSNorm after a step, x ← x + N′(Δ(N(x))) = x + g′ ⊙ Δ/rms(Δ): the increment is normalised to
    rms 1 and scaled per coordinate by a learned gain g′, whatever ‖Δ‖ was. It keeps Δ's direction
    only while g′ is uniform, as at initialisation (g′ = 1); a learned, non-uniform g′ turns it.
    Read as an unrolled optimiser, the block takes a normalised step (the MCR² step's direction up
    to a learned per-coordinate scaling) where the pre-norm block takes the raw one. Exact as a
    statement about the block while mean(Δ²) ≫ the norm's ε = 1e-6: the output does not depend
    on Δ's scale (tested; small increments, as at init, keep some of it). That a normalised step
    optimises the coding rate better is not derived; it is what the screen asks.
  - The √d embedding scale: the token embedding (std 0.02) times √d starts the residual stream at
    rms ≈ 0.02·√d, as Gemma 3 does, beside post-normed increments of rms ≈ 1 (gains at 1). No new
    function, up to the norms' ε: embeddings and post-norm gains c times larger and a final-norm
    gain c times smaller give the same logits (the pre-norms do not see the stream's scale, the
    tied output layer sees c·W_e; tested). What it changes is optimisation: AdamW moves each
    weight by about the learning rate whatever its scale, so the scale sets how fast the
    embedding moves relative to its size. No MCR² reading; it is Gemma 3's recipe.

One control is not white-box: shared_qkv = False gives the query, the key and the value
projections of their own (three d × H·p matrices for the one dictionary U; the normalised scores,
the masked diagonal with its sink and the rotated values stay). It prices q = k = v, the
constraint MSSA's derivation imposes, inside this model at PRISM's parameters (the MLP narrows to
pay for the two extra matrices; FLOPs per token stay within 0.1%). A second control splits that
price: shared_value = False keeps q = k = W_k and gives the value a projection of its own (one
extra matrix), so the cost of q = k = v divides into the part a separate value recovers and the
part that is the symmetric score q = k.
"""

import math
from dataclasses import dataclass

import torch.nn as nn

from lab.white import PrismWhite, WhiteAttention, WhiteConfig
from model import LanguageModel


@dataclass
class SandwichConfig(WhiteConfig):
    embed_scale: bool = True  # token embeddings × √d, as Gemma 3's
    post_norm: bool = True    # an RMSNorm after each step too; False: pre-norm RMSNorm blocks
    shared_qkv: bool = True   # q = k = v = W_k; False: the control with three projections apart
    shared_value: bool = True  # False: the control with q = k = W_k and the value apart

    def __post_init__(self):
        super().__post_init__()
        if not (self.shared_qkv or self.shared_value):
            raise ValueError("shared_value = False is the control with q = k; with shared_qkv = "
                             "False the value is apart already")


class SeparateQKVAttention(WhiteAttention):
    """WhiteAttention with query, key and value from projections apart (the control above)."""

    def __init__(self, config):
        super().__init__(config)
        inner = config.n_head * config.head_dim
        self.dictionary = nn.Linear(config.n_embd, 3 * inner, bias=config.bias)  # [W_q; W_k; W_v]

    def subspaces(self):
        return None  # no one dictionary: the MCR² diagnostics do not apply

    def project(self, x):
        B, T, _ = x.shape
        qkv = self.dictionary(x).view(B, T, 3 * self.n_head, self.head_dim).transpose(1, 2)
        return qkv.split(self.n_head, dim=1)


class SeparateValueAttention(WhiteAttention):
    """WhiteAttention with q = k = W_k and the value from a projection apart (the control above)."""

    def __init__(self, config):
        super().__init__(config)
        self.value = nn.Linear(config.n_embd, config.n_head * config.head_dim, bias=config.bias)

    def project(self, x):  # subspaces() stays the dictionary's: q = k are its coordinates
        B, T, _ = x.shape
        w = super().project(x)[0]
        return w, w, self.value(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)


class SandwichBlock(nn.Module):
    """x ← x + N(attention(N(x))); x ← x + N(mlp(N(x))), each N an RMSNorm of its own (the
    post-norms the identity without config.post_norm)."""

    def __init__(self, config, attention, mlp):
        super().__init__()
        d = config.n_embd

        def post_norm():
            return nn.RMSNorm(d, eps=1e-6) if config.post_norm else nn.Identity()

        self.ln_1, self.attn, self.post_attn_norm = nn.RMSNorm(d, eps=1e-6), attention(config), \
            post_norm()
        self.ln_2, self.mlp, self.post_mlp_norm = nn.RMSNorm(d, eps=1e-6), mlp(config), \
            post_norm()

    def forward(self, x, record=None, cache=None):
        z = self.ln_1(x)
        if record is not None:
            before = len(record)
            x = x + self.post_attn_norm(self.attn(z, record))
            record[before]["z"] = z  # the tokens Z this layer's MCR² step acts on
        else:
            x = x + self.post_attn_norm(self.attn(z, cache=cache))
        return x + self.post_mlp_norm(self.mlp(self.ln_2(x)))


class PrismWhiteSandwich(PrismWhite):
    """prism-white (its attention and MLP from the SandwichConfig's switches) in sandwich-normed
    blocks, with an RMSNorm before the output layer and, if embed_scale, √d-scaled embeddings."""

    arch = "prism-white-sandwich"

    def __init__(self, config):
        LanguageModel.__init__(self)  # Reconstruction.__init__ builds pre-norm LayerNorm blocks: not those
        attention = (SeparateQKVAttention if not config.shared_qkv else
                     SeparateValueAttention if not config.shared_value else self.attention_class)
        blocks = [SandwichBlock(config, attention, self.mlp_class)
                  for _ in range(config.n_layer)]
        self._build(config, blocks, nn.RMSNorm(config.n_embd, eps=1e-6))

    def embed(self, idx, start=0):
        x = self.transformer.wte(idx)
        return x * math.sqrt(self.config.n_embd) if self.config.embed_scale else x
