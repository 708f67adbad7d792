"""model.py: the author's PRISM, item by item (issue 25's facts 1-8), the same function as a
reference written out here from those facts on the author's parameter layout, and the derivation's
claims, each checked numerically."""
import math

import pytest
import torch
import torch.nn.functional as F

from checkpoint import CheckpointError, checkpoint_payload, load_model
from conftest import unsafe_message
from model import (Prism, PrismConfig, build_model, filter_logits, noise_weight_at, rope_frequencies,
                   rotary_frequencies, rotate_pairs)


def tiny(**overrides):
    args = dict(vocab_size=300, block_size=32, n_layer=2, n_embd=32, n_head=2)  # 2 + 2 heads of p = 32
    args.update(overrides)
    torch.manual_seed(0)
    return Prism(PrismConfig(**args))


def random_tokens(model, B=2, T=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (B, T or model.config.block_size), generator=g)


# -- the author's PRISM, fact by fact ---------------------------------------------------------


def test_the_paper_config_has_the_authors_parameter_count():
    c = PrismConfig()
    assert (c.n_layer, c.n_embd, c.n_head, c.expansion, c.head_dim, c.block_size) == (8, 512, 8, 2, 128, 512)
    with torch.device("meta"):  # the ~51M parameters without allocating them
        model = Prism(c)
    assert model.get_num_params() == 51_192_320
    assert model.get_num_params() - model.transformer.wpe.weight.numel() == 50_930_176
    assert model.transformer.wte.weight.shape == (50304, 512)   # GPT-2's 50257, padded
    attn = model.transformer.h[0].attn
    assert attn.dictionary.weight.shape == (2048, 512)   # 2·H·p atoms: 4x overcomplete, 2x per stream


def test_one_dictionary_is_the_whole_attention_and_it_holds_gpt2s_attention_weights():
    """Fact 1: no q, k, v or output projection besides U, no bias; at R = 2, 4d² weights."""
    model = tiny(bias=True)
    attn = model.transformer.h[0].attn
    assert {n: tuple(p.shape) for n, p in attn.named_parameters()} == {"dictionary.weight": (128, 32)}
    assert attn.dictionary.weight.numel() == 4 * 32**2
    assert torch.equal(attn.subspaces(), attn.dictionary.weight.view(4, 32, 32))
    assert model.head_groups() == ["signal", "signal", "noise", "noise"]


def test_the_dictionary_starts_as_a_tight_frame_and_the_rest_as_gpt2():
    """Fact 2: DᵀD = I (orthonormal columns), after GPT-2's N(0, 0.02) init; the MLP's output
    projection at 0.02/√(2L)."""
    model = tiny(n_embd=64, n_layer=4, vocab_size=4000)
    for block in model.transformer.h:
        D = block.attn.dictionary.weight.double()
        torch.testing.assert_close(D.T @ D, torch.eye(64, dtype=torch.float64), rtol=0, atol=1e-5)
        assert block.mlp.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
        assert block.mlp.fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.transformer.wpe.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.lm_head.weight is model.transformer.wte.weight   # tied


def test_the_two_rope_bases():
    """Fact 4: ω_i = b^(−i/(p/2)) on interleaved pairs, b = 10⁴·π for the signal heads and 10⁴/π
    for the noise heads; pair 0 turns at 1 rad/token in both."""
    c = tiny().config
    freqs = rope_frequencies(c)
    i = torch.arange(16, dtype=torch.float64)
    torch.testing.assert_close(freqs[:2], ((1e4 * math.pi) ** (-i / 16)).expand(2, 16), rtol=1e-14, atol=0)
    torch.testing.assert_close(freqs[2:], ((1e4 / math.pi) ** (-i / 16)).expand(2, 16), rtol=1e-14, atol=0)
    assert (freqs[:, 0] == 1).all()


