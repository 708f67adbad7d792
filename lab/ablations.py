"""
Ablations of the author's PRISM (model.py) that need code: arch `prism-ablation`, the paper's
model with one of three pieces switched off. (The others are config values of model.py's PRISM:
λ = 0, λ fixed, λ = −1, π-RoPE off, one base for all heads, R = 1; lab/variants.py lists them.)
Each starts from the weights PRISM draws at the same seed and size (exact), with its one change.

  - position_embedding = False: no learned absolute positions; RoPE alone carries position, as in
    our reconstruction. MCR² reading: none either way; wpe adds a position vector to every token,
    so the dictionary's coordinates W_k mix what a token is with where it is.
  - tied_readout = False: the heads' outputs go back to R^d through a learned matrix B of D's
    shape, which starts equal to D (so the two models start as the same function, exact) and then
    trains on its own. MCR² reading: tied, head k's update lies in span(U_k), the subspace it read
    (model.py §5); untied it is CRATE's decoupled output projection, in span(B_k).
  - iso_energy = False: no factor c = 1/√(2HR) on the update. Not a reparametrisation (model.py
    §5: D's scale moves the scores too), so this is a different model, not a different start.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn

from model import Prism, PrismAttention, PrismConfig


@dataclass
class AblationConfig(PrismConfig):
    position_embedding: bool = True  # learned absolute positions added to the embeddings
    tied_readout: bool = True        # the read-out through D itself; False: a learned B
    iso_energy: bool = True          # the factor c = 1/√(2HR) on the update; False: c = 1


class AblationAttention(PrismAttention):
    def __init__(self, config):
        super().__init__(config)
        if not config.iso_energy:
            self.iso_energy = 1.0
        self.readout = (None if config.tied_readout else
                        nn.Parameter(self.dictionary.weight.detach().clone()))  # B, starts as D

    def read_out(self):
        if self.readout is None:
            return super().read_out()
        return self.iso_energy * self.atom_weights()[:, None] * self.readout


class PrismAblation(Prism):
    arch = "prism-ablation"

    def __init__(self, config):
        super().__init__(config)  # PRISM's weights at this seed; then the one change
        for block in self.transformer.h:
            attn = AblationAttention(config)
            with torch.no_grad():
                attn.dictionary.weight.copy_(block.attn.dictionary.weight)
                if attn.readout is not None:
                    attn.readout.copy_(block.attn.dictionary.weight)
            block.attn = attn
        if not config.position_embedding:
            del self.transformer.wpe

    def flops_per_token(self):
        """PRISM's count, less the tied read-out's second use of D where B reads out instead."""
        tied = 6 * sum(b.attn.dictionary.weight.numel() for b in self.transformer.h)
        return super().flops_per_token() - (0 if self.config.tied_readout else tied)

    def embed(self, idx, start=0):
        if self.config.position_embedding:
            return super().embed(idx, start)
        return self.transformer.wte(idx)
