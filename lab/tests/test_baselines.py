import pytest
import torch

from analyze_heads import analyze_model
from model import build_model, checkpoint_payload, load_model
from lab.baselines import PRESETS, VARIANTS, Gemma3Config, GPT2Config, check_preset, count_params, model_size, variant_args

TINY = {
    "gpt2": dict(n_layer=2, n_embd=32, n_head=4),
    "gemma3": dict(n_layer=3, n_embd=32, n_head=4, head_dim=8, mlp_hidden=40, sliding_window=5,
                   global_every=3),
}


def tiny(arch):
    torch.manual_seed(0)
    return build_model(arch, vocab_size=300, block_size=32, **TINY[arch])


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("vocab_size", [50257, 4097, 513])
def test_every_variant_matches_prism_parameter_count(preset, vocab_size):
    params = check_preset(preset, vocab_size)
    assert set(params) == set(VARIANTS)
    for variant in VARIANTS:
        n = count_params(*variant_args(preset, variant, vocab_size))
        assert n == params[variant] and abs(n / params["prism"] - 1) <= 0.05, variant


def test_ablations_that_remove_weights_get_them_back_in_the_mlp():
    d = PRESETS["cpu-small"]["prism"]["n_embd"]
    prism = count_params(*variant_args("cpu-small", "prism", 4097))
    for variant, wider in (("prism-complete", True), ("prism-tied", True), ("prism-qk", False),
                           ("prism-separate", False)):
        arch, args = variant_args("cpu-small", variant, 4097)
        assert (args["mlp_hidden"] > 4 * d) == wider
        # the width is the best integer: one unit more or less moves the count further from PRISM's
        n = count_params(arch, args)
        for step in (-1, 1):
            assert abs(count_params(arch, dict(args, mlp_hidden=args["mlp_hidden"] + step)) - prism) \
                >= abs(n - prism)
    # constraints that change no weight count keep the 4d MLP
    assert "mlp_hidden" not in variant_args("cpu-small", "prism-pi-off", 4097)[1]
    arch, args = variant_args("cpu-small", "rope-attention", 4097)
    assert args["n_head"] * args["head_dim"] == args["n_embd"] and args["qkv_sharing"] == "none"


def test_model_size_reports_the_attention_work_beside_the_parameters():
    # At the same parameter count, PRISM at ρ = 2 forms scores over twice the dimensions of
    # plain attention at H·p = d: the 12·L·H·p·T term doubles.
    args = {v: variant_args("cpu-small", v, 4097) for v in ("prism", "rope-attention")}
    (n_p, f_p), (n_r, f_r) = (model_size(*args[v]) for v in ("prism", "rope-attention"))
    assert n_p == n_r
    assert (f_p - 6 * n_p) == pytest.approx(2 * (f_r - 6 * n_r))


def test_mismatched_preset_stops_with_a_message(monkeypatch):
    monkeypatch.setitem(PRESETS["cpu-small"], "gpt2", dict(n_layer=8, n_embd=128, n_head=4))
    with pytest.raises(ValueError, match="gpt2 has .* off PRISM's"):
        check_preset("cpu-small", 4097)


def test_variants_are_config_values():
    assert variant_args("cpu-small", "prism-pi-off", 4097)[1]["rope_ratio"] == 1.0
    arch, args = variant_args("cpu-small", "prism-complete", 4097)
    assert arch == "prism" and args["n_head"] * args["head_dim"] == args["n_embd"]
    with pytest.raises(ValueError, match="unknown variant"):
        variant_args("cpu-small", "prism-xl", 4097)
    with pytest.raises(ValueError, match="unknown preset"):
        variant_args("gpu-huge", "prism", 4097)


@pytest.mark.parametrize("arch", ["gpt2", "gemma3"])
def test_baseline_causal_and_analysis_path_equal(arch):
    model = tiny(arch)
    idx = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    logits, _ = model(idx)
    logits2, _, layers = model.analyze(idx)
    assert torch.allclose(logits, logits2, atol=1e-5)
    changed = idx.clone()
    changed[:, 20] = (idx[:, 20] + 1) % 300
    assert torch.equal(model(changed)[0][:, :20], logits[:, :20])
    assert len(layers) == model.config.n_layer


def test_gemma_local_layers_see_only_their_window():
    model = tiny("gemma3")
    cfg = model.config
    _, _, layers = model.analyze(torch.randint(0, 300, (1, 32)))
    for layer, record in enumerate(layers):
        attn = record["attn"][0]
        i, j = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
        allowed = (j <= i) & ((i - j) < (32 if cfg.is_global(layer) else cfg.sliding_window))
        assert attn[:, ~allowed].abs().sum() == 0
        assert attn[:, allowed].min() > 0
    assert [cfg.is_global(l) for l in range(3)] == [False, False, True]
    assert model.rope_frequencies(0)[0, 1] == pytest.approx(1e4 ** (-2 / 8))
    assert model.rope_frequencies(2)[0, 1] == pytest.approx(1e6 ** (-2 / 8))


def test_gpt2_has_learned_positions_and_no_rotary_heads():
    model = tiny("gpt2")
    assert model.transformer.wpe.weight.shape == (32, 32)
    assert model.rope_frequencies() is None and model.subspaces(0) is None
    assert model.head_groups() is None


@pytest.mark.parametrize("field,value,cls", [
    ("n_embd", 30, GPT2Config), ("n_head", 0, GPT2Config), ("head_dim", 7, Gemma3Config),
    ("sliding_window", 0, Gemma3Config),
])
def test_bad_baseline_config_names_its_field(field, value, cls):
    with pytest.raises(ValueError, match=f"{cls.__name__}.{field} "):
        cls(**{"n_head": 4, field: value})


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_trains_and_samples(variant, tmp_path):
    arch, args = variant_args("cpu-small", variant, 512)
    args.update(n_layer=2, block_size=32)
    if arch == "gemma3":
        args.update(global_every=2, sliding_window=8)
    torch.manual_seed(0)
    model = build_model(arch, **args)
    data = torch.randint(0, 512, (8, 33), generator=torch.Generator().manual_seed(0))
    opt = model.configure_optimizers(0.1, 3e-3, (0.9, 0.95), "cpu")
    losses = []
    for _ in range(20):
        loss = model(data[:, :-1], data[:, 1:])[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3
    torch.save(checkpoint_payload(model), tmp_path / "ckpt.pt")
    loaded = load_model(tmp_path / "ckpt.pt")
    assert loaded.generate(data[:1, :4], 10).shape == (1, 14)
    assert count_params(arch, args) == model.get_num_params()
    heads = analyze_model(loaded, [(data[:2, :-1], data[:2, 1:])], max_tokens=64, progress=False)
    assert len(heads["heads"]) == args["n_layer"] * args["n_head"]
    assert all(h["mean_distance"] >= 0 for h in heads["heads"])
    assert (heads["bimodality"] is None) == (arch == "gpt2")  # no rotary heads, nothing to split
