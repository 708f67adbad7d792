"""The generation cache (model.KVCache) on the lab's archs: the same logits and tokens as
recomputing the whole context, for the baselines, plain RoPE attention and the white-box PRISMs
(the sink with a cache, rotated values, normalised subspaces, the ISTA MLP), past block_size and
across Gemma's sliding window."""
import pytest
import torch

from lab.attention import WindowedKVCache
from model import build_model
from tests.test_cache import (SIZES, check_cached_logits_equal_the_full_forward,
                              check_generation_with_and_without_cache, prompt)

MODELS = {
    # our reconstruction, and the author's PRISM with its read-out untied and without wpe
    "recon": ("recon", dict(n_head=4, head_dim=16, bias=True, rope_ratio=1.0)),
    "prism-untied-no-wpe": ("prism-ablation", dict(n_head=2, tied_readout=False,
                                                   position_embedding=False, iso_energy=False)),
    "prism-white": ("prism-white", dict(n_head=4, head_dim=16, normalize_subspaces=True,
                                        mask_self=True, rotate_values=True)),
    # the sink alone: its explicit bias with cached keys, queries one position at a time
    "recon-no-self": ("prism-white", dict(n_head=4, head_dim=16, mask_self=True)),
    "recon-rotated-values": ("prism-white", dict(n_head=4, head_dim=16, rotate_values=True)),
    "prism-white-ista": ("prism-white", dict(n_head=4, head_dim=16, normalize_subspaces=True,
                                             mask_self=True, rotate_values=True, mlp="ista")),
    # the sandwich model with its gated MLP, its controls with q, k, v apart and with v apart
    "prism-white-sandwich-gated": ("prism-white-sandwich", dict(
        n_head=4, head_dim=16, normalize_subspaces=True, mask_self=True, rotate_values=True,
        mlp="gated-ista")),
    "prism-white-sandwich-qkv": ("prism-white-sandwich", dict(
        n_head=4, head_dim=16, normalize_subspaces=True, mask_self=True, rotate_values=True,
        mlp="ista", shared_qkv=False)),
    "prism-white-sandwich-qk": ("prism-white-sandwich", dict(
        n_head=4, head_dim=16, normalize_subspaces=True, mask_self=True, rotate_values=True,
        mlp="geglu", shared_value=False)),
    "rope-attention": ("rope-attention", dict(n_head=4, head_dim=8)),
    "gpt2": ("gpt2", dict(n_head=4)),
    # layer 0 local with a 5-token window, layer 1 global: 40 tokens cross the window many times
    "gemma3": ("gemma3", dict(n_head=4, head_dim=8, mlp_hidden=48, sliding_window=5,
                              global_every=2)),
}


def make(name, seed=0):
    arch, args = MODELS[name]
    torch.manual_seed(seed)
    model = build_model(arch, **SIZES, **args).eval()
    with torch.no_grad():  # larger weights than the init: logits far apart, no near-ties
        for pname, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(8)
            elif pname.endswith("sink_logit"):
                p.copy_(torch.tensor([-2.0, -0.5, 1.0, 3.0]))
    return model


@pytest.mark.parametrize("name", MODELS)
def test_cached_logits_equal_the_full_forward(name):
    check_cached_logits_equal_the_full_forward(make(name))


@pytest.mark.parametrize("name", MODELS)
def test_greedy_and_sampled_tokens_are_the_same_with_and_without_cache(name):
    check_generation_with_and_without_cache(make(name))


def test_a_windowed_cache_keeps_only_what_the_layer_can_still_see():
    cache = WindowedKVCache(window=5)
    cache.extend(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
    for t in range(10):
        seen, _ = cache.extend(torch.full((1, 2, 1, 4), float(t)), torch.zeros(1, 2, 1, 4))
        assert seen.shape[-2] == min(3 + t + 1, 5)  # the new token sees at most the window
    assert cache.length == 13
    assert cache.tensors[0].shape[-2] == 4  # the window of 5 = 4 kept + the next token
    assert cache.tensors[0][0, 0, :, 0].tolist() == [6.0, 7.0, 8.0, 9.0]


def test_a_local_layers_cache_holds_only_its_window():
    model = make("gemma3")
    cache = model.new_cache()
    with torch.no_grad():
        model.forward_hidden(prompt(T=3), cache=cache)
        for _ in range(10):
            model.forward_hidden(prompt(T=1), cache=cache)
    local, global_ = cache
    assert local.length == global_.length == 13
    assert local.tensors[0].shape[-2] == 4  # the window of 5 = 4 kept + the next token
    assert global_.tensors[0].shape[-2] == 13


def test_the_white_cache_keeps_the_rotated_key_and_the_rotated_value():
    # with rotate_values the value is R_s w_s, the key R_s w_s normalised: two tensors, neither W
    model = make("prism-white")
    cache = model.new_cache()
    with torch.no_grad():
        model.forward_hidden(prompt(T=3), cache=cache)
    key, value = cache[0].tensors
    attn = model.transformer.h[0].attn
    w = attn.dictionary(model.transformer.h[0].ln_1(model.embed(prompt(T=3))))
    w = w.view(2, 3, 4, 16).transpose(1, 2)
    torch.testing.assert_close(value[:, :, 0], w[:, :, 0])  # position 0: no rotation
    torch.testing.assert_close(value.norm(dim=-1), w.norm(dim=-1))  # rotations keep norms
    assert not torch.allclose(value[:, :, 1:], w[:, :, 1:])
    # at its initial gain of 1 the RMS norm commutes with R_s
    torch.testing.assert_close(key, attn.subspace_norm(value))
