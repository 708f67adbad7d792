"""analyze_heads.py: the metrics on hand-built tensors and through tiny models with planted
structure, the coding rates against a direct log-det, the figures, models where parts of the
analysis do not apply, and the command line."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import analyze_heads as ah
from checkpoint import checkpoint_payload
from model import build_model
from conftest import unsafe_message

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY = dict(vocab_size=64, block_size=32, n_layer=2, n_embd=32, n_head=2)  # 2 + 2 heads of p = 32


def tiny_prism(**kw):
    torch.manual_seed(0)
    return build_model("prism", **{**TINY, **kw})


def random_batches(vocab, n, B=2, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        xy = torch.randint(vocab, (B, T + 1), generator=g)
        yield xy[:, :-1], xy[:, 1:]


# -- attention distance and entropy ---------------------------------------------------------


def test_attention_metrics_on_hand_built_maps():
    T = 10
    attn = torch.zeros(2, 3, T, T)
    attn[:, 0, 0, 0] = 1
    attn[:, 0, torch.arange(1, T), torch.arange(T - 1)] = 1       # previous token only
    attn[:, 1] = torch.eye(T)                                       # itself only
    attn[:, 2] = torch.ones(T, T).tril() / torch.arange(1, T + 1)[:, None]  # uniform, causal
    s = ah.attention_sums(attn)
    n = s["n_queries"]
    assert n == 2 * (T - 1)
    i = np.arange(1, T)
    np.testing.assert_allclose((s["distance"] / n).numpy(), [1.0, 0.0, np.mean(i / 2)], atol=1e-12)
    np.testing.assert_allclose((s["entropy"] / n).numpy(), [0.0, 0.0, np.mean(np.log(i + 1))],
                               atol=1e-6)
    np.testing.assert_allclose((s["self_mass"] / n).numpy(), [0.0, 1.0, np.mean(1 / (i + 1))],
                               atol=1e-12)


def test_self_attention_and_distance_without_self_in_a_model(monkeypatch):
    """Every query puts half its mass on itself and half on the token 4 back (or on token 0 when
    closer): self_attention 0.5, and the distance without self is twice the plain mean distance."""
    T = 32
    attn = torch.zeros(T, T)
    for i in range(T):
        attn[i, i] += 0.5
        attn[i, max(i - 4, 0)] += 0.5
    model = tiny_prism()
    real = model.analyze

    def analyze(x, y):
        logits, loss, layers = real(x, y)
        for rec in layers:
            rec["attn"] = attn.expand_as(rec["attn"]).clone()
        return logits, loss, layers

    monkeypatch.setattr(model, "analyze", analyze)
    res = ah.analyze_model(model, random_batches(64, 2, T=T), num_batches=2, progress=False)
    dist = np.mean([0.5 * min(i, 4) for i in range(1, T)])
    for h in res["heads"]:
        assert h["self_attention"] == pytest.approx(0.5)
        assert h["mean_distance"] == pytest.approx(dist)
        assert h["mean_distance_no_self"] == pytest.approx(2 * dist)


# -- head spectrum and centroid -------------------------------------------------------------


@pytest.mark.parametrize("pairs, dims", [("interleaved", lambda i: (2 * i, 2 * i + 1)),  # PRISM
                                         ("halves", lambda i: (i, i + 4))])            # the lab's
def test_spectrum_is_mean_product_of_pair_norms(pairs, dims):
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 3, 5, 8, generator=g), torch.randn(2, 3, 5, 8, generator=g)
    E, n = ah.spectrum_sums(q, k, pairs)
    assert n == 10 and E.shape == (3, 4)
    for h in range(3):
        for i in range(4):
            a, b_ = dims(i)
            direct = np.mean([math.hypot(q[b, h, t, a], q[b, h, t, b_])
                              * math.hypot(k[b, h, t, a], k[b, h, t, b_])
                              for b in range(2) for t in range(5)])
            assert float(E[h, i]) / n == pytest.approx(direct, rel=1e-5)


def test_centroid_of_one_pair_is_its_frequency():
    freqs = torch.tensor([[1.0, 0.1, 0.01, 0.001], [math.pi, 0.1 * math.pi, 0.01 * math.pi,
                                                    0.001 * math.pi]], dtype=torch.float64)
    q = torch.zeros(1, 2, 6, 8)
    q[..., 4] = torch.randn(1, 2, 6)        # pair 2 = dims (4, 5)
    q[..., 5] = torch.randn(1, 2, 6)
    E, _ = ah.spectrum_sums(q, q)
    assert torch.all(E[:, [0, 1, 3]] == 0)
    np.testing.assert_allclose(ah.spectral_centroid(E, freqs).numpy(), freqs[:, 2].numpy())
    # equal energy on two pairs: the geometric mean of their frequencies
    c = ah.spectral_centroid(torch.tensor([[1.0, 0, 1.0, 0]]), freqs[:1])
    assert float(c[0]) == pytest.approx(math.sqrt(1.0 * 0.01))


# -- coding rates ---------------------------------------------------------------------------


def direct_rate(Z, eps):
    n, d = Z.shape
    return 0.5 * np.linalg.slogdet(np.eye(d) + d / (n * eps**2) * Z.T @ Z)[1]


def test_coding_rates_equal_direct_logdet():
    rng = np.random.default_rng(0)
    Z = rng.standard_normal((50, 12))
    U = rng.standard_normal((3, 4, 12)) * 0.3          # (K, p, d): each U_kᵀ
    eps = 0.7
    out = ah.mcr2_diagnostics(torch.from_numpy(Z), torch.from_numpy(U), eps)
    R = direct_rate(Z, eps)
    Rc = sum(direct_rate(Z @ Uk.T, eps) for Uk in U)
    Rc_orth = sum(direct_rate(Z @ np.linalg.qr(Uk.T)[0], eps) for Uk in U)
    assert out["R"] == pytest.approx(R, rel=1e-9)
    assert out["Rc"] == pytest.approx(Rc, rel=1e-9)
    assert out["dR"] == pytest.approx(R - Rc, rel=1e-9)
    assert out["Rc_orth"] == pytest.approx(Rc_orth, rel=1e-9)
    assert out["dR_orth"] == pytest.approx(R - Rc_orth, rel=1e-9)
    assert ah.mcr2_diagnostics(torch.from_numpy(Z), None, eps)["Rc"] is None


def test_layer_rates_pool_the_layer_inputs():
    model = tiny_prism()
    batches = list(random_batches(64, 2))
    res = ah.analyze_model(model, batches, eps=0.5, max_tokens=10_000, num_batches=2,
                           progress=False)
    with torch.no_grad():
        zs = [[rec["z"].reshape(-1, 32) for rec in model.analyze(x)[2]] for x, _ in batches]
    for l, layer in enumerate(res["layers"]):
        Z = torch.cat([z[l] for z in zs]).double().numpy()
        assert layer["n_tokens"] == 64
        assert layer["R"] == pytest.approx(direct_rate(Z, 0.5), rel=1e-6)
        U = model.subspaces(l).detach().double().numpy()
        assert layer["Rc"] == pytest.approx(sum(direct_rate(Z @ Uk.T, 0.5) for Uk in U), rel=1e-6)
    capped = ah.analyze_model(model, batches, max_tokens=20, num_batches=2, progress=False)
    assert [d["n_tokens"] for d in capped["layers"]] == [20, 20]


# -- planted structure through real models --------------------------------------------------


@torch.no_grad()
def test_planted_self_head_through_model():
    """Head 0 of layer 0 gets a constant W_k on rotary pair 0, where ω = 1 (every token enters
    the layer as e_0: the LayerNorm's gain 0, its bias e_0): with q = k its score with the key Δ
    back is s² cos(Δ)/√p, largest at Δ = 0 (q = k cannot plant a previous-token head: every
    constant head peaks at itself). Below it, within 15 tokens, comes Δ = 6 (cos 6 = 0.960, 11
    nats lower at s = 40, p = 32): the attention stays on the token itself, and the little that
    leaves it goes 6 back, which is what the distance without self shows."""
    model = tiny_prism(bias=True)
    block = model.transformer.h[0]
    block.ln_1.weight.zero_()
    block.ln_1.bias.zero_()
    block.ln_1.bias[0] = 1.0                                   # every token is e_0 here
    p = 32
    block.attn.dictionary.weight[:p] = 0
    block.attn.dictionary.weight[0, 0] = 40.0                  # pair 0 = dims (0, 1) = (40, 0)
    assert float(model.rope_frequencies(0)[0, 0]) == 1.0     # ω of pair 0 of a signal head
    res = ah.analyze_model(model, random_batches(64, 2), num_batches=2, progress=False)
    head = next(h for h in res["heads"] if h["layer"] == 0 and h["head"] == 0)
    assert head["self_attention"] == pytest.approx(1.0, abs=1e-5)
    assert head["mean_distance"] == pytest.approx(0.0, abs=1e-4)
    assert head["entropy"] == pytest.approx(0.0, abs=1e-3)
    assert head["mean_distance_no_self"] == pytest.approx(6.0, abs=0.1)  # float32 1 − A_ii
    # its energy sits on pair 0 only: the centroid is ω_0 = 1
    assert head["spectral_centroid"] == pytest.approx(1.0, rel=1e-9)


@torch.no_grad()
def test_planted_single_pair_heads_through_model():
    """q = k = Uᵀz: keeping one row pair of a head's dictionary puts all its energy on that pair."""
    model = tiny_prism()
    p = model.config.head_dim
    freqs = model.rope_frequencies(1)
    plant = {0: 5, 3: 1}                                       # signal head 0, noise head 3
    W = model.transformer.h[1].attn.dictionary.weight
    for h, i in plant.items():
        keep = W[[h * p + 2 * i, h * p + 2 * i + 1]].clone()   # pair i = dims (2i, 2i + 1)
        W[h * p:(h + 1) * p] = 0
        W[h * p + 2 * i], W[h * p + 2 * i + 1] = keep
    res = ah.analyze_model(model, random_batches(64, 2), num_batches=2, progress=False)
    for h, i in plant.items():
        head = next(x for x in res["heads"] if x["layer"] == 1 and x["head"] == h)
        assert head["spectral_centroid"] == pytest.approx(float(freqs[h, i]), rel=1e-9)
        assert head["centroid_in_band"] == pytest.approx(float(freqs[h, i] / freqs[h, 0]))
        assert sum(v > 0 for v in head["spectrum"]) == 1
    assert [h["group"] for h in res["heads"][:4]] == ["signal", "signal", "noise", "noise"]


# -- output files, and what does not apply --------------------------------------------------


def check_outputs(out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name in ("head_spectra.png", "distance_vs_centroid.png", "coding_rate.png"):
        path = out_dir / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE, name
        img = plt.imread(path)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100, name
        assert img.std() > 0.01, name   # not a blank image
        if name == "head_spectra.png":  # a grid of panels, not one long strip
            assert img.shape[1] < 3 * img.shape[0], img.shape
    return json.loads((out_dir / "heads.json").read_text())


def test_figures_and_json(tmp_path):
    res = ah.analyze_model(tiny_prism(), random_batches(64, 2), num_batches=2, progress=False)
    ah.write_outputs(res, tmp_path)
    data = check_outputs(tmp_path)
    assert len(data["heads"]) == 8 and len(data["layers"]) == 2
    assert data["not_applicable"] == {}
    for key in ("contrasts", "contrast_tests", "layers", "heads", "eps", "val_loss"):
        assert key in data


def test_model_without_rotary_groups_or_dictionary(tmp_path, monkeypatch):
    model = tiny_prism()
    monkeypatch.setattr(model, "rope_frequencies", lambda *a: None)
    monkeypatch.setattr(model, "head_groups", lambda: None)
    monkeypatch.setattr(model, "subspaces", lambda layer: None)
    res = ah.analyze_model(model, random_batches(64, 2), num_batches=2, progress=False)
    ah.write_outputs(res, tmp_path)
    data = check_outputs(tmp_path)
    na = data["not_applicable"]
    for key in ("spectrum", "spectral_centroid", "group", "contrasts", "Rc", "dR"):
        assert isinstance(na.get(key), str) and na[key], key
    assert data["contrasts"] is None
    for h in data["heads"]:
        assert h["spectral_centroid"] is None and h["group"] is None
        assert h["mean_distance"] is not None and h["entropy"] is not None
    for layer in data["layers"]:
        assert layer["R"] is not None and layer["Rc"] is None and layer["dR"] is None



# -- command line ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_data(stories, tmp_path_factory):
    import tiktoken

    enc = tiktoken.get_encoding("gpt2")
    text = stories[1].read_text(encoding="utf-8")[:6000]
    d = tmp_path_factory.mktemp("data")
    np.array(enc.encode(text, allowed_special={"<|endoftext|>"}), dtype=np.uint16).tofile(
        d / "val.bin")
    (d / "meta.json").write_text(json.dumps({"tokenizer": "gpt2", "vocab_size": 50257,
                                             "eot_token": 50256}))
    return d


@pytest.fixture(scope="module")
def gpt2_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("prism", **{**TINY, "vocab_size": 50257})
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.pt"
    torch.save(checkpoint_payload(model), path)
    return path


def test_cli_end_to_end(gpt2_ckpt, gpt2_data, tmp_path, capsys):
    out = tmp_path / "analysis"
    rc = ah.main([f"--ckpt={gpt2_ckpt}", f"--data_dir={gpt2_data}", f"--out_dir={out}",
                  "--num_batches=3", "--batch_size=2", "--block_size=24", "--max_tokens=100",
                  "--eps=0.5", "--device=cpu", "--word=time", "--no_progress"])
    assert rc == 0
    data = check_outputs(out)
    for h in data["heads"]:
        for key in ("layer", "head", "group", "mean_distance", "mean_distance_no_self",
                    "self_attention", "entropy", "spectral_centroid", "centroid_in_band"):
            assert key in h
    for layer in data["layers"]:
        assert {"R", "Rc", "dR", "neumann_radius"} <= layer.keys() and layer["n_tokens"] == 100
    assert data["data"]["block_size"] == 24 and data["tokens_analyzed"] == 3 * 2 * 24
    assert math.isfinite(data["val_loss"])
    out = capsys.readouterr().out
    # the loss is said to be over evenly spaced windows, unlike training's
    assert f"loss {data['val_loss']:.4f}: the mean over 6 evenly spaced windows of val" in out
    assert "label-shuffle p" in out and "4 figures" in out and (tmp_path / "analysis" / "word_attention.png").is_file()
    ah.main([f"--ckpt={gpt2_ckpt}", f"--data_dir={gpt2_data}", f"--out_dir={tmp_path / 'b'}",
             "--num_batches=1", "--block_size=24", "--word=zebra", "--no_progress"])
    assert "no 'zebra' of its own in val.bin" in capsys.readouterr().out
    assert not (tmp_path / "b" / "word_attention.png").exists()
    # --no_figures (what the lab's records use): heads.json, the same numbers, no figure
    ah.main([f"--ckpt={gpt2_ckpt}", f"--data_dir={gpt2_data}", f"--out_dir={tmp_path / 'c'}",
             "--num_batches=1", "--block_size=24", "--no_progress", "--no_figures"])
    assert "0 figures" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["heads.json"]
    assert json.loads((tmp_path / "c" / "heads.json").read_text())["heads"] == \
        json.loads((tmp_path / "b" / "heads.json").read_text())["heads"]


def test_cli_defaults_to_the_newest_checkpoint_on_its_own_data(compact_data, tmp_path,
                                                               monkeypatch, capsys):
    import train

    monkeypatch.chdir(tmp_path)
    cfg = train.TrainConfig(data_dir=str(compact_data), out_dir="out/run", max_iters=2,
                            eval_interval=2, eval_iters=1, batch_size=2, warmup_iters=1)
    train.train(cfg, dict(n_layer=1, n_embd=32, n_head=2, block_size=32))
    capsys.readouterr()
    assert ah.main(["--num_batches=2", "--batch_size=1", "--max_tokens=16", "--device=cpu",
                    "--no_progress"]) == 0
    data = json.loads((tmp_path / "out" / "analysis" / "heads.json").read_text())
    assert data["data"]["ckpt"] == str(Path("out") / "run" / "ckpt.pt")
    assert data["data"]["data_dir"] == str(compact_data)
    assert capsys.readouterr().err.startswith(f"loaded {Path('out') / 'run' / 'ckpt.pt'}: prism, ")


@pytest.mark.parametrize("case", ["missing_ckpt", "corrupt_ckpt", "missing_data", "bad_tokens",
                                  "too_long", "bad_eps", "no_data_dir"])
def test_cli_errors(case, gpt2_ckpt, gpt2_data, tmp_path, capsys):
    ckpt, data, extra = gpt2_ckpt, gpt2_data, []
    if case == "missing_ckpt":
        ckpt = tmp_path / "nope.pt"
    elif case == "corrupt_ckpt":
        ckpt = tmp_path / "bad.pt"
        ckpt.write_bytes(b"not a checkpoint")
    elif case == "missing_data":
        data = tmp_path
    elif case == "bad_tokens":
        data = tmp_path
        np.array([1, 2, 60000] * 20, dtype=np.uint16).tofile(data / "val.bin")
    elif case == "too_long":
        extra = ["--block_size=33"]
    elif case == "bad_eps":
        extra = ["--eps=0"]
    rc = ah.main([f"--ckpt={ckpt}", f"--out_dir={tmp_path / 'o'}", "--num_batches=1",
                  "--no_progress", *extra,
                  *([] if case == "no_data_dir" else [f"--data_dir={data}"])])
    err = capsys.readouterr().err
    assert rc == 2
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and err.endswith(errors[0] + "\n")


def test_cli_refuses_a_checkpoint_carrying_code(unsafe_ckpt, gpt2_data, tmp_path, capsys):
    path, marker = unsafe_ckpt
    rc = ah.main([f"--ckpt={path}", f"--data_dir={gpt2_data}", f"--out_dir={tmp_path / 'o'}",
                  "--num_batches=1", "--no_progress"])
    assert rc == 2 and capsys.readouterr().err == unsafe_message(path) + "\n"
    assert not marker.exists() and not (tmp_path / "o").exists()


# -- signal vs noise contrasts and their tests ----------------------------------------------


def synthetic_heads(rng, split=0.0, layer_effect=(0.0, 0.0, 0.0, 0.0), heads=8):
    """heads.json-like heads: per layer, half signal then half noise; log mean distance and log
    centroid_in_band are layer effect + split for signal heads (− split for the centroid) + N(0, 1)
    head noise, so `split` is the designed effect in standard deviations of the heads."""
    out = []
    for layer, offset in enumerate(layer_effect):
        for h in range(heads):
            signal = h < heads // 2
            noise = rng.standard_normal(3)
            out.append(dict(layer=layer, head=h, group="signal" if signal else "noise",
                            mean_distance=math.exp(offset + split * signal + noise[0]),
                            mean_distance_no_self=math.exp(offset + split * signal + noise[1]),
                            centroid_in_band=math.exp(offset - split * signal + noise[2]),
                            self_attention=0.1))
    return out


def test_a_layer_effect_cancels_in_the_contrasts():
    base = synthetic_heads(np.random.default_rng(0))
    shifted = synthetic_heads(np.random.default_rng(0), layer_effect=(0, 0, 0, 6.0))
    for a, b in zip(ah.layer_contrasts(base), ah.layer_contrasts(shifted)):
        for c in ah.CONTRASTS:
            assert a[c] == pytest.approx(b[c], abs=1e-9)


def rejection_rate(test, draws, make):
    rng = np.random.default_rng(123)
    return np.mean([test(make(rng)) <= 0.05 for _ in range(draws)])


@pytest.mark.parametrize("contrast", ["log_distance", "log_centroid_in_band"])
def test_label_permutation_test_has_power_and_stays_quiet(contrast):
    def p(heads):
        return ah.label_permutation_test(heads, contrast, draws=299)["p"]

    # 32 heads (4 layers of 4 signal + 4 noise), the designed split 1 SD: found most of the time
    assert rejection_rate(p, 40, lambda r: synthetic_heads(r, split=1.0)) > 0.6
    # no split, with or without a layer effect: about the test's level
    assert rejection_rate(p, 80, lambda r: synthetic_heads(r)) < 0.13
    assert rejection_rate(p, 80, lambda r: synthetic_heads(r, layer_effect=(0, 0, 0, 6.0))) < 0.13


# -- MCR² diagnostics: what the normalised rate does ----------------------------------------


def test_normalised_rate_is_scale_free_and_negative_for_an_ideal_overcomplete_dictionary():
    torch.manual_seed(0)
    d, p, n = 64, 16, 2048
    for K, sign in ((4, 1), (8, -1)):   # ρ = 1 (a complete orthonormal split) and ρ = 2
        if K == 4:
            U = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64)).Q.T.reshape(K, p, d)
        else:
            U = torch.linalg.qr(torch.randn(K, d, p, dtype=torch.float64)).Q.transpose(1, 2)
        # ideal data: every token lies in one subspace of the dictionary
        Z = torch.einsum("np,npd->nd", torch.randn(n, p, dtype=torch.float64), U[torch.arange(n) % K])
        Z = Z / Z.norm(dim=1, keepdim=True) * math.sqrt(d)
        out = ah.mcr2_diagnostics(Z, U, 0.5)
        scaled = ah.mcr2_diagnostics(Z, 3 * U, 0.5)
        assert scaled["Rc_orth"] == pytest.approx(out["Rc_orth"], rel=1e-9)
        assert scaled["Rc"] > out["Rc"] + 10  # the raw rate grows with the scale of U
        assert sign * out["dR_orth"] > 0      # ρ = 2: ΔR < 0 even though the data are ideal


