"""
What the comparison runs: the size presets, at which every arch has PRISM's parameter count (±5%),
and the variants, each an arch with config values. compare.py, bench.py and lab/train.py take
their arms from here.
"""

import functools
from dataclasses import fields
from pathlib import Path

import torch

from configurator import read_config_file
from lab.reconstruction import Reconstruction
from model import Prism, PrismConfig, build_model, get_arch, mlp_width

ROOT = Path(__file__).resolve().parent.parent
PRISM_SIZES = ("n_layer", "n_embd", "n_head", "expansion")


def _prism_of(config_file):
    """block_size and PRISM's sizes as a shipped config file states them (where they live)."""
    path = ROOT / "config" / config_file
    settings = read_config_file(str(path))
    missing = [k for k in ("block_size", *PRISM_SIZES) if k not in settings]
    if missing:
        raise ValueError(f"{path} does not state {', '.join(missing)}")
    return {"block_size": settings["block_size"],
            "prism": {k: settings[k] for k in PRISM_SIZES}}


# Sizes at which every arch has PRISM's parameter count within ±5% (check_preset says so). The
# author's PRISM family (prism, prism-ablation) takes the "prism" entry, our reconstruction's
# family (recon, prism-white, prism-white-sandwich) the "recon" entry. A PRISM size lives in one
# place: the config file that trains it, or, for cpu-tiny (quick tests only), here. At R = 2 the
# author's PRISM has exactly GPT-2's parameters; the other baselines were sized to the
# reconstruction (1.2% fewer at cpu-small, 0.5% at paper-50m) and their records keep those sizes.
PRESETS = {
    "cpu-tiny": {
        "block_size": 128,
        "prism": dict(n_layer=4, n_embd=64, n_head=2, expansion=2),
        "recon": dict(n_layer=4, n_embd=64, n_head=4, head_dim=32),
        "gpt2": dict(n_layer=4, n_embd=64, n_head=2),
        "gemma3": dict(n_layer=4, n_embd=64, n_head=2, head_dim=32, mlp_hidden=172,
                       sliding_window=64, global_every=4),
        "rope-attention": dict(n_layer=4, n_embd=64, n_head=4, head_dim=16),
    },
    # config/cpu_small.py, the study's size (d = 128, 4 layers, 4 + 4 heads of p = 64). 4 layers
    # hold no 5-local-to-1-global group: Gemma's last layer is its global one here.
    "cpu-small": {
        **_prism_of("cpu_small.py"),
        "recon": dict(n_layer=4, n_embd=128, n_head=8, head_dim=32),
        "gpt2": dict(n_layer=4, n_embd=128, n_head=4),
        "gemma3": dict(n_layer=4, n_embd=128, n_head=4, head_dim=32, mlp_hidden=344,
                       sliding_window=64, global_every=4),
        "rope-attention": dict(n_layer=4, n_embd=128, n_head=8, head_dim=16),
    },
    # config/prism_50m.py, the paper's (d = 512, 8 layers, 8 + 8 heads of p = 128, context 512);
    # the baselines at the same d.
    "paper-50m": {
        **_prism_of("prism_50m.py"),
        "recon": dict(n_layer=8, n_embd=512, n_head=16, head_dim=64),
        "gpt2": dict(n_layer=8, n_embd=512, n_head=8),
        "gemma3": dict(n_layer=8, n_embd=512, n_head=8, head_dim=64, mlp_hidden=1376,
                       sliding_window=128),
        "rope-attention": dict(n_layer=8, n_embd=512, n_head=16, head_dim=32),
    },
}

# The scout's best three changes to PRISM's attention (lab/white.py), which prism-white combines.
WHITE = {"normalize_subspaces": True, "mask_self": True, "rotate_values": True}

# name -> (arch, overrides of the preset's sizes). Every variant of a PRISM family but its base
# (prism, recon) then gets the MLP width that brings it back to its base's parameter count
# (variant_args), so "does this change help?" is asked at the same size. The model_args a variant makes are the ones
# its records hold (compare.py checks them exactly): a variant with records is not changed.
PI = PrismConfig.signal_base / 1e4  # π, as the signal base holds it

