import json
import math
from pathlib import Path

import pytest
import torch

from analyze_heads import analyze_model
from checkpoint import checkpoint_payload, load_model
from configurator import read_config_file
from model import build_model, get_arch
from lab.baselines import Gemma3Config, GPT2Config, RopeAttentionConfig
from lab.variants import (PRESETS, RETIRED, VARIANTS, check_preset, count_params, family_base,
                          model_size, preset_sizes, sizes_like_prism, variant_args)

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


def test_each_family_is_sized_against_its_own_base():
    """The author's PRISM and its ablations are matched to "prism", our reconstruction and its
    white-box variants to "recon", the baselines to neither; a family variant's MLP width is the
    integer whose count is nearest its base's (a FLOPs-capped one may only be narrower)."""
    assert {v: family_base(VARIANTS[v][0]) for v in ("prism", "prism-untied", "recon",
                                                      "prism-white", "prism-white-sandwich",
                                                      "gpt2", "gemma3", "rope-attention")} == {
        "prism": "prism", "prism-untied": "prism", "recon": "recon", "prism-white": "recon",
        "prism-white-sandwich": "recon", "gpt2": None, "gemma3": None, "rope-attention": None}
    families = {"prism": 0, "recon": 0}
    for preset in PRESETS:
        for variant, (arch, overrides) in VARIANTS.items():
            base = family_base(arch)
            if base is None or variant == base:
                continue
            families[base] += 1
            target = count_params(*variant_args(preset, base, 4097))
            arch, args = variant_args(preset, variant, 4097)
            width = args.get("mlp_hidden") or 4 * args["n_embd"]
            distance = abs(count_params(arch, args) - target)
            steps = (-1,) if "flops_at_most" in overrides else (-1, 1)
            for step in steps:
                moved = abs(count_params(arch, dict(args, mlp_hidden=width + step)) - target)
                assert moved >= distance, (preset, variant, step)
            if "flops_at_most" in overrides:  # the widest MLP at or under the cap
                cap = model_size(*variant_args(preset, overrides["flops_at_most"], 4097))[1]
                assert model_size(arch, args)[1] <= cap
    assert families["prism"] >= 3 * 9 and families["recon"] >= 3 * 20


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
    # screened may have no records yet); the reconstruction's records are the ones renamed recon*.
    assert {"recon", "recon-pi-off", "recon-complete", "gpt2", "gemma3", "rope-attention",
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
    assert PRESETS["cpu-small"]["recon"]["n_embd"] == d
    for variant, wider in (("prism-complete", True), ("prism-no-wpe", True), ("prism-untied", False),
                           ("recon-complete", True), ("prism-white-ista-complete", True),
                           ("recon-ista", False)):
        arch, args = variant_args("cpu-small", variant, 4097)
        base = count_params(*variant_args("cpu-small", family_base(arch), 4097))
        assert (args["mlp_hidden"] > 4 * d) == wider, variant
        # the width is the best integer: one unit more or less moves the count further from the
        # family base's (the author's PRISM, or our reconstruction)
        n = count_params(arch, args)
        for step in (-1, 1):
            assert abs(count_params(arch, dict(args, mlp_hidden=args["mlp_hidden"] + step)) - base) \
                >= abs(n - base), variant
    # changes that add no weight, or too few to buy one MLP unit, keep the 4d MLP
    for variant in ("prism-pi-off", "prism-pi-one-group", "prism-lambda-0", "prism-lambda-fixed",
                    "prism-sum", "prism-no-iso", "recon-pi-off", "recon-rotated-values",
                    "prism-white"):
        assert "mlp_hidden" not in variant_args("cpu-small", variant, 4097)[1], variant


def test_the_author_prisms_ablations_are_its_config_with_one_change():
    """Each variant of the author's PRISM is its preset's sizes with its own change and, where that
    change moves the parameter count, the MLP width that pays for it; and nothing else."""
    for preset in PRESETS:
        sizes = dict(preset_sizes(preset, "prism"), vocab_size=4097)
        d, L, T = sizes["n_embd"], sizes["n_layer"], sizes["block_size"]
        assert sizes["expansion"] == 2  # the paper's R at every preset: D holds 4d² a layer
        prism = count_params("prism", sizes)
        assert variant_args(preset, "prism", 4097) == ("prism", sizes)

        def args_of(variant):  # (arch, what differs from PRISM's args)
            arch, args = variant_args(preset, variant, 4097)
            assert sizes.keys() <= args.keys(), variant
            return arch, {k: v for k, v in args.items() if k not in sizes or sizes[k] != v}

        for variant, change in (
                ("prism-lambda-0", {"lambda_start": 0.0, "lambda_end": 0.0}),
                ("prism-lambda-fixed", {"lambda_start": 0.1, "lambda_end": 0.1}),
                ("prism-sum", {"lambda_start": -1.0, "lambda_end": -1.0}),
                ("prism-pi-off", {"signal_base": 1e4, "noise_base": 1e4})):
            assert args_of(variant) == ("prism", change), (preset, variant)
        arch, change = args_of("prism-pi-one-group")
        assert arch == "prism" and change.keys() == {"signal_base", "noise_base"}
        assert change["signal_base"] == change["noise_base"] == pytest.approx(1e4 * math.pi,
                                                                             rel=1e-15)
        # An MLP unit costs 2d weights a layer. R = 1: each stream complete (H·p = d), the
        # dictionary 2d² a layer smaller: d units more
        arch, change = args_of("prism-complete")
        assert (arch, change) == ("prism", {"expansion": 1, "mlp_hidden": 5 * d})
        config = get_arch("prism")[0](**variant_args(preset, "prism-complete", 4097)[1])
        assert config.n_head * config.head_dim == d
        # the three ablations with code: no wpe (T·d weights: T/2L units more) ...
        assert args_of("prism-no-wpe") == ("prism-ablation", {
            "position_embedding": False, "mlp_hidden": 4 * d + round(T / (2 * L))})
        # ... the read-out untied (B, D's 4d² a layer at R = 2: 2d units fewer) ...
        assert args_of("prism-untied") == ("prism-ablation", {
            "tied_readout": False, "mlp_hidden": 2 * d})
        # ... and no iso-energy factor (no weight)
        assert args_of("prism-no-iso") == ("prism-ablation", {"iso_energy": False})
        for variant in ("prism-no-wpe", "prism-untied", "prism-no-iso", "prism-complete"):
            assert count_params(*variant_args(preset, variant, 4097)) == prism, (preset, variant)


def test_rope_attention_is_plain_attention_at_prism_size():
    arch, args = variant_args("cpu-small", "rope-attention", 4097)
    assert arch == "rope-attention" and args["n_head"] * args["head_dim"] == args["n_embd"]
    # q, k, v apart at H·p = d: 3d² + the d² back-projection, the reconstruction's 2d² + 2d² at
    # ρ = 2, and the author's PRISM's 4d² dictionary at R = 2 (which has wpe besides: T·d more)
    n = count_params(arch, args)
    assert n == count_params(*variant_args("cpu-small", "recon", 4097)) == 1_320_064
    d, T = args["n_embd"], args["block_size"]
    assert count_params(*variant_args("cpu-small", "prism", 4097)) == n + T * d == 1_336_448
    model = tiny("rope-attention")
    assert not hasattr(model.transformer, "wpe")  # RoPE carries the positions
    assert torch.equal(model.rope_frequencies(0)[3], model.rope_frequencies(0)[0])  # one band
    assert model.rope_pairs == "halves"
    # no dictionary, no groups: the analysis hooks are absent, not None
    assert not hasattr(model, "subspaces") and not hasattr(model, "head_groups")


def test_model_size_reports_the_attention_work_beside_the_parameters():
    # At the same parameter count, the reconstruction at ρ = 2 forms scores over twice the
    # dimensions of plain attention at H·p = d: the 12·L·H·p·T term doubles. The author's PRISM's
    # 2H heads of p = R·d/H span 2R·d = 4d at R = 2: four times plain attention's, GPT-2's too.
    args = {v: variant_args("cpu-small", v, 4097)
            for v in ("recon", "rope-attention", "prism", "gpt2", "prism-complete")}
    (n_c, f_c), (n_r, f_r), (n_p, f_p), (n_g, f_g), (n_1, f_1) = (model_size(*args[v])
                                                                   for v in args)
    assert n_c == n_r and n_p == n_g == n_1
    assert (f_c - 6 * n_c) == pytest.approx(2 * (f_r - 6 * n_r))
    L, d = 4, 128  # and the tied read-out uses each dictionary (2R·d atoms of d) a second time
    assert (f_p - 6 * n_p) == pytest.approx(4 * (f_g - 6 * n_g) + 6 * L * 4 * d * d)
    assert (f_1 - 6 * n_1) == pytest.approx(2 * (f_g - 6 * n_g) + 6 * L * 2 * d * d)  # R = 1: 2d


def test_mismatched_preset_stops_with_a_message(monkeypatch):
    monkeypatch.setitem(PRESETS["cpu-small"], "gpt2", dict(n_layer=8, n_embd=128, n_head=4))
    with pytest.raises(ValueError, match="gpt2 has .* off PRISM's"):
        check_preset("cpu-small", 4097)


def test_variants_are_config_values():
    arch, args = variant_args("cpu-small", "prism-pi-off", 4097)
    assert arch == "prism" and args["signal_base"] == args["noise_base"] == 1e4
    arch, args = variant_args("cpu-small", "prism-complete", 4097)
    assert arch == "prism" and args["expansion"] == 1
    arch, args = variant_args("cpu-small", "prism-untied", 4097)
    assert arch == "prism-ablation" and args["tied_readout"] is False
    assert args["mlp_hidden"] < 4 * args["n_embd"]  # a narrower MLP pays for B
    assert variant_args("cpu-small", "recon-pi-off", 4097) == (
        "recon", dict(variant_args("cpu-small", "recon", 4097)[1], rope_ratio=1.0))
    arch, args = variant_args("cpu-small", "recon-complete", 4097)
    assert arch == "recon" and args["n_head"] * args["head_dim"] == args["n_embd"]
    arch, args = variant_args("cpu-small", "prism-white-ista", 4097)
    assert arch == "prism-white" and args["mlp"] == "ista" and args["mask_self"]
    with pytest.raises(ValueError, match="unknown variant"):
        variant_args("cpu-small", "prism-xl", 4097)
    with pytest.raises(ValueError, match="unknown preset"):
        variant_args("gpu-huge", "prism", 4097)


def test_presets_take_prism_sizes_from_the_config_files():
    root = Path(__file__).resolve().parents[2]
    for preset, name in (("cpu-small", "cpu_small.py"), ("paper-50m", "prism_50m.py")):
        settings = read_config_file(str(root / "config" / name))
        sizes = preset_sizes(preset, "prism")
        assert sizes == {k: settings[k] for k in ("n_layer", "n_embd", "n_head", "expansion",
                                                  "block_size")}
        assert preset_sizes(preset, "prism-ablation") == sizes  # the author's family shares them
        # the reconstruction's family shares its own entry, at the same d, depth and context
        recon = preset_sizes(preset, "recon")
        assert preset_sizes(preset, "prism-white") == preset_sizes(preset, "prism-white-sandwich") \
            == recon
        assert {k: recon[k] for k in ("n_layer", "n_embd", "block_size")} == \
            {k: sizes[k] for k in ("n_layer", "n_embd", "block_size")}


@pytest.mark.parametrize("arch", ["gpt2", "gemma3", "rope-attention", "recon", "prism-white",
                                  "prism-ablation"])
def test_sizes_like_prism_gives_the_arch_at_the_preset_of_those_prism_sizes(arch):
    for preset in PRESETS:
        prism = preset_sizes(preset, "prism")
        assert sizes_like_prism(arch, prism) == preset_sizes(preset, arch)
    # the fields both configs have come along, PRISM-only ones do not
    got = sizes_like_prism(arch, dict(preset_sizes("cpu-small", "prism"), dropout=0.1,
                                      signal_base=1e4))
    assert got["dropout"] == 0.1 and ("signal_base" in got) == (arch == "prism-ablation")
    get_arch(arch)[0](**got)  # a valid config of the arch
    # a PRISM at no preset has no matched size in any arch
    with pytest.raises(ValueError, match=f"{arch} has sizes matched to PRISM only at .*n_layer=3"):
        sizes_like_prism(arch, dict(preset_sizes("cpu-small", "prism"), n_layer=3))


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
    # no RoPE, no dictionary, no groups: the analysis hooks are absent (analyze_heads.py asks)
    for hook in ("rope_frequencies", "rope_pairs", "subspaces", "head_groups"):
        assert not hasattr(model, hook), hook
    gemma = tiny("gemma3")
    assert gemma.rope_pairs == "halves" and not hasattr(gemma, "subspaces")
    assert not hasattr(gemma, "head_groups")


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
    streams = 2 if family_base(arch) == "prism" else 1  # the author's PRISM: H signal + H noise
    assert len(heads["heads"]) == args["n_layer"] * args["n_head"] * streams
    assert all(h["mean_distance"] >= 0 for h in heads["heads"])
    # no rotary heads, no spectrum to measure
    assert all(h["spectral_centroid"] is None for h in heads["heads"]) == (arch == "gpt2")