def test_query_key_value_are_one_projection_rotated_on_interleaved_pairs():
    """Fact 3: W = Z U_k, value W, query = key = RoPE(W) with pairs (2i, 2i + 1)."""
    model = tiny()
    layer = model.analyze(random_tokens(model, B=1))[2][0]
    assert torch.equal(layer["q"], layer["k"])
    w = (layer["z"] @ model.transformer.h[0].attn.dictionary.weight.T).view(1, 32, 4, 32).transpose(1, 2)
    t = torch.arange(32, dtype=torch.float64)[:, None]
    angle = t * rope_frequencies(model.config)[:, None, :]   # (heads, T, pairs)
    x0, x1 = w[..., 0::2].double(), w[..., 1::2].double()
    rotated = torch.stack((x0 * angle.cos() - x1 * angle.sin(), x0 * angle.sin() + x1 * angle.cos()), -1)
    torch.testing.assert_close(layer["q"].double(), rotated.flatten(-2), rtol=1e-4, atol=1e-5)


def test_attention_scores_depend_only_on_relative_position():
    model = tiny()
    w = torch.randn(1, 4, 20, 32)
    q = model.transformer.h[0].attn
    shift = 7
    a = rotate_pairs(w, q.rope_cos[:, :20], q.rope_sin[:, :20])
    b = rotate_pairs(w, q.rope_cos[:, shift:shift + 20], q.rope_sin[:, shift:shift + 20])
    torch.testing.assert_close(a @ a.transpose(-2, -1), b @ b.transpose(-2, -1), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(a, b, atol=1e-2)   # the rotated vectors did change


def test_lambda_follows_the_cosine_ramp_and_is_saved(tmp_path):
    """Fact 7: λ(t) = λ₀ + (λ₁ − λ₀)·½(1 − cos(π·min(1, t/T))), one value in every layer, a buffer
    in the state dict."""
    assert noise_weight_at(0, 0.01, 0.1) == 0.01
    assert noise_weight_at(0.5, 0.01, 0.1) == pytest.approx(0.055)
    assert noise_weight_at(1, 0.01, 0.1) == noise_weight_at(7, 0.01, 0.1) == pytest.approx(0.1)
    model = tiny()
    assert all(b.attn.noise_weight.item() == pytest.approx(0.01) for b in model.transformer.h)
    model.set_progress(0.25)
    expected = 0.01 + 0.09 * 0.5 * (1 - math.cos(math.pi / 4))
    assert all(b.attn.noise_weight.item() == pytest.approx(expected) for b in model.transformer.h)
    torch.save(checkpoint_payload(model), tmp_path / "ckpt.pt")
    loaded = load_model(tmp_path / "ckpt.pt")
    assert loaded.transformer.h[1].attn.noise_weight.item() == pytest.approx(expected)


def test_the_read_out_is_signal_minus_lambda_noise_through_the_dictionary():
    """Facts 5, 6: Δ = c·(Σ_S A_k W_k U_kᵀ − λ Σ_N A_k W_k U_kᵀ), c = 1/√(2HR); Δ is affine in
    λ, and with every head on itself (A = I) and λ = −1 the tight frame returns c·z exactly."""
    attn = tiny().transformer.h[0].attn.eval()
    z = torch.randn(2, 32, 32, generator=torch.Generator().manual_seed(1))
    D = attn.dictionary.weight
    with torch.no_grad():
        outs = {}
        for lam in (0.0, 0.1, 1.0):
            attn.noise_weight.fill_(lam)
            outs[lam] = attn(z)
        torch.testing.assert_close(outs[0.1], outs[0.0] + 0.1 * (outs[1.0] - outs[0.0]), rtol=1e-4, atol=1e-6)
        rec = []
        attn(z, rec)
        y = rec[0]["attn"] @ (z @ D.T).view(2, 32, 4, 32).transpose(1, 2)
        signal, noise = (y[:, :2].transpose(1, 2).reshape(2, 32, 64) @ D[:64],
                         y[:, 2:].transpose(1, 2).reshape(2, 32, 64) @ D[64:])
        torch.testing.assert_close(outs[0.1], (signal - 0.1 * noise) / math.sqrt(2 * 2 * 2),
                                   rtol=1e-4, atol=1e-6)
        assert attn.iso_energy == 1 / math.sqrt(8)
        torch.testing.assert_close(attn.iso_energy * (z @ D.T) @ D, attn.iso_energy * z, rtol=0, atol=1e-5)


def test_the_iso_energy_factor_is_no_reparametrisation_of_the_dictionary():
    """model.py §5: scaling D by a scales Δ by a² at fixed attention (one token: its softmax is 1),
    but the scores move by a² too, so with more tokens it is another function, not a rescaling."""
    attn = tiny().transformer.h[0].attn.eval()
    z = torch.randn(1, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before, before_one = attn(z), attn(z[:, :1])
        attn.dictionary.weight.mul_(2.0)
        after, after_one = attn(z), attn(z[:, :1])
    torch.testing.assert_close(after_one, 4 * before_one)
    assert not torch.allclose(after, 4 * before, rtol=1e-2, atol=1e-4)


def test_at_the_start_the_attention_update_is_small_beside_its_input():
    """§5, measured at the paper's config on random tokens: the update's RMS is 1–3% of its
    input's (≈ 0.02); without c it would be 1/c ≈ 5.7 times that."""
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = Prism(PrismConfig(n_layer=1, vocab_size=1000)).eval()
    idx = torch.randint(0, 1000, (2, 512), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = model.transformer.h[0].ln_1(model.embed(idx))
        ratio = (model.transformer.h[0].attn(z).pow(2).mean() / z.pow(2).mean()).sqrt().item()
    assert 0.01 < ratio < 0.03


def test_the_rest_is_gpt2_with_learned_positions():
    """Fact 8: wpe added to wte (as well as RoPE): moving a token moves its embedding."""
    model = tiny()
    idx = random_tokens(model, B=1, T=8)
    emb = model.embed(idx)
    torch.testing.assert_close(emb, model.transformer.wte(idx) + model.transformer.wpe.weight[:8])
    torch.testing.assert_close(model.embed(idx[:, 3:4], start=3), emb[:, 3:4])


# -- the same function as the author's layout ------------------------------------------------


def authors_state_dict(config, seed=0):
    """Random weights in the author's layout and names (nanoGPT's GPT with PRISM's u_proj)."""
    g = torch.Generator().manual_seed(seed)
    d, L, vocab = config.n_embd, config.n_layer, 64 * math.ceil(config.vocab_size / 64)
    total = 2 * config.n_head * config.head_dim
    sd = {"transformer.wte.weight": 0.3 * torch.randn(vocab, d, generator=g),
          "transformer.wpe.weight": 0.3 * torch.randn(config.block_size, d, generator=g),
          "transformer.ln_f.weight": 1 + 0.1 * torch.randn(d, generator=g)}
    for i in range(L):
        h = f"transformer.h.{i}."
        sd.update({h + "ln_1.weight": 1 + 0.1 * torch.randn(d, generator=g),
                   h + "attn.u_proj.weight": 0.3 * torch.randn(total, d, generator=g),
                   h + "attn.lambda_q": torch.tensor(0.37),
                   h + "attn.bias": torch.ones(config.block_size, config.block_size).tril()[None, None],
                   h + "ln_2.weight": 1 + 0.1 * torch.randn(d, generator=g),
                   h + "mlp.c_fc.weight": 0.1 * torch.randn(4 * d, d, generator=g),
                   h + "mlp.c_proj.weight": 0.1 * torch.randn(d, 4 * d, generator=g)})
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return sd


def reference_logits(sd, config, idx):
    """The author's PRISM written out from issue 25's facts, head by head, on their names."""
    H, p, d = config.n_head, config.head_dim, config.n_embd
    T = idx.shape[1]
    x = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][:T]
    t = torch.arange(T, dtype=torch.float64)[:, None]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(config.n_layer):
        h = f"transformer.h.{i}."
        U = sd[h + "attn.u_proj.weight"]
        lam = sd[h + "attn.lambda_q"]
        u = F.layer_norm(x, (d,), sd[h + "ln_1.weight"]) @ U.T
        outputs = []
        for k in range(2 * H):
            w = u[..., k * p:(k + 1) * p]
            base = 1e4 * math.pi if k < H else 1e4 / math.pi
            angle = t * base ** (-torch.arange(p // 2, dtype=torch.float64) / (p // 2))
            cos, sin = angle.cos().float(), angle.sin().float()
            even, odd = w[..., 0::2], w[..., 1::2]
            q = torch.stack((even * cos - odd * sin, even * sin + odd * cos), -1).flatten(-2)
            a = (q @ q.transpose(-1, -2) / math.sqrt(p)).masked_fill(~causal, float("-inf")).softmax(-1)
            outputs.append(a @ w if k < H else -lam * (a @ w))
        x = x + torch.cat(outputs, -1) @ U / math.sqrt(2 * H * config.expansion)
        m = F.layer_norm(x, (d,), sd[h + "ln_2.weight"])
        x = x + F.gelu(m @ sd[h + "mlp.c_fc.weight"].T) @ sd[h + "mlp.c_proj.weight"].T
    x = F.layer_norm(x, (d,), sd["transformer.ln_f.weight"])
    return (x @ sd["lm_head.weight"].T)[..., :config.vocab_size]


RENAMED = (("attn.u_proj.", "attn.dictionary."), ("attn.lambda_q", "attn.noise_weight"),
           ("mlp.c_fc.", "mlp.fc."), ("mlp.c_proj.", "mlp.proj."))


def test_the_authors_weights_renamed_not_permuted_give_the_same_logits():
    config = PrismConfig(vocab_size=200, block_size=24, n_layer=2, n_embd=32, n_head=2)
    sd = authors_state_dict(config)
    ours = {}
    for name, value in sd.items():
        if name.endswith("attn.bias"):  # their causal mask, a buffer
            continue
        for theirs, mine in RENAMED:
            name = name.replace(theirs, mine)
        ours[name] = value
    model = Prism(config).eval()
    model.load_state_dict(ours, strict=True)
    idx = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], reference_logits(sd, config, idx), rtol=1e-4, atol=1e-4)


# -- the language model -----------------------------------------------------------------------


def test_shapes_initial_loss_and_causality():
    model = tiny()
    idx, targets = random_tokens(model), random_tokens(model, seed=1)
    logits, loss = model(idx, targets)
    assert logits.shape == (2, 32, 300) and model.transformer.wte.weight.shape[0] == 320
    assert abs(loss.item() - math.log(300)) < 0.1
    changed = idx.clone()
    changed[0, 17] = (idx[0, 17] + 1) % 300
    after = model(changed)[0]
    assert torch.equal(logits[0, :17], after[0, :17]) and not torch.allclose(logits[0, 17], after[0, 17])
    with pytest.raises(ValueError, match="block_size"):
        model(random_tokens(model, T=33))


@pytest.mark.parametrize("overrides", [{}, {"bias": True}, {"expansion": 1}, {"lambda_start": -1.0}])
def test_fast_path_equals_analysis_path(overrides):
    model = tiny(**overrides)
    idx, targets = random_tokens(model), random_tokens(model, seed=1)
    logits, loss = model(idx, targets)
    logits2, loss2, layers = model.analyze(idx, targets)
    torch.testing.assert_close(logits, logits2, rtol=1e-4, atol=1e-5)
    assert abs(loss.item() - loss2.item()) < 1e-5
    attn = layers[0]["attn"]
    heads = 4
    assert attn.shape == (2, heads, 32, 32) and attn.triu(diagonal=1).abs().max() == 0
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, heads, 32))
    assert layers[0]["z"].shape == (2, 32, 32)


