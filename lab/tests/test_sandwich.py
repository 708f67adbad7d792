"""prism-white in Gemma 3's normalisation (lab/sandwich.py): causal, its analysis path equal to
its fast path, it trains; a post-normed step's output does not depend on the size of the step's
increment (lab/sandwich.py's exact statement); the embedding scale is √d; the variant stays at its
family base's parameters (our reconstruction's, within ±5% of the author's PRISM) and within RoPE
attention's FLOPs per token."""
import math

import pytest
import torch

from lab.sandwich import PrismWhiteSandwich, SandwichConfig
from lab.variants import model_size, variant_args

SIZES = dict(vocab_size=97, block_size=24, n_layer=2, n_embd=32, n_head=4, head_dim=8,
             normalize_subspaces=True, mask_self=True, rotate_values=True, mlp="ista")


def tiny(**overrides):
    torch.manual_seed(0)
    return PrismWhiteSandwich(SandwichConfig(**{**SIZES, **overrides}))


def tokens(B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 97, (B, 24), generator=g)


def test_causal_and_the_analysis_path_is_the_fast_path():
    model = tiny()
    idx, targets = tokens(), tokens(seed=1)
    logits, loss = model(idx, targets)
    logits2, loss2, layers = model.analyze(idx, targets)
    assert torch.allclose(logits, logits2, atol=1e-5) and abs(loss.item() - loss2.item()) < 1e-5
    assert len(layers) == 2 and "z" in layers[0]
    changed = idx.clone()
    changed[:, 13] = (idx[:, 13] + 1) % 97
    after = model(changed)[0]
    assert torch.equal(logits[:, :13], after[:, :13])
    assert not torch.allclose(logits[:, 13], after[:, 13])


def test_a_post_normed_step_does_not_depend_on_the_size_of_its_increment():
    """x + N′(c·Δ) = x + N′(Δ) for c > 0 while mean(Δ²) ≫ the norm's ε: scaling the layers that
    write Δ (back-projection, the MLP's decoder) by 10 or 0.1 changes no logit, with ε = 1e-12.
    (At this model's init mean(Δ²) is 1e-5 to 1e-4, so the default ε = 1e-6 still shaves a few
    per cent.) Without the post-norms it would."""
    def with_tiny_eps(model):
        for module in model.modules():
            if isinstance(module, torch.nn.RMSNorm):
                module.eps = 1e-12
        return model

    model, idx = with_tiny_eps(tiny()), tokens()
    before = model(idx)[0]
    for c in (10.0, 0.1):
        scaled = with_tiny_eps(tiny())
        with torch.no_grad():
            for block in scaled.transformer.h:
                block.attn.back_projection.weight.mul_(c)
                block.mlp.proj.weight.mul_(c)
        assert torch.allclose(scaled(idx)[0], before, atol=1e-4)
    with torch.no_grad():  # the control: without the post-norms the same scaling moves them
        plain = with_tiny_eps(tiny(post_norm=False))
        assert isinstance(plain.transformer.h[0].post_attn_norm, torch.nn.Identity)
        reference = plain(idx)[0]
        for block in plain.transformer.h:
            block.attn.back_projection.weight.mul_(10.0)
        assert not torch.allclose(plain(idx)[0], reference, atol=1e-2)


def test_the_embedding_enters_scaled_by_sqrt_d():
    model, idx = tiny(), tokens()
    assert torch.allclose(model.embed(idx), model.transformer.wte(idx) * math.sqrt(32))
    assert torch.equal(tiny(embed_scale=False).embed(idx), model.transformer.wte(idx))


def test_the_embedding_scale_is_a_reparametrisation():
    """Embeddings and post-norm gains ×c, the final-norm gain ÷c: the same logits (ε → 0), so the
    √d scale changes where training starts and how AdamW moves it, not what the model can be."""
    idx = tokens()

    def logits(c, post_gains):
        model = tiny(embed_scale=False)
        for module in model.modules():
            if isinstance(module, torch.nn.RMSNorm):
                module.eps = 1e-12
        with torch.no_grad():
            model.transformer.wte.weight.mul_(c)
            for block in model.transformer.h:
                block.post_attn_norm.weight.mul_(post_gains)
                block.post_mlp_norm.weight.mul_(post_gains)
            model.transformer.ln_f.weight.div_(c)
        return model(idx)[0]

    assert torch.allclose(logits(1.0, 1.0), logits(5.0, 5.0), atol=1e-4)
    assert not torch.allclose(logits(1.0, 1.0), logits(5.0, 1.0), atol=1e-2)  # gains kept: not


def test_it_trains():
    model = tiny()
    opt = model.configure_optimizers(0.0, 1e-2, (0.9, 0.95), "cpu")
    idx, targets = tokens(B=4), tokens(B=4, seed=1)
    for step in range(20):
        _, loss = model(idx, targets)
        first = loss.item() if step == 0 else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 0.5
    assert all(p.grad is not None for p in model.parameters())


def test_the_variant_is_at_prisms_size_and_within_rope_attentions_flops():
    params, flops = model_size(*variant_args("cpu-small", "prism-white-sandwich", 4097))
    recon_params, _ = model_size(*variant_args("cpu-small", "recon", 4097))
    prism_params, _ = model_size(*variant_args("cpu-small", "prism", 4097))
    _, rope_flops = model_size(*variant_args("cpu-small", "rope-attention", 4097))
    assert abs(params / recon_params - 1) < 0.002  # sized against its family's base
    assert abs(params / prism_params - 1) < 0.05 and flops <= rope_flops


@pytest.mark.parametrize("overrides", [{"mlp": "gated-ista"}, {"mlp": "gated-relu"}, {"mlp": "geglu"},
                                       {"shared_qkv": False}, {"shared_value": False}])
