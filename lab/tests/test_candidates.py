"""The white-box family on our reconstruction of PRISM (lab/white.py): each change keeps the
model causal, its analysis path equal to its fast path, and trains; the sink's two forms agree; the
rotated values are the gradient form they claim; ISTA's descent condition is η < 2/L for any λ; the
masked diagonal is never attended; with every change off it is the reconstruction
(lab/reconstruction.py). The ISTA block's attribution controls are what lab/white.py says:
relu-bias is the ista block's model, CRATE-α's block is two ISTA steps and its FLOPs count D's
extra uses."""
import math

import pytest
import torch

from torch.nn import functional as F

from lab.attention import apply_rotary
from lab.reconstruction import Reconstruction, ReconstructionConfig
from model import mlp_width
from lab.white import PrismWhite, WhiteConfig, ista_step, lasso_objective

WHITE = {"normalize_subspaces": True, "mask_self": True, "rotate_values": True}
MLP_CONTROLS = [{**WHITE, "mlp": m} for m in ("gelu-bias", "relu-bias", "crate-alpha")]
CANDIDATES = [
    {"normalize_subspaces": True}, {"mask_self": True}, {"rotate_values": True}, {"mlp": "ista"},
    {"normalize_subspaces": True, "mask_self": True, "rotate_values": True},
    {"normalize_subspaces": True, "mask_self": True, "rotate_values": True, "mlp": "ista"},
    {"mask_self": True, "rotate_values": True, "rope_ratio": 1.0},
    *MLP_CONTROLS,
]
SIZES = dict(vocab_size=97, block_size=24, n_layer=2, n_embd=32, n_head=4, head_dim=16)


def tiny(**overrides):
    torch.manual_seed(0)
    return PrismWhite(WhiteConfig(**{**SIZES, **overrides}))


def tokens(model, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (B, model.config.block_size), generator=g)


def name(overrides):
    return ",".join(f"{k}={v}" for k, v in overrides.items())


@pytest.mark.parametrize("overrides", CANDIDATES, ids=name)
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


@pytest.mark.parametrize("overrides", CANDIDATES[:4] + MLP_CONTROLS, ids=name)
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


def test_with_every_change_off_it_is_the_reconstruction():
    white = tiny()
    torch.manual_seed(0)
    recon = Reconstruction(ReconstructionConfig(**SIZES))
    assert white.get_num_params() == recon.get_num_params()
    assert torch.equal(white.transformer.wte.weight, recon.transformer.wte.weight)  # same draws
    white.load_state_dict(recon.state_dict())  # the same weights, by name and shape
    idx = tokens(white)
    assert torch.allclose(white(idx)[0], recon(idx)[0], atol=1e-6)


def test_bad_white_config_names_its_field():
    with pytest.raises(ValueError, match="WhiteConfig.mlp = 'ista-tied' "):
        WhiteConfig(mlp="ista-tied")


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
    (lab.white.sink_behind_shifted_keys); the analysis path spells out the masked scores and the
    sink's logit (self_masked_bias). With learned logits away from 0 (a wrong sign or scale of b
    shows) and normalised subspaces with gains away from 1 (a wrong score scale shows), they agree,
    in the loss and in its gradient."""
    model = tiny(mask_self=True, normalize_subspaces=True)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.sink_logit.copy_(torch.tensor([-2.0, -0.5, 1.0, 3.0]))
            block.attn.subspace_norm.weight.uniform_(0.5, 2.0)
    idx, targets = tokens(model), tokens(model, seed=1)
    _, loss = model(idx, targets)
    grads = torch.autograd.grad(loss, [b.attn.sink_logit for b in model.transformer.h])
    _, loss2, _ = model.analyze(idx, targets)
    grads2 = torch.autograd.grad(loss2, [b.attn.sink_logit for b in model.transformer.h])
    assert abs(loss.item() - loss2.item()) < 1e-5
    assert all(torch.allclose(g, g2, atol=1e-5) and g.abs().max() > 0 for g, g2 in zip(grads, grads2))


def test_the_diagonal_is_the_row_maximum_only_against_keys_no_longer():
    """With q = k the self-score ‖w_t‖² beats every key no longer than w_t (Cauchy–Schwarz), and
    only those: in random directions with log-normal norms (σ = 1, p = 32, T = 128) it is the
    causal row's maximum in about 45% of rows (lab/white.py's comment)."""
    g = torch.Generator().manual_seed(0)
    n, T, p = 400, 128, 32
    dirs = torch.randn(n, T, p, generator=g)
    w = dirs / dirs.norm(dim=-1, keepdim=True) * torch.exp(torch.randn(n, T, 1, generator=g))
    scores = (w @ w.transpose(-1, -2)).masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
    diagonal_wins = scores.argmax(-1) == torch.arange(T)
    assert 0.40 < diagonal_wins.float().mean() < 0.50
    # where every earlier key is no longer than w_t, the diagonal always wins
    norms = w.norm(dim=-1)
    longest_before = torch.cat((torch.zeros(n, 1), norms.cummax(dim=1).values[:, :-1]), dim=1)
    assert diagonal_wins[longest_before <= norms].all()


def test_rotated_values_are_the_gradient_form_of_the_rotated_tokens():
    """y_t = Σ_s A_ts R_{s−t} w_s: rotating each value into the frame of its key and the output
    back into the query's frame. Checked against the sum written out rotation by rotation."""
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


