import math

import pytest
import torch

from model import CheckpointError, build_model, checkpoint_payload, load_model
from conftest import unsafe_message
from model import Prism, PrismConfig, filter_logits


def tiny(**overrides):
    args = dict(vocab_size=300, block_size=32, n_layer=2, n_embd=32, n_head=4, head_dim=16)
    args.update(overrides)
    torch.manual_seed(0)
    return Prism(PrismConfig(**args))


def random_tokens(model, B=2, T=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = T or model.config.block_size
    return torch.randint(0, model.config.vocab_size, (B, T), generator=g)


def test_default_config_is_the_paper_model():
    c = PrismConfig()
    assert (c.n_embd, c.n_layer, c.n_head, c.head_dim, c.block_size) == (512, 8, 16, 64, 512)
    assert c.signal_heads == 8 and c.rope_ratio == math.pi
    with torch.device("meta"):  # the ~50M parameter count without allocating it
        model = Prism(c)
    assert model.overcompleteness == 2.0
    assert model.get_num_params() == 50_930_176   # "50.93M" in model.py's comment on the defaults


def test_parameter_report_splits_the_count(capsys):
    model = tiny()
    assert capsys.readouterr().out == ""  # building prints nothing: each caller decides where
    assert model.describe_parameters().startswith(f"prism: {model.get_num_params() / 1e6:.2f}M parameters (")
    report = model.parameter_report()
    assert report["total"] == model.get_num_params()
    assert report["embedding"] == model.transformer.wte.weight.numel()  # tied lm_head counted once
    assert report["attention"] == sum(p.numel() for b in model.transformer.h for p in b.attn.parameters())
    assert report["mlp"] == sum(p.numel() for b in model.transformer.h for p in b.mlp.parameters())


def test_shapes_and_initial_loss():
    model = tiny()
    idx = random_tokens(model)
    targets = random_tokens(model, seed=1)
    logits, loss = model(idx, targets)
    assert logits.shape == (2, 32, 300)  # the padding rows of the embedding never show
    assert model.transformer.wte.weight.shape[0] == 320
    assert abs(loss.item() - math.log(300)) < 0.1
    assert model(idx)[1] is None


def test_longer_than_block_size_is_refused():
    model = tiny()
    with pytest.raises(ValueError, match="block_size"):
        model(random_tokens(model, T=33))


def test_causality():
    model = tiny()
    idx = random_tokens(model, B=1)
    t = 17
    changed = idx.clone()
    changed[0, t] = (idx[0, t] + 1) % model.config.vocab_size
    before, after = model(idx)[0], model(changed)[0]
    assert torch.equal(before[:, :t], after[:, :t])
    assert not torch.allclose(before[:, t], after[:, t])


def test_rope_frequencies_of_the_two_groups():
    model = tiny(n_head=6, signal_heads=2)
    freqs = model.rope_frequencies()
    assert freqs.shape == (6, 8)
    signal, noise = freqs[:2], freqs[2:]
    assert torch.equal(signal[0], signal[1])
    assert torch.allclose(noise / signal[0], torch.full_like(noise, math.pi), rtol=0, atol=1e-15)
    expected = 10000.0 ** (-2 * torch.arange(8, dtype=torch.float64) / 16)
    assert torch.allclose(signal[0], expected, rtol=1e-15)
    assert model.head_groups() == ["signal"] * 2 + ["noise"] * 4
    assert torch.equal(tiny(rope_ratio=1.0).rope_frequencies(), tiny().rope_frequencies()[:1].expand(4, 8))


def test_attention_scores_depend_only_on_relative_position():
    # Layer 0 sees token identities only: shifting the sequence right must shift its scores.
    model = tiny()
    idx = random_tokens(model, B=1, T=20)
    shift = 7
    shifted = torch.cat([random_tokens(model, B=1, T=shift, seed=3), idx], dim=1)
    q, k = (model.analyze(idx)[2][0][n] for n in ("q", "k"))
    q2, k2 = (model.analyze(shifted)[2][0][n] for n in ("q", "k"))
    scores = q @ k.transpose(-2, -1)
    scores_shifted = (q2 @ k2.transpose(-2, -1))[..., shift:, shift:]
    assert torch.allclose(scores, scores_shifted, atol=1e-5)
    # ...while the rotated queries themselves did change: position is really encoded.
    assert not torch.allclose(q, q2[..., shift:, :], atol=1e-3)


def test_query_key_value_share_one_projection():
    inner = 4 * 16   # H·p = 2d: ρ = 2
    attn = tiny().transformer.h[0].attn
    shapes = {name: p.shape for name, p in attn.named_parameters()}
    assert shapes == {"dictionary.weight": (inner, 32), "back_projection.weight": (32, inner)}
    # model.py §3: at ρ = 2 the layer holds the 4d² weights of standard attention's q, k, v, o
    assert sum(p.numel() for p in attn.parameters()) == 4 * 32**2
    assert torch.equal(attn.subspaces(), attn.dictionary.weight.view(4, 16, 32))
    # q = k = v: the recorded query and key are one tensor, W_k = Z U_k rotated
    layer = tiny().analyze(random_tokens(tiny(), B=1))[2][0]
    assert torch.equal(layer["q"], layer["k"])
    w = (layer["z"] @ attn.dictionary.weight.T).view(1, 32, 4, 16).transpose(1, 2)
    torch.testing.assert_close(layer["q"][:, :, 0], w[:, :, 0])   # position 0 is not rotated
    torch.testing.assert_close(layer["q"].norm(dim=-1), w.norm(dim=-1))   # RoPE keeps norms


def test_the_decoupled_back_projection_trains():
    model = tiny()
    idx, targets = random_tokens(model), random_tokens(model, seed=1)
    opt = model.configure_optimizers(0.1, 3e-3, (0.9, 0.95), "cpu")
    first = model(idx, targets)[1].item()
    for _ in range(20):
        loss = model(idx, targets)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 0.5
    grads = [p.grad for p in model.transformer.h[0].attn.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("overrides", [{}, {"rope_ratio": 1.0}, {"bias": True}, {"signal_heads": 0}])
def test_fast_path_equals_analysis_path(overrides):
    model = tiny(**overrides)
    idx, targets = random_tokens(model), random_tokens(model, seed=1)
    logits, loss = model(idx, targets)
    logits2, loss2, layers = model.analyze(idx, targets)
    assert torch.allclose(logits, logits2, atol=1e-5)
    assert abs(loss.item() - loss2.item()) < 1e-5
    assert len(layers) == 2
    attn = layers[0]["attn"]
    assert attn.shape == (2, 4, 32, 32)
    assert torch.allclose(attn.sum(-1), torch.ones(2, 4, 32))
    assert attn.triu(diagonal=1).abs().max() == 0  # causal
    assert layers[0]["q"].shape == layers[0]["k"].shape == (2, 4, 32, 16)
    assert layers[0]["z"].shape == (2, 32, 32)


def test_tiny_model_overfits_one_batch():
    model = tiny(n_layer=2, n_embd=64, n_head=4, head_dim=32)
    idx = random_tokens(model, B=4)
    x, y = idx[:, :-1], idx[:, 1:]
    opt = model.configure_optimizers(0.0, 3e-3, (0.9, 0.95), "cpu")
    for step in range(300):
        loss = model(x, y)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.5:
            break
    assert loss.item() < 0.5, f"loss {loss.item():.3f} after 300 steps"


def test_generate():
    model = tiny().eval()
    prompt = random_tokens(model, B=2, T=5)
    torch.manual_seed(1)
    a = model.generate(prompt, 40, temperature=0.8, top_k=20, top_p=0.9)  # runs past block_size 32
    torch.manual_seed(1)
    b = model.generate(prompt, 40, temperature=0.8, top_k=20, top_p=0.9)
    assert a.shape == (2, 45)
    assert torch.equal(a, b)
    assert torch.equal(a[:, :5], prompt)
    assert a.max() < model.config.vocab_size
    greedy = model.generate(prompt, 3, temperature=0)
    assert torch.equal(greedy[:, 5], model(prompt)[0][:, -1].argmax(-1))


def test_filter_logits():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[True, False, False, True]]
    # probabilities ≈ .09 .67 .24 .03: top_p .7 keeps the two tokens whose mass first reaches .7
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[True, False, False, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[True, False, True, True]]


@pytest.mark.parametrize("field,value", [
    ("vocab_size", 0), ("block_size", -1), ("n_layer", 0), ("n_embd", 0), ("n_head", 0),
    ("head_dim", 15), ("head_dim", 0), ("signal_heads", 5), ("rope_ratio", 0.0),
    ("rope_theta", 1.0), ("dropout", 1.0), ("mlp_hidden", -1),
])
def test_bad_config_names_its_field(field, value):
    args = dict(n_head=4, head_dim=16, n_embd=32)
    args[field] = value
    with pytest.raises(ValueError, match=f"PrismConfig.{field} "):
        PrismConfig(**args)


def test_a_subclass_swaps_the_blocks_attention_and_mlp():
    """The lab's models subclass Prism and set attention_class / mlp_class; Block calls both
    with the config."""
    from model import MLP, PrismAttention

    class Marked(MLP):
        pass

    class Variant(Prism):
        mlp_class = Marked

    model = Variant(tiny().config)
    assert all(type(b.mlp) is Marked and type(b.attn) is PrismAttention for b in model.transformer.h)
    assert all(type(b.mlp) is MLP for b in tiny().transformer.h)


def test_build_model_rejects_unknown_fields():
    with pytest.raises(ValueError, match="no field 'n_heads'"):
        build_model("prism", n_heads=4)
    with pytest.raises(ValueError, match="unknown arch 'llama'"):
        build_model("llama")


def test_checkpoint_round_trip(tmp_path):
    model = tiny(rope_ratio=3.0, bias=True)
    path = tmp_path / "ckpt.pt"
    torch.save(checkpoint_payload(model), path)
    loaded = load_model(path)
    assert loaded.config == model.config and not loaded.training
    idx = random_tokens(model)
    assert torch.equal(loaded(idx)[0], model.eval()(idx)[0])
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_model(tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_text("garbage")
    with pytest.raises(CheckpointError, match="bad.pt is not a PyTorch checkpoint file$"):
        load_model(tmp_path / "bad.pt")
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError) as cut:
        load_model(tmp_path / "cut.pt")
    assert str(cut.value) == f"{tmp_path / 'cut.pt'} is damaged or truncated (not a complete PyTorch checkpoint)"
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a prism-nano checkpoint"):
        load_model(tmp_path / "other.pt")


def test_a_checkpoint_carrying_code_is_refused_before_the_code_runs(unsafe_ckpt):
    path, marker = unsafe_ckpt
    with pytest.raises(CheckpointError) as refused:
        load_model(path)
    assert f"error: {refused.value}" == unsafe_message(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is real: an unrestricted load runs it
    assert marker.exists()


def test_flops_per_token_counts_this_attention():
    model = tiny()
    c = model.config
    attention = 12 * c.n_layer * c.n_head * c.head_dim * c.block_size
    assert model.flops_per_token() == 6 * model.get_num_params() + attention
    # MFU is that many FLOPs per token, over block_size tokens per sequence, against the peak.
    assert model.estimate_mfu(4, 1.0, peak_flops=1e12) == pytest.approx(
        model.flops_per_token() * c.block_size * 4 / 1e12)
    assert math.isnan(model.estimate_mfu(4, 1.0, None))   # no known peak: no number


# -- the derivation of docs/PRISM.md §2, executable ----------------------------------------


def derivation_case(seed=0, n=48, d=24, K=3, p=8):
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, d, generator=g, dtype=torch.float64)
    U = torch.randn(K, p, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    return Z, U


def test_closed_form_gradient_of_the_compressed_rate_equals_autograd():
    from model import compressed_coding_rate, compressed_rate_gradient

    Z, U = derivation_case()
    for eps in (0.5, 2.0):
        Zr = Z.clone().requires_grad_(True)
        compressed_coding_rate(Zr, U, eps).backward()
        assert torch.allclose(compressed_rate_gradient(Z, U, eps), Zr.grad, rtol=0, atol=1e-12)


def test_second_order_series_matches_the_descent_direction_to_order_beta_squared():
    from model import compressed_rate_gradient, neumann_descent_direction, neumann_radius

    Z, U = derivation_case()
    errors = []
    for eps in (40.0, 80.0):   # β = p/(nε²) falls 4x; both well inside the series' radius
        assert neumann_radius(Z, U, eps) < 0.05
        exact = -compressed_rate_gradient(Z, U, eps)
        errors.append(float((neumann_descent_direction(Z, U, eps) - exact).norm() / exact.norm()))
    assert errors[0] / errors[1] == pytest.approx(16, rel=0.05)   # relative error ∝ β²
    assert errors[0] < 1e-3


def kept_term_against_the_gradient(Z, U, eps=0.5):
    """⟨Σ_k G_k W_k U_kᵀ, ∇R^c⟩: the linear form of the term the layer keeps (§2 (c)), against
    the exact gradient of the whole compressed rate."""
    from model import compressed_rate_gradient

    kept = sum((Z @ Uk.T) @ (Z @ Uk.T).T @ (Z @ Uk.T) @ Uk for Uk in U)
    return float((kept * compressed_rate_gradient(Z, U, eps)).sum())


def test_the_kept_term_raises_the_rate_for_one_or_orthogonal_subspaces_only():
    """model.py §2: ⟨G_k W_k U_kᵀ, ∇R^c⟩ = β tr(W_kᵀ G_k (I + βG_k)⁻¹ W_k U_kᵀU_k) ≥ 0 for one
    subspace, and for mutually orthogonal ones the cross terms vanish; overlapping subspaces
    can make the sum negative (the review's counterexample)."""
    for seed in range(5):
        Z, U = derivation_case(seed)
        for Uk in U:   # one subspace at a time
            assert kept_term_against_the_gradient(Z, Uk[None]) >= 0
        # mutually orthogonal spans, each subspace with its own arbitrary basis A_k Q_k
        g = torch.Generator().manual_seed(seed)
        Q = torch.linalg.qr(torch.randn(24, 24, generator=g, dtype=torch.float64))[0].T
        orthogonal = torch.stack([torch.randn(8, 8, generator=g, dtype=torch.float64) @ Q[8 * k:8 * k + 8]
                                  for k in range(3)]) / math.sqrt(24)
        assert kept_term_against_the_gradient(Z, orthogonal) >= 0
    # d = 2, p = 1, ε = 1: tokens (−1,−1), (0,0), (3,3); u₁ = (−2, 3), u₂ = (−3, 1)
    Z = torch.tensor([[-1.0, -1.0], [0.0, 0.0], [3.0, 3.0]], dtype=torch.float64)
    U = torch.tensor([[[-2.0, 3.0]], [[-3.0, 1.0]]], dtype=torch.float64)
    assert kept_term_against_the_gradient(Z, U, eps=1.0) == pytest.approx(-69100 / 559, rel=1e-12)
    assert kept_term_against_the_gradient(Z, U[:1], eps=1.0) > 0   # each alone: ≥ 0
    assert kept_term_against_the_gradient(Z, U[1:], eps=1.0) > 0


def test_the_layer_is_not_a_descent_step_on_random_tokens():
    """Measured, not proven (§2): on random tokens and overlapping random subspaces the causal
    softmax step +U·SA has a negative cosine with −∇R^c and R^c rises along it; at the model's
    scale (β·λ_max ≫ 1) even the two-term series points uphill, while well inside the radius it
    is the descent direction."""
    from model import (compressed_coding_rate, compressed_rate_gradient,
                       neumann_descent_direction, neumann_radius)

    def cosine(a, b):
        return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))

    for seed in range(3):
        Z, U = derivation_case(seed)
        n, p = Z.shape[0], U.shape[1]
        mssa = sum(((Z @ Uk.T) @ (Z @ Uk.T).T / math.sqrt(p)).masked_fill(
            torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")).softmax(-1) @ (Z @ Uk.T) @ Uk
            for Uk in U)
        descent = -compressed_rate_gradient(Z, U, 0.5)
        assert cosine(descent, mssa) < -0.5
        h = 1e-4 * float(Z.norm()) / float(mssa.norm())
        assert compressed_coding_rate(Z + h * mssa, U, 0.5) > compressed_coding_rate(Z, U, 0.5)
        assert neumann_radius(Z, U, 0.5) > 10
        assert cosine(descent, neumann_descent_direction(Z, U, 0.5)) < 0
        assert cosine(-compressed_rate_gradient(Z, U, 40.0), neumann_descent_direction(Z, U, 40.0)) > 0.99


def test_the_dropped_term_is_a_uniform_shrink_for_a_tight_frame_not_in_general():
    """§2 (d): Σ_k β W_k U_kᵀ = βZ Σ_k U_kU_kᵀ, which is cβZ exactly when Σ_k U_kU_kᵀ = cI."""
    n, d, K, p, c = 48, 24, 6, 8, 2.5   # H·p = 48 = 2d: an overcomplete tight frame
    g = torch.Generator().manual_seed(0)
    Z = torch.randn(n, d, generator=g, dtype=torch.float64)
    frame = math.sqrt(c) * torch.linalg.qr(torch.randn(K * p, d, generator=g, dtype=torch.float64))[0]
    U = frame.view(K, p, d)   # rows U_kᵀ; the subspaces overlap, but Σ_k U_kU_kᵀ = c·I_d
    beta = p / (n * 0.5**2)
    dropped = sum(beta * (Z @ Uk.T) @ Uk for Uk in U)
    torch.testing.assert_close(dropped, c * beta * Z, rtol=0, atol=1e-12)
    _, random = derivation_case()   # a random dictionary is no tight frame: no uniform shrink
    dropped = sum((Z @ Uk.T) @ Uk for Uk in random)
    assert torch.nn.functional.cosine_similarity(dropped.flatten(), Z.flatten(), dim=0) < 0.9


def test_the_series_radius_at_the_paper_models_initial_dictionary():
    """§2 (b): β·λ_max(G_k) is 115–135 for PRISM-50M's initial dictionary (std 0.02, 16 heads of
    p = 64, d = 512) on 512 isotropic tokens at ε = 0.5: the series is far outside its radius."""
    from model import neumann_radius

    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        U = 0.02 * torch.randn(16, 64, 512, generator=g, dtype=torch.float64)
        Z = torch.randn(512, 512, generator=g, dtype=torch.float64)
        assert 115 < neumann_radius(Z, U) < 135


def test_the_self_score_tops_only_keys_no_longer_than_the_token():
    """§3: with q = k, a token's score with itself ‖w_t‖² is at least its score with any key no
    longer than itself (Cauchy–Schwarz), and only those: against longer keys it is often not the
    row's maximum (random keys with log-normal norms: about a third of rows at σ = 1)."""
    model = tiny()
    layer = model.analyze(random_tokens(model))[2][0]
    q, k = layer["q"], layer["k"]
    scores, norms = q @ k.transpose(-2, -1), k.norm(dim=-1)
    shorter = norms[..., None, :] <= norms[..., :, None]   # key s no longer than token t
    diagonal = scores.diagonal(dim1=-2, dim2=-1)[..., None]
    assert (scores <= diagonal + 1e-5).masked_select(shorter).all()
    g = torch.Generator().manual_seed(0)
    for sigma, lo, hi in ((1.0, 0.25, 0.35), (0.5, 0.62, 0.74)):
        tops = []
        for _ in range(20):   # 128 tokens, isotropic directions in p = 32, log-normal norms
            w = torch.nn.functional.normalize(torch.randn(128, 32, generator=g, dtype=torch.float64), dim=-1)
            w = w * torch.exp(sigma * torch.randn(128, 1, generator=g, dtype=torch.float64))
            s = w @ w.T
            tops.append(float((s.diagonal() >= s.max(dim=-1).values).double().mean()))
        assert lo < sum(tops) / len(tops) < hi


def test_a_head_temperature_adds_no_function_with_a_decoupled_back_projection():
    """docs/PRISM.md §8: scaling U_k by √τ and B_k by 1/√τ multiplies head k's scores by τ and
    leaves its output otherwise unchanged, so a learned per-head temperature is a
    reparametrisation of PRISM's weights (exact)."""
    from model import apply_rotary

    model = tiny().eval()
    attn = model.transformer.h[0].attn
    z = torch.randn(2, 32, 32, generator=torch.Generator().manual_seed(1))
    tau = torch.tensor([1.0, 2.5, 0.3, 1.0])
    with torch.no_grad():   # the temperature by hand, on the original weights
        w = attn.dictionary(z).view(2, 32, 4, 16).transpose(1, 2)
        q = apply_rotary(w, attn.rope_cos[:, :32], attn.rope_sin[:, :32])
        scores = tau[:, None, None] * (q @ q.transpose(-2, -1)) / 4.0
        a = scores.masked_fill(torch.ones(32, 32, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        expected = attn.back_projection((a @ w).transpose(1, 2).reshape(2, 32, 64))
        scale = tau.sqrt().repeat_interleave(16)   # one factor per dictionary row
        attn.dictionary.weight.mul_(scale[:, None])
        attn.back_projection.weight.div_(scale[None, :])
        torch.testing.assert_close(attn(z), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head_dim, inside, above, long_signal, long_noise", [
    (32, 14, 2, 10, 8),   # docs/PRISM.md §4 and model.py's π-RoPE comment, at T = 128
    (64, 28, 4, 21, 17),
])
def test_pi_rope_band_facts(head_dim, inside, above, long_signal, long_noise):
    from model import band_facts

    f = band_facts(head_dim, ratio=math.pi, context=128)
    assert (f["noise_inside_signal_band"], f["noise_above_signal_band"]) == (inside, above)
    assert f["fastest_noise"] == math.pi and f["noise_at_or_past_nyquist"] == 1   # ω = π: parity
    assert (f["signal_longer_than_context"], f["noise_longer_than_context"]) == (long_signal, long_noise)
    # no exact re-alignment within 512 tokens for π, nor for the rational ratio 3, and near
    # re-alignments about as close for both (π's is not the farther one)
    three = band_facts(head_dim, ratio=3.0, context=128)
    assert 0 < f["closest_realignment"] < 1e-4 and 0 < three["closest_realignment"] < 1e-4
    assert band_facts(head_dim, ratio=1.0)["closest_realignment"] == 0   # π-off: same frequencies


def test_a_lab_that_cannot_import_says_why_and_no_lab_is_an_unknown_arch(tmp_path, monkeypatch):
    """get_arch's hook: a missing lab package leaves the tutorial on its own (unknown arch), but a
    lab that is there and fails to import raises its own error instead of hiding it."""
    import model

    (tmp_path / "broken_lab").mkdir()
    (tmp_path / "broken_lab" / "__init__.py").write_text("import no_such_module_here\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(model, "LAB_PACKAGE", "no_such_lab_package")
    with pytest.raises(ValueError, match="unknown arch 'gpt9'; choose from prism"):
        model.get_arch("gpt9")
    monkeypatch.setattr(model, "LAB_PACKAGE", "broken_lab")
    with pytest.raises(ModuleNotFoundError, match="no_such_module_here"):
        model.get_arch("gpt9")