def test_training_moves_every_weight_and_fits_one_batch():
    model = tiny(n_embd=64)
    idx = random_tokens(model, B=4)
    x, y = idx[:, :-1], idx[:, 1:]
    opt = model.configure_optimizers(0.0, 3e-3, (0.9, 0.95), "cpu")
    for _ in range(300):
        loss = model(x, y)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.5:
            break
    assert loss.item() < 0.5, f"loss {loss.item():.3f} after 300 steps"
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_generate():
    model = tiny().eval()
    prompt = random_tokens(model, B=2, T=5)
    torch.manual_seed(1)
    a = model.generate(prompt, 40, temperature=0.8, top_k=20, top_p=0.9)  # past block_size 32
    torch.manual_seed(1)
    assert torch.equal(a, model.generate(prompt, 40, temperature=0.8, top_k=20, top_p=0.9))
    assert a.shape == (2, 45) and torch.equal(a[:, :5], prompt) and a.max() < 300
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
    ("n_head", 3), ("expansion", 0), ("signal_base", 1.0), ("noise_base", 0.5), ("dropout", 1.0),
    ("mlp_hidden", -1),
])
def test_bad_config_names_its_field(field, value):
    args = dict(n_head=2, n_embd=32)
    args[field] = value
    with pytest.raises(ValueError, match=f"PrismConfig.{field} "):
        PrismConfig(**args)


