"""The generation cache (model.KVCache): the same logits and tokens as recomputing the whole
context, for PRISM, past block_size. (The lab's models have their cache tests in lab/tests.)"""
import pytest
import torch

from model import KVCache, build_model

SIZES = dict(vocab_size=97, block_size=24, n_layer=2, n_embd=32)
MODELS = {
    "prism": ("prism", dict(n_head=2)),
    # R = 1, λ at its end value, one RoPE base for both streams
    "prism-complete-pi-off": ("prism", dict(n_head=2, expansion=1, lambda_start=0.1,
                                            signal_base=1e4, noise_base=1e4)),
}


def make(name, seed=0):
    arch, args = MODELS[name]
    torch.manual_seed(seed)
    model = build_model(arch, **SIZES, **args).eval()
    with torch.no_grad():  # larger weights than the init: logits far apart, no near-ties
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    return model


def prompt(B=2, T=3):
    return torch.randint(0, SIZES["vocab_size"], (B, T), generator=torch.Generator().manual_seed(3))


def check_cached_logits_equal_the_full_forward(model):
    """Prompt, then one token at a time through the cache: the logits of the full forward.
    lab/tests/test_lab_cache.py runs the same checks on the lab's archs."""
    tokens = torch.randint(0, model.config.vocab_size, (2, model.config.block_size),
                           generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, _ = model(tokens)
        cache = model.new_cache()
        steps = [model._head(model.forward_hidden(tokens[:, :4], cache=cache), None)[0]]
        for t in range(4, tokens.shape[1]):  # then one token at a time
            steps.append(model._head(model.forward_hidden(tokens[:, t:t + 1], cache=cache),
                                     None)[0])
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="longer than block_size"):
        model.forward_hidden(tokens[:, :1], cache=cache)


def check_generation_with_and_without_cache(model):
    """Greedy and sampled tokens are the same with and without the cache, past block_size."""
    new = 40  # 3 + 40 tokens: past block_size = 24, where the cached path falls back
    greedy = [model.generate(prompt(), new, temperature=0, use_cache=c) for c in (True, False)]
    assert torch.equal(greedy[0], greedy[1])
    sampled = []
    for use_cache in (True, False):
        torch.manual_seed(5)
        sampled.append(model.generate(prompt(), new, temperature=1.0, top_k=50, top_p=0.95,
                                      use_cache=use_cache))
    assert torch.equal(sampled[0], sampled[1])
    assert not torch.equal(sampled[0], greedy[0])  # the sampled run did sample


@pytest.mark.parametrize("name", MODELS)
def test_cached_logits_equal_the_full_forward(name):
    check_cached_logits_equal_the_full_forward(make(name))


@pytest.mark.parametrize("name", MODELS)
def test_greedy_and_sampled_tokens_are_the_same_with_and_without_cache(name):
    check_generation_with_and_without_cache(make(name))


def test_the_prism_cache_holds_the_rotated_key_and_w():
    # PRISM with q = k = v keeps the rotated key and W itself, the value
    prism = make("prism")
    cache = prism.new_cache()
    assert len(cache) == 2
    with torch.no_grad():
        prism.forward_hidden(prompt(T=3), cache=cache)
        for _ in range(5):
            prism.forward_hidden(prompt(T=1), cache=cache)
    assert cache[0].length == 8 and cache[0].tensors[0].shape[-2] == 8  # no window: all kept
    cache = prism.new_cache()
    with torch.no_grad():
        prism.forward_hidden(prompt(T=3), cache=cache)
    key, value = cache[0].tensors
    attn = prism.transformer.h[0].attn
    w = attn.dictionary(prism.transformer.h[0].ln_1(prism.embed(prompt(T=3))))
    torch.testing.assert_close(value, w.view(2, 3, 4, 32).transpose(1, 2))  # 2 + 2 heads of p = 32
    assert not torch.allclose(key[:, :, 1:], value[:, :, 1:])  # rotated from position 1 on


def test_several_positions_into_a_filled_cache_are_refused():
    cache = KVCache()
    cache.extend(torch.zeros(1, 2, 3, 4))
    with pytest.raises(ValueError, match="one at a time"):
        cache.extend(torch.zeros(1, 2, 2, 4))


def test_each_new_token_runs_one_position_until_the_context_is_full():
    model = make("prism")
    positions = []
    model.transformer.wte.register_forward_hook(
        lambda module, args, out: positions.append(args[0].shape[1]))
    model.generate(prompt(T=3), 30, temperature=0)
    # the prompt, then one position per token up to block_size = 24, then the cropped window
    assert positions == [3] + [1] * 21 + [24] * 8
    positions.clear()
    model.generate(prompt(T=3), 30, temperature=0, use_cache=False)
    assert positions == list(range(3, 25)) + [24] * 8
