"""The white-box candidates of issue 12 (PrismConfig fields, docs/PRISM.md §8): each keeps the
model causal, its analysis path equal to its fast path, and trains; the ISTA block decreases the
objective it unrolls; the masked diagonal is never attended."""
import math

import pytest
import torch

from model import PrismConfig, Prism, ista_step, lasso_objective

CANDIDATES = [
    {"head_step": True}, {"head_temperature": True}, {"normalize_subspaces": True},
    {"mask_self": True}, {"rotate_values": True}, {"rho_init": True}, {"mlp": "ista"},
    {"mlp": "ista-tied"},
    {"normalize_subspaces": True, "mask_self": True, "rotate_values": True},
    {"normalize_subspaces": True, "mask_self": True, "rotate_values": True, "mlp": "ista"},
    {"mask_self": True, "qkv_sharing": "qk"}, {"rotate_values": True, "qkv_sharing": "none"},
]


def tiny(**overrides):
    torch.manual_seed(0)
    return Prism(PrismConfig(**{**dict(vocab_size=97, block_size=24, n_layer=2, n_embd=32,
                                       n_head=4, head_dim=16), **overrides}))


def tokens(model, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (B, model.config.block_size), generator=g)


@pytest.mark.parametrize("overrides", CANDIDATES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_candidate_shapes_causality_and_analysis_path(overrides):
    model = tiny(**overrides)
    idx, targets = tokens(model), tokens(model, seed=1)
    logits, loss = model(idx, targets)
    assert logits.shape == (2, 24, 97) and math.isfinite(loss.item())
    logits2, loss2, layers = model.analyze(idx, targets)
    assert torch.allclose(logits, logits2, atol=1e-5) and abs(loss.item() - loss2.item()) < 1e-5
    assert layers[0]["attn"].shape == (2, 4, 24, 24)
    t = 13
    changed = idx.clone()
    changed[:, t] = (idx[:, t] + 1) % 97
    after = model(changed)[0]
    assert torch.equal(logits[:, :t], after[:, :t])        # nothing before t can see token t
    assert not torch.allclose(logits[:, t], after[:, t])


@pytest.mark.parametrize("overrides", CANDIDATES[:8], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_candidate_trains(overrides):
    model = tiny(**overrides)
    opt = model.configure_optimizers(0.0, 3e-3, (0.9, 0.95), "cpu")
    idx, targets = tokens(model, B=4), tokens(model, B=4, seed=1)
    first = None
    for _ in range(20):
        _, loss = model(idx, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first or loss.item()
    assert loss.item() < first - 0.5   # it learns the batch
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_masked_diagonal_is_never_attended_except_through_the_sink():
    model = tiny(mask_self=True)
    _, _, layers = model.analyze(tokens(model))
    for rec in layers:
        attn = rec["attn"]                                   # the real keys only
        assert attn.diagonal(dim1=-2, dim2=-1).abs().max() == 0
        assert attn.triu(diagonal=1).abs().max() == 0
        assert torch.allclose(attn[..., 0, :].sum(-1), torch.zeros(2, 4))  # position 0: all sink
        sink = 1 - attn.sum(-1)
        assert (sink[..., 1:] > 0).all() and (sink[..., 1:] < 1).all()


def test_training_path_of_the_masked_diagonal_is_the_masked_attention_exactly():
    """Training runs mask_self as causal attention over keys shifted behind the sink
    (model.sink_behind_shifted_keys); the analysis path spells out the masked scores and the sink's
    logit. With learned logits away from 0 (a wrong sign or scale of b shows) they agree, in the
    loss and in its gradient."""
    model = tiny(mask_self=True, head_temperature=True)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.sink_logit.copy_(torch.tensor([-2.0, -0.5, 1.0, 3.0]))
            block.attn.log_temperature.normal_(0, 0.3)
    idx, targets = tokens(model), tokens(model, seed=1)
    _, loss = model(idx, targets)
    grads = torch.autograd.grad(loss, [b.attn.sink_logit for b in model.transformer.h])
    _, loss2, _ = model.analyze(idx, targets)
    grads2 = torch.autograd.grad(loss2, [b.attn.sink_logit for b in model.transformer.h])
    assert abs(loss.item() - loss2.item()) < 1e-5
    assert all(torch.allclose(g, g2, atol=1e-5) and g.abs().max() > 0 for g, g2 in zip(grads, grads2))


def test_rotated_values_are_the_gradient_form_of_the_rotated_tokens():
    """y_t = Σ_s A_ts R_{s−t} w_s: rotating each value into the frame of its key and the output
    back into the query's frame. Checked against the sum written out rotation by rotation."""
    from model import apply_rotary

    model = tiny(rotate_values=True, n_layer=1)
    attn_mod = model.transformer.h[0].attn
    x = torch.randn(1, 24, 32, generator=torch.Generator().manual_seed(0))
    rec = []
    attn_mod(x, rec)
    w = attn_mod.dictionary(x).view(1, 24, 4, 16).transpose(1, 2)
    A = rec[0]["attn"]
    y = torch.zeros_like(w)
    freqs = model.rope_frequencies().to(torch.float64)
    for t in range(24):
        for s in range(t + 1):
            ang = ((s - t) * freqs).float()   # R_{s−t}: angle (s − t)·ω, (H, p/2)
            rot = apply_rotary(w[:, :, s:s + 1], ang.cos()[:, None], ang.sin()[:, None])
            y[:, :, t:t + 1] += A[:, :, t, s][..., None, None] * rot
    expected = attn_mod.back_projection(y.transpose(1, 2).reshape(1, 24, -1))
    assert torch.allclose(attn_mod(x), expected, atol=1e-5)


def test_one_ista_step_decreases_the_lasso_objective():
    g = torch.Generator().manual_seed(0)
    d, m = 16, 64
    D = torch.randn(d, m, generator=g, dtype=torch.float64) / math.sqrt(d)
    z = torch.randn(32, d, generator=g, dtype=torch.float64)
    lam = torch.full((m,), 0.1, dtype=torch.float64)
    eta = 1 / torch.linalg.eigvalsh(D.T @ D)[-1]           # η = 1/L: a valid ISTA step
    a0 = torch.zeros(32, m, dtype=torch.float64)
    a1 = ista_step(z, D, lam, eta)
    a2 = ista_step(z, D, lam, eta, a1)
    f0, f1, f2 = (lasso_objective(z, D, lam, a) for a in (a0, a1, a2))
    assert (f1 < f0).all() and (f2 <= f1 + 1e-12).all() and (a1 >= 0).all()
    # the step written out with matrices, tokens as columns: ReLU(η Dᵀz − ηλ)
    by_hand = torch.relu(eta * (D.T @ z.T) - eta * lam[:, None]).T
    assert torch.allclose(a1, by_hand)
    # the tied block is D·ReLU(η Dᵀz − ηλ) with its own dictionary, threshold and step
    block = tiny(mlp="ista-tied").transformer.h[0].mlp
    with torch.no_grad():
        block.threshold.uniform_(0, 0.01)
        block.step.fill_(0.7)
    x = torch.randn(5, 32, generator=g)
    Dt = block.proj.weight                                   # D, (d, m)
    expected = (Dt @ torch.relu(0.7 * (Dt.T @ x.T) - 0.7 * block.threshold[:, None])).T
    assert torch.allclose(block(x), expected, atol=1e-6)


def test_every_candidate_variant_is_matched_to_prism_at_every_preset():
    from lab.baselines import PRESETS, VARIANTS, count_params, variant_args

    candidates = [v for v, (_, o) in VARIANTS.items()
                  if {"head_step", "head_temperature", "normalize_subspaces", "mask_self",
                      "rotate_values", "rho_init", "mlp"} & o.keys()]
    assert len(candidates) >= 9
    for preset in PRESETS:
        prism = count_params(*variant_args(preset, "prism", 4097))
        for v in candidates:
            assert abs(count_params(*variant_args(preset, v, 4097)) / prism - 1) <= 0.05, (preset, v)