def test_build_model_rejects_unknown_fields():
    with pytest.raises(ValueError, match="no field 'n_heads'"):
        build_model("prism", n_heads=4)
    with pytest.raises(ValueError, match="unknown arch 'llama'"):
        build_model("llama")


def test_checkpoint_round_trip(tmp_path):
    model = tiny(bias=True, noise_base=2000.0)
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
    with pytest.raises(CheckpointError, match="damaged or truncated"):
        load_model(tmp_path / "cut.pt")
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


def test_flops_per_token_counts_both_streams():
    model = tiny()
    c = model.config
    attention = 12 * c.n_layer * (2 * c.n_head * c.head_dim) * c.block_size
    readout = 6 * sum(b.attn.dictionary.weight.numel() for b in model.transformer.h)  # D used twice
    assert model.flops_per_token() == 6 * model.get_num_params() + readout + attention
    assert model.estimate_mfu(4, 1.0, peak_flops=1e12) == pytest.approx(
        model.flops_per_token() * c.block_size * 4 / 1e12)
    assert math.isnan(model.estimate_mfu(4, 1.0, None))   # no known peak: no number


def test_a_lab_that_cannot_import_says_why_and_no_lab_is_an_unknown_arch(tmp_path, monkeypatch):
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


# -- the derivation, executable ----------------------------------------------------------------