def test_the_candidates_are_causal_and_their_analysis_path_is_their_fast_path(overrides):
    model, idx = tiny(**overrides), tokens()
    logits, loss = model(idx, idx)
    logits2, loss2, _ = model.analyze(idx, idx)
    assert torch.allclose(logits, logits2, atol=1e-5)
    changed = idx.clone()
    changed[:, 13] = (idx[:, 13] + 1) % 97
    assert torch.equal(model(changed)[0][:, :13], logits[:, :13])


def test_the_qkv_control_has_three_projections_and_only_that():
    """q, k, v from three d × H·p matrices; with all three set to the shared model's dictionary it
    is the shared model, logit for logit."""
    shared, apart = tiny(), tiny(shared_qkv=False)
    assert apart.get_num_params() == shared.get_num_params() + 2 * 2 * 32 * 32  # 2 layers
    x = torch.randn(2, 5, 32)
    q, k, v = apart.transformer.h[0].attn.project(x)
    assert q.shape == k.shape == v.shape == (2, 4, 5, 8) and not torch.allclose(q, k)
    state = shared.state_dict()
    for key, value in list(state.items()):
        if key.endswith("attn.dictionary.weight"):
            state[key] = value.repeat(3, 1)
    apart.load_state_dict(state)
    idx = tokens()
    assert torch.allclose(apart(idx)[0], shared(idx)[0], atol=1e-5)


def test_the_value_control_has_q_equal_k_and_a_value_apart_and_only_that():
    """q = k = W_k, v from a d × H·p matrix of its own; set to the dictionary it is the shared
    model, logit for logit. Both controls at once is refused."""
    shared, apart = tiny(), tiny(shared_value=False)
    assert apart.get_num_params() == shared.get_num_params() + 2 * 32 * 32  # 2 layers
    x = torch.randn(2, 5, 32)
    q, k, v = apart.transformer.h[0].attn.project(x)
    assert q is k and v.shape == q.shape == (2, 4, 5, 8) and not torch.allclose(q, v)
    state = shared.state_dict()
    for key, value in list(state.items()):
        if key.endswith("attn.dictionary.weight"):
            state[key.replace("dictionary", "value")] = value
    apart.load_state_dict(state)
    idx = tokens()
    assert torch.allclose(apart(idx)[0], shared(idx)[0], atol=1e-5)
    with pytest.raises(ValueError, match="shared_value"):
        tiny(shared_qkv=False, shared_value=False)


def test_the_gated_block_is_its_formula():
    block = tiny(mlp="gated-ista").transformer.h[0].mlp
    with torch.no_grad():
        block.threshold.uniform_(-0.05, 0.05)
    x = torch.randn(3, 32)
    expected = block.proj.weight @ (torch.relu(block.support.weight @ x.T - block.threshold[:, None])
                                    * (block.value.weight @ x.T))
    assert torch.allclose(block(x), expected.T, atol=1e-6)
    # three d × m matrices and one threshold per atom
    m = block.threshold.shape[0]
    assert sum(p.numel() for p in block.parameters()) == 3 * 32 * m + m


@pytest.mark.parametrize("mlp, activation", [
    ("gated-relu", torch.relu),
    ("geglu", lambda u: 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3))))])
def test_the_gated_blocks_controls_are_their_formulas(mlp, activation):
    """No threshold: ReGLU, and GeGLU with the tanh GELU written out (Gemma 3's MLP)."""
    block = tiny(mlp=mlp).transformer.h[0].mlp
    x = torch.randn(3, 32)
    expected = block.proj.weight @ (activation(block.support.weight @ x.T)
                                    * (block.value.weight @ x.T))
    assert torch.allclose(block(x), expected.T, atol=1e-6)
    m = block.proj.weight.shape[1]
    assert sum(p.numel() for p in block.parameters()) == 3 * 32 * m


def test_on_a_fixed_support_the_least_squares_code_is_linear_for_an_orthonormal_dictionary():
    """lab/white.py's reading of the gated block's value: for an orthonormal D the least-squares
    code on a support S is D_Sᵀz, one linear map restricted to S; for a coherent D it is not."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(16, generator=g, dtype=torch.float64)
    support = torch.tensor([0, 3, 5, 6])
    orthonormal = torch.linalg.qr(torch.randn(16, 8, generator=g, dtype=torch.float64))[0]
    coherent = orthonormal + 0.3 * torch.randn(16, 8, generator=g, dtype=torch.float64)
    for D, linear in ((orthonormal, True), (coherent, False)):
        D_S = D[:, support]
        least_squares = torch.linalg.lstsq(D_S, z[:, None]).solution[:, 0]
        assert torch.allclose(least_squares, D_S.T @ z) == linear


@pytest.mark.parametrize("variant", ["prism-white-sandwich-qkv", "prism-white-sandwich-gated",
                                     "prism-white-sandwich-gated-relu", "prism-white-sandwich-geglu",
                                     "prism-white-sandwich-qk", "prism-white-sandwich-gated-qk"])
def test_the_candidates_are_at_prisms_size_and_within_rope_attentions_flops(variant):
    params, flops = model_size(*variant_args("cpu-small", variant, 4097))
    recon_params, _ = model_size(*variant_args("cpu-small", "recon", 4097))
    prism_params, _ = model_size(*variant_args("cpu-small", "prism", 4097))
    _, rope_flops = model_size(*variant_args("cpu-small", "rope-attention", 4097))
    assert abs(params / recon_params - 1) < 0.002 and flops <= rope_flops  # one MLP width step
    assert abs(params / prism_params - 1) < 0.05