def lasso_problem(m=64, d=16, n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(d, m, generator=g, dtype=torch.float64) / math.sqrt(d)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    a = torch.rand(n, m, generator=g, dtype=torch.float64)  # any a ≥ 0 to step from
    L = torch.linalg.eigvalsh(D.T @ D)[-1]
    return g, D, z, a, L


def test_one_ista_step_decreases_the_lasso_objective():
    g, D, z, _, L = lasso_problem(n=32)
    m = D.shape[1]
    lam = torch.full((m,), 0.1, dtype=torch.float64)
    eta = 1 / L                                              # η = 1/L: the textbook step
    a0 = torch.zeros(32, m, dtype=torch.float64)
    a1 = ista_step(z, D, lam, eta)
    a2 = ista_step(z, D, lam, eta, a1)
    f0, f1, f2 = (lasso_objective(z, D, lam, a) for a in (a0, a1, a2))
    assert (f1 < f0).all() and (f2 <= f1 + 1e-12).all() and (a1 >= 0).all()
    # the step written out with matrices, tokens as columns: ReLU(η Dᵀz − ηλ)
    by_hand = torch.relu(eta * (D.T @ z.T) - eta * lam[:, None]).T
    assert torch.allclose(a1, by_hand)


def test_ista_descends_for_any_step_under_two_over_L_and_any_sign_of_lambda():
    """F(a⁺) ≤ F(a) − (1/η − L/2)‖a⁺ − a‖²: η < 2/L suffices, and λ < 0 does not break it."""
    g, D, z, a, L = lasso_problem()
    lam = torch.randn(D.shape[1], generator=g, dtype=torch.float64)  # both signs
    assert (lam < 0).any()
    for eta in (1 / L, 1.5 / L, 1.99 / L):
        a1 = ista_step(z, D, lam, eta, a)
        decrease = lasso_objective(z, D, lam, a) - lasso_objective(z, D, lam, a1)
        assert (decrease >= (1 / eta - L / 2) * (a1 - a).pow(2).sum(-1) - 1e-9).all(), eta
        assert (decrease > 0).any()


def test_ista_can_increase_the_objective_above_two_over_L():
    # λ = 0, D = diag(2, 1) (L = 4), a away from the minimum a* = (10, 10) along the top
    # eigenvector: no ReLU is active, the step is gradient descent and overshoots by 1 − ηL
    D = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    a_star = torch.tensor([[10.0, 10.0]], dtype=torch.float64)
    z, lam = a_star @ D.T, torch.zeros(2, dtype=torch.float64)
    a = a_star + torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    for eta, grows in ((1.9 / 4, False), (2.5 / 4, True)):
        a1 = ista_step(z, D, lam, eta, a)
        f, f1 = lasso_objective(z, D, lam, a), lasso_objective(z, D, lam, a1)
        assert bool((f1 > f).all()) == grows, eta
    assert torch.allclose(lasso_objective(z, D, lam, ista_step(z, D, lam, 2.5 / 4, a)),
                          2.25 * lasso_objective(z, D, lam, a))  # (1 − 2.5)² = 2.25


def test_the_sparse_coding_mlp_is_a_relu_mlp_with_a_learned_threshold():
    block = tiny(mlp="ista").transformer.h[0].mlp
    with torch.no_grad():
        block.threshold.uniform_(-0.05, 0.05)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    D, D1 = block.proj.weight, block.encoder.weight              # D (d, m), D₁ (m, d)
    expected = (D @ torch.relu(D1 @ x.T - block.threshold[:, None])).T
    assert torch.allclose(block(x), expected, atol=1e-6)
    # with D₁ = ηDᵀ and θ = ηλ it is one ISTA step from 0, decoded by D
    with torch.no_grad():
        block.encoder.weight.copy_(0.7 * D.T)
    lam = block.threshold / 0.7
    assert torch.allclose(block(x), ista_step(x, D, lam, 0.7) @ D.T, atol=1e-6)


def test_every_candidate_variant_is_matched_to_the_reconstruction_at_every_preset():
    """A candidate is sized against its family's base, the reconstruction (one MLP unit from its
    count at most), and stays within ±5% of the author's PRISM too."""
    from lab.variants import PRESETS, VARIANTS, count_params, family_base, variant_args

    candidates = [v for v, (arch, _) in VARIANTS.items() if arch == "prism-white"]
    assert len(candidates) >= 14 and family_base("prism-white") == "recon"
    for v in ("gelu-bias", "relu-bias", "crate-alpha"):
        assert VARIANTS[f"prism-white-{v}"] == ("prism-white", {**WHITE, "mlp": v})
    for preset in PRESETS:
        recon = count_params(*variant_args(preset, "recon", 4097))
        prism = count_params(*variant_args(preset, "prism", 4097))
        sizes = PRESETS[preset]["recon"]
        unit = sizes["n_layer"] * (2 * sizes["n_embd"] + 1)  # one MLP unit, with its bias
        for v in candidates:
            n = count_params(*variant_args(preset, v, 4097))
            assert abs(n - recon) <= unit, (preset, v)
            assert abs(n / prism - 1) <= 0.05, (preset, v)


# -----------------------------------------------------------------------------
# The attribution controls (lab/white.py).


def test_the_hidden_bias_mlps_are_w2_sigma_w1x_plus_b():
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    for mlp, sigma in (("gelu-bias", F.gelu), ("relu-bias", torch.relu)):
        block = tiny(mlp=mlp).transformer.h[0].mlp
        assert block.fc.bias is not None and block.proj.bias is None
        with torch.no_grad():
            block.fc.bias.uniform_(-0.5, 0.5)
        W1, b, W2 = block.fc.weight, block.fc.bias, block.proj.weight
        assert torch.allclose(block(x), (W2 @ sigma(W1 @ x.T + b[:, None])).T, atol=1e-6)
    # one bias per hidden unit more than the GELU MLP, nothing else
    assert tiny(mlp="gelu-bias").get_num_params() == tiny().get_num_params() + 2 * 4 * 32


def ista_twin(relu_model):
    """An "ista" model holding relu_model's weights: D₁ = W₁, θ = −b, D = W₂."""
    twin = tiny(**{**relu_model.config.__dict__, "mlp": "ista"})
    state = {}
    for k, v in relu_model.state_dict().items():
        if k.endswith("mlp.fc.bias"):
            state[k.replace("fc.bias", "threshold")] = -v
        else:
            state[k.replace("mlp.fc.weight", "mlp.encoder.weight")] = v
    twin.load_state_dict(state)
    return twin


def test_relu_bias_is_the_ista_block_up_to_the_init_draws():
    """ReLU(W₁x + b) then W₂ with b = −θ is the decoupled ISTA block: copied weights give the same
    logits exactly, and trained side by side with AdamW (weight decay on) they stay together: b
    and θ are both undecayed and b follows −θ. At one seed the two only start from other draws."""
    relu = tiny(**WHITE, mlp="relu-bias")
    with torch.no_grad():
        for block in relu.transformer.h:
            block.mlp.fc.bias.uniform_(-0.05, 0.05)
    ista = ista_twin(relu)
    start = [b.mlp.fc.bias.detach().clone() for b in relu.transformer.h]
    assert relu.get_num_params() == ista.get_num_params()
    idx, targets = tokens(relu, B=4), tokens(relu, B=4, seed=1)
    assert torch.equal(relu(idx)[0], ista(idx)[0])
    # the hidden bias and the threshold sit in the no-decay group, the matrices in the other
    for model, vector in ((relu, "mlp.fc.bias"), (ista, "mlp.threshold")):
        opt = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu")
        undecayed = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
        for n, p in model.named_parameters():
            if n.endswith(vector):
                assert id(p) in undecayed
            if n.endswith(("mlp.fc.weight", "mlp.encoder.weight", "mlp.proj.weight")):
                assert id(p) not in undecayed
    opts = [m.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu") for m in (relu, ista)]
    for _ in range(10):
        for model, opt in zip((relu, ista), opts):
            _, loss = model(idx, targets)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert torch.allclose(relu(idx)[0], ista(idx)[0], atol=1e-5)
    for a, b, b0 in zip(relu.transformer.h, ista.transformer.h, start):
        assert torch.allclose(a.mlp.fc.bias, -b.mlp.threshold, atol=1e-6)
        assert (a.mlp.fc.bias - b0).abs().max() > 1e-2   # it moved, and −θ moved with it
    # the same seed draws them differently (the bias's construction draws shift the stream)
    torch.manual_seed(0)
    fresh_relu = PrismWhite(WhiteConfig(**SIZES, **WHITE, mlp="relu-bias"))
    torch.manual_seed(0)
    fresh_ista = PrismWhite(WhiteConfig(**SIZES, **WHITE, mlp="ista"))
    assert not torch.equal(fresh_relu.transformer.wte.weight, fresh_ista.transformer.wte.weight)


def test_crate_alpha_is_two_ista_steps_from_zero_decoded_by_its_own_matrix():
    model = tiny(mlp="crate-alpha")
    block = model.transformer.h[0].mlp
    x = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(0))
    D, D2 = block.dictionary.weight, block.proj.weight            # D (d, m), D₂ (d, m): m -> d
    assert D.shape == D2.shape == (32, mlp_width(model.config)) == (32, 128)
    a1 = ista_step(x, D, 0.1, 0.1)
    a2 = ista_step(x, D, 0.1, 0.1, a1)
    assert torch.allclose(block(x), a2 @ D2.T, atol=1e-6)
    # CRATE-α's own form, with their einsums: Dᵀx, D z₁, Dᵀ(D z₁ − x), then D₂ z₂
    z1 = torch.relu(0.1 * torch.einsum("pd,nlp->nld", D, x) - 0.1 * 0.1)
    lasso_grad = torch.einsum("pd,nlp->nld", D, torch.einsum("dp,nlp->nld", D, z1) - x)
    z2 = torch.relu(z1 - 0.1 * lasso_grad - 0.1 * 0.1)
    assert torch.allclose(block(x), torch.einsum("dp,nlp->nld", D2, z2), atol=1e-6)
    assert (a2 > 0).any() and (a2 == 0).any()                     # a sparse code, not all off
    # two d·m matrices and nothing else: the GELU MLP's count at the same width
    assert [p.dim() for p in block.parameters()] == [2, 2]
    assert model.get_num_params() == tiny().get_num_params()


def test_crate_alphas_step_is_under_two_over_L_at_init():
    """The comment's numbers: D (128 × 512) at std 0.02 has λ_max(DᵀD) ≈ 0.46, so η = 0.1 is far
    below 2/L ≈ 4 at init, and the two steps do not increase the LASSO objective there."""
    torch.manual_seed(0)
    config = WhiteConfig(**{**SIZES, "n_embd": 128, "n_head": 8, "head_dim": 32},
                         mlp="crate-alpha")
    block = PrismWhite(config).transformer.h[0].mlp
    D = block.dictionary.weight.detach().double()
    L = torch.linalg.eigvalsh(D.T @ D)[-1].item()
    assert D.shape == (128, 512) and 0.42 < L < 0.50 and 2 / L > 4
    x = torch.nn.functional.layer_norm(torch.randn(64, 128, dtype=torch.float64), (128,))
    a1 = ista_step(x, D, 0.1, 0.1)
    a2 = ista_step(x, D, 0.1, 0.1, a1)
    f0, f1, f2 = (lasso_objective(x, D, 0.1, a) for a in (torch.zeros_like(a1), a1, a2))
    assert (f1 <= f0).all() and (f2 <= f1).all()


def test_flops_count_crate_alphas_extra_uses_of_its_dictionary():
    """6 per weight counts D and D₂ once each; D is used three times, so CRATE-α adds
    6 · n_layer · 2·d·m; the other MLPs are counted by their weights alone."""
    for overrides in ({}, {"mlp": "ista"}, {"mlp": "gelu-bias"}, {"mlp": "relu-bias"}):
        model = tiny(**overrides)
        c = model.config
        assert model.flops_per_token() == (6 * model.get_num_params()
                                           + 12 * c.n_layer * c.n_head * c.head_dim * c.block_size)
    gelu, crate = tiny(), tiny(mlp="crate-alpha")
    m = mlp_width(crate.config)
    assert crate.flops_per_token() - gelu.flops_per_token() == 6 * 2 * 2 * 32 * m
    # at the study's preset: the same width as prism-white (4d = 512), 4 layers
    from lab.variants import model_size, variant_args
    white = model_size(*variant_args("cpu-small", "prism-white", 4097))
    arch, args = variant_args("cpu-small", "prism-white-crate-alpha", 4097)
    assert "mlp_hidden" not in args and args["mlp"] == "crate-alpha"
    assert model_size(arch, args) == (white[0], white[1] + 6 * 4 * 2 * 128 * 512)


def test_the_relu_control_has_no_bias_and_is_relu():
    block = tiny(**WHITE, mlp="relu").transformer.h[0].mlp
    assert block.fc.bias is None and block.proj.bias is None
    x = torch.randn(3, 32)
    assert torch.allclose(block(x), torch.relu(x @ block.fc.weight.T) @ block.proj.weight.T,
                          atol=1e-6)