def derivation_case(seed=0, n=48, d=24, K=3, p=8):
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, d, generator=g, dtype=torch.float64)
    U = torch.randn(K, p, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    return Z, U


# model.py §2 (a) and (b), written out: float64, β = p/(n ε²), W_k = Z U_k, G_k = W_k W_kᵀ.
def compressed_rate_gradient(Z, U, eps=0.5):
    """(a) ∇_Z R^c = Σ_k β (I_n + β G_k)⁻¹ W_k U_kᵀ."""
    beta, eye = U.shape[1] / (len(Z) * eps**2), torch.eye(len(Z), dtype=Z.dtype)
    return sum(beta * torch.linalg.solve(eye + beta * (Z @ Uk.T) @ (Z @ Uk.T).T, Z @ Uk.T) @ Uk for Uk in U)


def neumann_descent_direction(Z, U, eps=0.5):
    """(b) −∇_Z R^c to second order in β: Σ_k (−β W_k + β² G_k W_k) U_kᵀ."""
    beta = U.shape[1] / (len(Z) * eps**2)
    return sum((-beta * W + beta**2 * W @ W.T @ W) @ Uk for Uk in U for W in [Z @ Uk.T])


def test_closed_form_gradient_of_the_compressed_rate_equals_autograd():
    from model import compressed_coding_rate

    Z, U = derivation_case()
    for eps in (0.5, 2.0):
        Zr = Z.clone().requires_grad_(True)
        compressed_coding_rate(Zr, U, eps).backward()
        assert torch.allclose(compressed_rate_gradient(Z, U, eps), Zr.grad, rtol=0, atol=1e-12)


def test_second_order_series_matches_the_descent_direction_to_order_beta_squared():
    from model import neumann_radius

    Z, U = derivation_case()
    errors = []
    for eps in (40.0, 80.0):   # β = p/(nε²) falls 4x; both well inside the series' radius
        assert neumann_radius(Z, U, eps) < 0.05
        exact = -compressed_rate_gradient(Z, U, eps)
        errors.append(float((neumann_descent_direction(Z, U, eps) - exact).norm() / exact.norm()))
    assert errors[0] / errors[1] == pytest.approx(16, rel=0.05)   # relative error ∝ β²
    assert errors[0] < 1e-3


def own_rate_change(Z, Uk, eta, eps=0.5, softmax=False):
    """⟨η·S_k W_k U_kᵀ, ∇_Z R(Z U_k)⟩: head k's term against its own subspace's rate, with the
    linear similarity S = G_k or the causal softmax."""
    W = Z @ Uk.T
    n, p = W.shape
    S = (W @ W.T / math.sqrt(p)).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1),
                                             float("-inf")).softmax(-1) if softmax else W @ W.T
    return float((eta * S @ W @ Uk * compressed_rate_gradient(Z, Uk[None], eps)).sum())