def test_neumann_radius_and_frame_bounds_at_the_paper_models_start():
    # PRISM-50M's first dictionary: a tight frame of 2048 atoms in R^512 (16 heads of p = 128), on
    # 512 LayerNorm-scale tokens: the radius is about 370 (model.py §2), the frame bounds both 1
    g = torch.Generator().manual_seed(0)
    D = torch.linalg.qr(torch.randn(2048, 512, generator=g, dtype=torch.float64))[0]
    Z = torch.randn(512, 512, generator=g, dtype=torch.float64)
    out = ah.mcr2_diagnostics(Z, D.view(16, 128, 512), 0.5)
    assert 330 < out["neumann_radius"] < 420
    assert out["frame_bounds"] == pytest.approx([1.0, 1.0], abs=1e-9)
    assert ah.mcr2_diagnostics(Z, 3 * D.view(16, 128, 512), 0.5)["frame_bounds"] == pytest.approx([9.0, 9.0])


# -- the author's picture: every head's attention from one word ---------------------------------


def test_the_word_is_found_in_its_story_and_every_head_is_drawn(tmp_path):
    from sample import load_tokenizer

    tok = load_tokenizer(None)   # GPT-2's
    stories = ["Tom had a red ball.", "The cat sat by the door. Then the door opened."]
    data = np.array([t for s in stories for t in tok.encode(s) + [tok.eot]], dtype=np.uint16)
    tokens, position = ah.find_word(data, tok, "door", block_size=64)
    assert tok.decode_bytes(tokens.tolist()).decode() == "The cat sat by the door"  # from its story
    assert position == len(tokens) - 1
    assert ah.find_word(data, tok, "door", block_size=3)[0].tolist() == tok.encode(" by the door")
    assert ah.find_word(data, tok, "zebra", block_size=64) is None
    model = tiny_prism(vocab_size=50257).eval()
    fig = ah.plot_word_attention(model, tokens, position, tok, tmp_path / "word.png")
    assert (tmp_path / "word.png").read_bytes()[:8] == PNG_SIGNATURE
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == [f"layer {l}, {g} heads" for l in range(2) for g in ("signal", "noise")]