VARIANTS = {
    # The author's PRISM (model.py) and the baselines.
    "prism": ("prism", {}),
    "gpt2": ("gpt2", {}),
    "gemma3": ("gemma3", {}),
    # Plain RoPE attention as a standard transformer has it (lab/baselines.py).
    "rope-attention": ("rope-attention", {}),
    # The author's PRISM with one of its parts changed (issue 26; lab/ablations.py for the three
    # that need code). λ: the noise stream read out with weight 0, a fixed 0.1, or +1 (λ = −1:
    # both streams added, CRATE's sum over all heads).
    "prism-lambda-0": ("prism", {"lambda_start": 0.0, "lambda_end": 0.0}),
    "prism-lambda-fixed": ("prism", {"lambda_start": 0.1, "lambda_end": 0.1}),
    "prism-sum": ("prism", {"lambda_start": -1.0, "lambda_end": -1.0}),
    # π-RoPE: both streams at base 10⁴ (off), or both at 10⁴·π (the README's one-group "π-trick").
    "prism-pi-off": ("prism", {"signal_base": 1e4, "noise_base": 1e4}),
    "prism-pi-one-group": ("prism", {"signal_base": 1e4 * PI, "noise_base": 1e4 * PI}),
    # R = 1: each stream complete (H·p = d), the dictionary 2× overcomplete in all.
    "prism-complete": ("prism", {"expansion": 1}),
    "prism-no-wpe": ("prism-ablation", {"position_embedding": False}),
    "prism-untied": ("prism-ablation", {"tied_readout": False}),
    "prism-no-iso": ("prism-ablation", {"iso_energy": False}),
    # Our reconstruction of PRISM from the abstract (lab/reconstruction.py), which model.py held
    # until issue 25, and its two constraints one at a time: π-RoPE off, ρ = 1 (H·p = d).
    "recon": ("recon", {}),
    "recon-pi-off": ("recon", {"rope_ratio": 1.0}),
    "recon-complete": ("recon", {"overcompleteness": 1}),
    # White-box candidates on the reconstruction that survived the screen (lab/white.py), one at
    # a time ...
    "recon-normalized": ("prism-white", {"normalize_subspaces": True}),
    "recon-no-self": ("prism-white", {"mask_self": True}),
    "recon-rotated-values": ("prism-white", {"rotate_values": True}),
    "recon-ista": ("prism-white", {"mlp": "ista"}),
    # ... the first three together ...
    "prism-white": ("prism-white", WHITE),
    # ... less one of them each: which of them carries it ...
    "prism-white-unnormalized": ("prism-white", {"mask_self": True, "rotate_values": True}),
    "prism-white-with-self": ("prism-white", {"normalize_subspaces": True, "rotate_values": True}),
    "prism-white-unrotated": ("prism-white", {"normalize_subspaces": True, "mask_self": True}),
    # ... with the sparse-coding MLP (the study's best PRISM) ...
    "prism-white-ista": ("prism-white", {**WHITE, "mlp": "ista"}),
    # ... and what the paper's two constraints cost on top of it: π-RoPE off, ρ = 1.
    "prism-white-ista-pi-off": ("prism-white", {**WHITE, "mlp": "ista", "rope_ratio": 1.0}),
    "prism-white-ista-complete": ("prism-white", {**WHITE, "mlp": "ista", "overcompleteness": 1}),
    # The ISTA block's attribution controls inside prism-white (lab/white.py): a hidden bias on the
    # GELU MLP; the ReLU MLP with a hidden bias (the ista block up to init order: the noise);
    # CRATE-α's two-step sparse code with a separate decoder.
    "prism-white-gelu-bias": ("prism-white", {**WHITE, "mlp": "gelu-bias"}),
    "prism-white-relu-bias": ("prism-white", {**WHITE, "mlp": "relu-bias"}),
    "prism-white-crate-alpha": ("prism-white", {**WHITE, "mlp": "crate-alpha"}),
    # prism-white-ista-complete in Gemma 3's normalisation: sandwich RMSNorms, √d embedding scale
    # (lab/sandwich.py). ρ = 1 keeps it within RoPE attention's FLOPs per token.
    "prism-white-sandwich": ("prism-white-sandwich",
                             {**WHITE, "mlp": "ista", "overcompleteness": 1}),
    # ... and its pieces one at a time: without the √d scale; without the post-norms (pre-norm
    # RMSNorm blocks with the √d scale: prism-white-ista-complete with RMSNorm for LayerNorm).
    "prism-white-sandwich-unscaled": ("prism-white-sandwich", {
        **WHITE, "mlp": "ista", "overcompleteness": 1, "embed_scale": False}),
    "prism-white-sandwich-pre-only": ("prism-white-sandwich", {
        **WHITE, "mlp": "ista", "overcompleteness": 1, "post_norm": False}),
    # ... the control that prices q = k = v in it: query, key and value projections apart ...
    # ... and the gated sparse-coding MLP in place of its one-encoder block (lab/white.py). The
    # MLP width nearest PRISM's parameters puts both a few hundred FLOPs per token over RoPE
    # attention's at cpu-small; they take the widest at or under it (0.1% fewer parameters).
    "prism-white-sandwich-qkv": ("prism-white-sandwich", {
        **WHITE, "mlp": "ista", "overcompleteness": 1, "shared_qkv": False,
        "flops_at_most": "rope-attention"}),
    "prism-white-sandwich-gated": ("prism-white-sandwich", {
        **WHITE, "mlp": "gated-ista", "overcompleteness": 1, "flops_at_most": "rope-attention"}),
    # The ReLU MLP without a hidden bias inside prism-white: the activation apart from the threshold.
    "prism-white-relu": ("prism-white", {**WHITE, "mlp": "relu"}),
    # The gated block's controls: without its threshold (ReGLU), and Gemma 3's GeGLU.
    "prism-white-sandwich-gated-relu": ("prism-white-sandwich", {
        **WHITE, "mlp": "gated-relu", "overcompleteness": 1, "flops_at_most": "rope-attention"}),
    "prism-white-sandwich-geglu": ("prism-white-sandwich", {
        **WHITE, "mlp": "geglu", "overcompleteness": 1, "flops_at_most": "rope-attention"}),
    # The price of q = k = v split: q = k with the value apart, beside prism-white-sandwich-qkv.
    "prism-white-sandwich-qk": ("prism-white-sandwich", {
        **WHITE, "mlp": "ista", "overcompleteness": 1, "shared_value": False,
        "flops_at_most": "rope-attention"}),
    # ... and with the gated MLP: do the value's and the MLP's gains add?
    "prism-white-sandwich-gated-qk": ("prism-white-sandwich", {
        **WHITE, "mlp": "gated-ista", "overcompleteness": 1, "shared_value": False,
        "flops_at_most": "rope-attention"}),
}