def test_signal_terms_expand_their_own_rate_and_noise_terms_compress_it():
    """§5: with G_k, head k's term moves R(Z U_k) with the sign of η_k (signal +1 up, noise −λ
    down), overlapping subspaces or not; for the whole R^c the cross terms have no sign (§2's
    counterexample)."""
    for seed in range(5):
        Z, U = derivation_case(seed)
        for Uk in U:
            assert own_rate_change(Z, Uk, +1.0) > 0 and own_rate_change(Z, Uk, -0.1) < 0
    # d = 2, p = 1, ε = 1: tokens (−1,−1), (0,0), (3,3); u₁ = (−2, 3), u₂ = (−3, 1)
    Z = torch.tensor([[-1.0, -1.0], [0.0, 0.0], [3.0, 3.0]], dtype=torch.float64)
    U = torch.tensor([[[-2.0, 3.0]], [[-3.0, 1.0]]], dtype=torch.float64)
    kept = sum((Z @ Uk.T) @ (Z @ Uk.T).T @ (Z @ Uk.T) @ Uk for Uk in U)
    assert float((kept * compressed_rate_gradient(Z, U, 1.0)).sum()) == pytest.approx(-69100 / 559, rel=1e-12)
    assert own_rate_change(Z, U[0], 1.0, eps=1.0) > 0 and own_rate_change(Z, U[1], 1.0, eps=1.0) > 0


def test_the_causal_softmax_term_raises_its_own_rate_where_beta_is_small():
    """§5, exact for β → 0 and U_kᵀU_k = I: Σ_t Σ_s A_ts ⟨w_t, w_s⟩ ≥ Σ_t ⟨w_t, mean_{s≤t} w_s⟩ ≥ 0
    (Chebyshev per row, then Abel). Tokens drawn to make it hard (a shared offset, a far first
    token) and at ε = 1000 (β·λ_max ≪ 1) with orthonormal atoms; at the model's ε = 0.5 with
    other atoms the same draws give the wrong sign sometimes: the claim needs its conditions."""
    from model import neumann_radius

    g = torch.Generator().manual_seed(9)
    wrong = 0
    for trial in range(300):
        n, d, p = 3 + trial % 20, 6, 1 + trial % 3
        Z = torch.randn(n, d, generator=g, dtype=torch.float64) + 2 * torch.randn(1, d, generator=g, dtype=torch.float64)
        Z[0] *= 1 + trial % 5
        Q = torch.linalg.qr(torch.randn(d, p, generator=g, dtype=torch.float64))[0].T   # U_kᵀU_k = I
        W = Z @ Q.T
        A = (W @ W.T / math.sqrt(p)).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        prefix_mean = W.cumsum(0) / torch.arange(1, n + 1, dtype=torch.float64)[:, None]
        assert float((A @ W * W).sum()) >= float((prefix_mean * W).sum()) - 1e-9 >= -1e-9
        assert neumann_radius(Z, Q[None], 1000.0) < 0.05
        assert own_rate_change(Z, Q, 1.0, eps=1000.0, softmax=True) > 0
        wrong += own_rate_change(Z, torch.randn(p, d, generator=g, dtype=torch.float64), 1.0, softmax=True) < 0
    assert 0 < wrong < 300


def test_the_layer_is_not_a_descent_step_on_random_tokens():
    """Measured, not proven (§2): the causal softmax step has a negative cosine with −∇R^c and
    R^c rises along it; at β·λ_max ≫ 1 even the two-term series points uphill."""
    from model import compressed_coding_rate, neumann_radius

    def cosine(a, b):
        return float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))

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


