import json
from pathlib import Path

import pytest
import torch

from analyze_heads import analyze_model
from model import build_model, checkpoint_payload, get_arch, load_model
from lab.baselines import Gemma3Config, GPT2Config, RopeAttentionConfig
from lab.variants import (PRESETS, RETIRED, VARIANTS, check_preset, count_params, model_size,
                          preset_sizes, variant_args)

RESULTS = Path(__file__).resolve().parent.parent / "results"

TINY = {
    "gpt2": dict(n_layer=2, n_embd=32, n_head=4),
    "gemma3": dict(n_layer=3, n_embd=32, n_head=4, head_dim=8, mlp_hidden=40, sliding_window=5,
                   global_every=3),
    "rope-attention": dict(n_layer=2, n_embd=32, n_head=4, head_dim=8),
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


def test_variant_args_are_what_every_record_was_made_with():
    """compare.py reads a record only if its model_args are the variant's exactly: every record of
    a live variant still reads, with the parameter count it reported."""
    checked = set()
    for path in sorted(RESULTS.glob("cpu-small/*/*/seed*/summary.json")):
        summary = json.loads(path.read_text())
        if summary["variant"] not in VARIANTS:
            continue
        arch, args = variant_args(summary["preset"], summary["variant"],
                                  summary["data"]["vocab_size"])
        assert args == summary["model_args"], path
        if "params" in summary:  # the init-only records carry no count
            assert count_params(arch, args) == summary["params"], path
        checked.add(summary["variant"])
    # Not vacuous: every arm of a committed comparison was checked (a variant still being
    # screened may have no records yet).
    assert {"prism", "prism-pi-off", "prism-complete", "gpt2", "gemma3", "rope-attention",
            "prism-white", "prism-white-ista"} <= checked


def test_retired_candidates_keep_their_records_and_are_gone_from_the_code():
    for name, retired in RETIRED.items():
        assert name not in VARIANTS
        assert len(retired["commit"]) >= 7 and retired["reason"]
        summaries = [json.loads(p.read_text())
                     for p in RESULTS.glob(f"cpu-small/{name}/*/seed*/summary.json")]
        assert summaries, name
        assert {s["params"] for s in summaries} == {retired["params"]["cpu-small"]}, name
        # the count beyond 6 per weight is the attention PRISM's sizes imply (12·L·H·p·T), plus,
        # for the tied ISTA block, its dictionary's second use (6·L·d·m)
        args = summaries[0]["model_args"]
        beyond = retired["flops_per_token"]["cpu-small"] - 6 * retired["params"]["cpu-small"]
        attention = 12 * args["n_layer"] * args["n_head"] * args["head_dim"] * args["block_size"]
        reused = 6 * args["n_layer"] * args["n_embd"] * args.get("mlp_hidden", 0) \
            if args.get("mlp") == "ista-tied" else 0
        assert beyond == attention + reused, name


def test_ablations_that_remove_weights_get_them_back_in_the_mlp():
    d = PRESETS["cpu-small"]["prism"]["n_embd"]
    prism = count_params(*variant_args("cpu-small", "prism", 4097))
    for variant, wider in (("prism-complete", True), ("prism-white-ista-complete", True),
                           ("prism-ista", False)):
        arch, args = variant_args("cpu-small", variant, 4097)
        assert (args["mlp_hidden"] > 4 * d) == wider
        # the width is the best integer: one unit more or less moves the count further from PRISM's
        n = count_params(arch, args)
        for step in (-1, 1):
            assert abs(count_params(arch, dict(args, mlp_hidden=args["mlp_hidden"] + step)) - prism) \
                >= abs(n - prism)
    # changes that add no weight, or too few to buy one MLP unit, keep the 4d MLP
    for variant in ("prism-pi-off", "prism-rotated-values", "prism-white"):
        assert "mlp_hidden" not in variant_args("cpu-small", variant, 4097)[1], variant


def test_rope_attention_is_plain_attention_at_prism_size():
    arch, args = variant_args("cpu-small", "rope-attention", 4097)
    assert arch == "rope-attention" and args["n_head"] * args["head_dim"] == args["n_embd"]
    # q, k, v apart at H·p = d: 3d² + the d² back-projection, PRISM's 2d² + 2d² at ρ = 2
    assert count_params(arch, args) == count_params(*variant_args("cpu-small", "prism", 4097)) \
        == 1_320_064
    model = tiny("rope-attention")
    assert not hasattr(model.transformer, "wpe")  # RoPE carries the positions
    assert torch.equal(model.rope_frequencies(0)[3], model.rope_frequencies(0)[0])  # one band
    assert model.subspaces(0) is None and model.head_groups() is None


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
    arch, args = variant_args("cpu-small", "prism-white-ista", 4097)
    assert arch == "prism-white" and args["mlp"] == "ista" and args["mask_self"]
    with pytest.raises(ValueError, match="unknown variant"):
        variant_args("cpu-small", "prism-xl", 4097)
    with pytest.raises(ValueError, match="unknown preset"):
        variant_args("gpu-huge", "prism", 4097)


def test_presets_take_prism_sizes_from_the_config_files():
    import train  # noqa: PLC0415

    root = Path(__file__).resolve().parents[2]
    for preset, name in (("cpu-small", "cpu_small.py"), ("paper-50m", "prism_50m.py")):
        settings = train.read_config_file(str(root / "config" / name))
        sizes = preset_sizes(preset, "prism")
        assert sizes == {k: settings[k] for k in ("n_layer", "n_embd", "n_head", "head_dim",
                                                  "block_size")}
        assert preset_sizes(preset, "prism-white") == sizes  # the PRISM family shares them


@pytest.mark.parametrize("arch", ["gpt2", "gemma3", "rope-attention", "prism-white"])
def test_sizes_like_prism_gives_the_arch_at_the_preset_of_those_prism_sizes(arch):
    model_cls = get_arch(arch)[1]
    for preset in PRESETS:
        prism = preset_sizes(preset, "prism")
        assert model_cls.sizes_like_prism(prism) == preset_sizes(preset, arch)
    # the fields both configs have come along, PRISM-only ones do not
    got = model_cls.sizes_like_prism(dict(preset_sizes("cpu-small", "prism"), dropout=0.1,
                                          rope_ratio=1.0))
    assert got["dropout"] == 0.1 and ("rope_ratio" in got) == (arch == "prism-white")
    get_arch(arch)[0](**got)  # a valid config of the arch
    if arch != "prism-white":  # any PRISM is a prism-white; the baselines exist at the presets
        with pytest.raises(ValueError, match=f"{arch} has sizes matched to PRISM only at .*n_layer=3"):
            model_cls.sizes_like_prism(dict(preset_sizes("cpu-small", "prism"), n_layer=3))


@pytest.mark.parametrize("arch", ["gpt2", "gemma3", "rope-attention"])
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
    ("sliding_window", 0, Gemma3Config), ("head_dim", 5, RopeAttentionConfig),
    ("rope_theta", 1.0, RopeAttentionConfig),
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
    assert loaded.arch == arch
    assert loaded.generate(data[:1, :4], 10).shape == (1, 14)
    assert count_params(arch, args) == model.get_num_params()
    heads = analyze_model(loaded, [(data[:2, :-1], data[:2, 1:])], max_tokens=64, progress=False)
    assert len(heads["heads"]) == args["n_layer"] * args["n_head"]
    assert all(h["mean_distance"] >= 0 for h in heads["heads"])
    # no rotary heads, no spectrum to measure
    assert all(h["spectral_centroid"] is None for h in heads["heads"]) == (arch == "gpt2")