# Candidates the screen rejected (lab/RESULTS.md, "Screening at preset cpu-small"): deleted from
# the code; their records stay in lab/results/, made by the code at `commit`, where their
# FLOPs/token (model_size at the compact 4,097-token vocabulary) were computed too.
RETIRED = {
    "recon-head-step": dict(
        commit="2549a1f",
        reason="a learned step per head: −0.04 nats at one seed, inside the grid's noise; and in "
               "§2 the step is shared by all subspaces (what differs per head, ‖G_k‖, the softmax "
               "normalises away)",
        params={"cpu-small": 1320096, "paper-50m": 27304576},
        flops_per_token={"cpu-small": 9493440, "paper-50m": 214159104}),
    "recon-head-temperature": dict(
        commit="2549a1f",
        reason="a learned softmax temperature per head: −0.01 nats at one seed, noise; with a "
               "decoupled back-projection it adds no function (U_k·√τ, B_k/√τ)",
        params={"cpu-small": 1320096, "paper-50m": 27304576},
        flops_per_token={"cpu-small": 9493440, "paper-50m": 214159104}),
    "recon-rho-init": dict(
        commit="2549a1f",
        reason="dictionary init std 0.02/√ρ (ρ = 1's ‖U‖_F², not its per-entry variance): −0.06 "
               "nats at one seed, inside the grid's noise",
        params={"cpu-small": 1320064, "paper-50m": 27304448},
        flops_per_token={"cpu-small": 9493248, "paper-50m": 214158336}),
    "recon-ista-tied": dict(
        commit="2549a1f",
        reason="the ISTA block with one dictionary as encoder and decoder: +0.31 nats, worse than "
               "PRISM, at 1.33× its FLOPs",
        params={"cpu-small": 1320036, "paper-50m": 27304392},
        flops_per_token={"cpu-small": 12614232, "paper-50m": 314624688}),
    "prism-white-sandwich-4-heads": dict(
        commit="f8e78b6",
        reason="prism-white-sandwich with 4 subspaces of p = 32 in place of 8 of p = 16 (ρ = 1 "
               "still): −0.021 nats at one seed, inside the screen's noise (issue 19)",
        params={"cpu-small": 1319680, "paper-50m": 27301376},
        flops_per_token={"cpu-small": 8704512, "paper-50m": 188974080}),
}


def family_base(arch):
    """The variant an arch's family is sized against: "prism" for the author's PRISM and its
    ablations, "recon" for our reconstruction and its white-box variants, None for the others."""
    model_cls = get_arch(arch)[1]
    return "prism" if issubclass(model_cls, Prism) else "recon" if issubclass(
        model_cls, Reconstruction) else None