def test_the_dropped_term_is_the_uniform_shrink_at_prisms_start_not_in_general():
    """§2 (c), §3: Σ_k β W_k U_kᵀ = βZ DᵀD = βZ for PRISM's initial dictionary (a tight frame of
    bound 1), not for a random one."""
    model = tiny()
    D = model.transformer.h[0].attn.subspaces().double()   # (2H, p, d)
    Z = torch.randn(48, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(sum((Z @ Uk.T) @ Uk for Uk in D), Z, rtol=0, atol=1e-5)
    torch.testing.assert_close((Z @ D.reshape(-1, 32).T).norm(), Z.norm(), rtol=1e-5, atol=0)  # ‖W‖ = ‖Z‖
    _, random = derivation_case()
    Zr = torch.randn(48, 24, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert F.cosine_similarity(sum((Zr @ Uk.T) @ Uk for Uk in random).flatten(), Zr.flatten(), dim=0) < 0.9


def test_the_series_radius_at_the_paper_models_initial_dictionary():
    """§2 (b): β·λ_max(G_k) at the paper's initial dictionary (a tight frame of 2048 atoms in
    R^512, 16 heads of p = 128) on 512 isotropic tokens at ε = 0.5 is about 370: far outside 1."""
    from model import neumann_radius

    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        D = torch.linalg.qr(torch.randn(2048, 512, generator=g, dtype=torch.float64))[0]
        Z = torch.randn(512, 512, generator=g, dtype=torch.float64)
        assert 330 < neumann_radius(Z, D.view(16, 128, 512)) < 420


def test_the_self_score_tops_only_keys_no_longer_than_the_token():
    """§3: with q = k a token's score with itself, ‖w_t‖², is at least its score with any key no
    longer than itself (Cauchy–Schwarz)."""
    model = tiny()
    layer = model.analyze(random_tokens(model))[2][0]
    q, k = layer["q"], layer["k"]
    scores, norms = q @ k.transpose(-2, -1), k.norm(dim=-1)
    shorter = norms[..., None, :] <= norms[..., :, None]
    diagonal = scores.diagonal(dim1=-2, dim2=-1)[..., None]
    assert (scores <= diagonal + 1e-5).masked_select(shorter).all()
    w = torch.tensor([[1.0, 0.0], [2.0, 0.5]])   # and only those: a longer key can beat it
    assert (w @ w.T)[0, 1] > (w @ w.T)[0, 0]


def band_facts(head_dim, signal_base=1e4 * math.pi, noise_base=1e4 / math.pi, context=512):
    """What the two bases of model.py §4 do, computed: each group's band, the ratio of noise pair i to signal
    pair i at the slow end, how many noise pairs lie inside the signal band, and how many pairs
    of each group turn less than once over `context` tokens."""
    signal, noise = rotary_frequencies(head_dim, signal_base), rotary_frequencies(head_dim, noise_base)
    return dict(pairs=len(signal), signal_band=(float(signal.min()), float(signal.max())),
                noise_band=(float(noise.min()), float(noise.max())),
                slowest_ratio=float(noise[-1] / signal[-1]),
                noise_inside_signal_band=int(((noise >= signal.min()) & (noise <= signal.max())).sum()),
                signal_longer_than_context=int((2 * math.pi / signal > context).sum()),
                noise_longer_than_context=int((2 * math.pi / noise > context).sum()))



@pytest.mark.parametrize("head_dim, context, long_signal, long_noise", [
    (128, 512, 36, 29),   # the paper's config (model.py §4)
    (64, 128, 22, 20),    # config/cpu_small.py
])
def test_pi_rope_band_facts(head_dim, context, long_signal, long_noise):
    f = band_facts(head_dim, context=context)
    assert f["signal_band"][1] == f["noise_band"][1] == 1.0   # pair 0: 1 rad/token in both
    assert f["noise_inside_signal_band"] == head_dim // 2     # the noise band inside the signal's
    assert f["slowest_ratio"] == pytest.approx(math.pi ** (4 * (head_dim // 2 - 1) / head_dim))
    assert (f["signal_longer_than_context"], f["noise_longer_than_context"]) == (long_signal, long_noise)
    off = band_facts(head_dim, 1e4, 1e4, context)
    assert off["signal_band"] == off["noise_band"] and off["slowest_ratio"] == 1