def preset_sizes(preset, arch):
    """The model fields (block_size included) of `arch` at a size preset."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    entry = family_base(arch) or arch
    if entry not in PRESETS[preset]:
        raise ValueError(f"preset {preset!r} has no sizes for arch {arch!r}")
    return dict(PRESETS[preset][entry], block_size=PRESETS[preset]["block_size"])


def sizes_like_prism(arch, prism_model_args):
    """The model args of `arch` at the preset whose PRISM has the sizes of `prism_model_args`
    (PrismConfig fields; unset ones keep PrismConfig's defaults), with the other fields both
    configs have (dropout, bias, ...) carried over. ValueError when no preset has this PRISM."""
    prism = PrismConfig(**prism_model_args)
    size_fields = ("block_size", *PRISM_SIZES, "mlp_hidden")
    wanted = {k: getattr(prism, k) for k in size_fields}
    for preset in PRESETS:
        at_preset = PrismConfig(**preset_sizes(preset, "prism"))
        if all(getattr(at_preset, k) == v for k, v in wanted.items()):
            shared = {f.name for f in fields(get_arch(arch)[0])} - set(size_fields) - {"vocab_size"}
            return {**{k: v for k, v in prism_model_args.items() if k in shared},
                    **preset_sizes(preset, arch)}
    shown = ", ".join(f"{k}={v}" for k, v in wanted.items())
    raise ValueError(f"{arch} has sizes matched to PRISM only at the presets of lab/variants.py "
                     f"({', '.join(PRESETS)}); no preset has a PRISM with {shown}")


def _preset_args(preset, variant, vocab_size):
    """(arch, model_args) of a variant at a size preset, before its size is matched."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    arch, overrides = VARIANTS[variant]
    args = dict(preset_sizes(preset, arch), vocab_size=vocab_size)
    overrides = dict(overrides)
    rho = overrides.pop("overcompleteness", None)  # ρ is a ratio of sizes, not a config field
    overrides.pop("flops_at_most", None)           # a bound on the MLP width (variant_args)
    args.update(overrides)
    if rho is not None:  # H·p = ρ·d at the variant's own number of heads
        args["head_dim"] = rho * args["n_embd"] // args["n_head"]
    return arch, args


def variant_args(preset, variant, vocab_size):
    """(arch, model_args) of a variant at a size preset. A family variant's MLP width is the one
    whose parameter count is nearest its base's (parameters are linear in the width, so one
    unit's cost, measured, gives it); the MLP's default width stays unset. A variant with
    "flops_at_most": arm takes the widest MLP at or under that arm's FLOPs per token if the
    nearest width is over them."""
    arch, args = _preset_args(preset, variant, vocab_size)
    base = family_base(arch)
    if base is None or variant == base:
        return arch, args
    target = count_params(*_preset_args(preset, base, vocab_size))
    width = mlp_width(get_arch(arch)[0](**args))
    per_unit = (count_params(arch, {**args, "mlp_hidden": width + 1})
                - count_params(arch, {**args, "mlp_hidden": width}))
    hidden = width + round((target - count_params(arch, args)) / per_unit)
    cap_arm = VARIANTS[variant][1].get("flops_at_most")
    if cap_arm is not None:
        cap = model_size(*variant_args(preset, cap_arm, vocab_size))[1]
        while hidden > 1 and model_size(arch, {**args, "mlp_hidden": hidden})[1] > cap:
            hidden -= 1
    if hidden < 1:
        raise ValueError(f"preset {preset!r}: no MLP width brings {variant} to {base}'s "
                         f"{target:,} parameters")
    if hidden != width:
        args["mlp_hidden"] = hidden
    return arch, args


def count_params(arch, model_args):
    """Parameter count of a model without allocating its weights."""
    return model_size(arch, model_args)[0]


def model_size(arch, model_args):
    """(parameters, training FLOPs per token) of a model, without allocating its weights."""
    return _model_size(arch, tuple(sorted(model_args.items())))


@functools.lru_cache(maxsize=None)
def _model_size(arch, model_args):  # building even a meta model takes ~0.1 s: once per model
    with torch.device("meta"):
        model = build_model(arch, **dict(model_args))
        return model.get_num_params(), model.flops_per_token()


def check_preset(preset, vocab_size, tolerance=0.05, variants=None):
    """{variant: params} at a preset (every variant of VARIANTS, or those given); ValueError if one
    is more than `tolerance` off the author's PRISM."""
    variants = list(VARIANTS) if variants is None else variants
    prism = count_params(*variant_args(preset, "prism", vocab_size))
    params = {v: count_params(*variant_args(preset, v, vocab_size)) for v in variants}
    for v, n in params.items():
        if abs(n / prism - 1) > tolerance:
            raise ValueError(f"preset {preset!r}: {v} has {n:,} parameters, "
                             f"{100 * (n / prism - 1):+.1f}% off PRISM's "
                             f"{prism:,} (allowed ±{100 * tolerance:.0f}%)")
    return params
