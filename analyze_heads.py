"""
Measure what every attention head of a checkpoint does on held-out text (PRISM.md §6): how far
it looks, how much it attends to itself, which rotary frequencies it uses, whether the designed
signal heads differ from the noise heads, and how each layer's tokens code under MCR².

Examples:
    python analyze_heads.py --data_dir=data/tinystories --out_dir=out/analysis  # what train.py wrote
    python analyze_heads.py --ckpt=out/prism_50m/ckpt.pt --data_dir=data/tinystories --num_batches=20 \\
        --batch_size=4 --block_size=256 --eps=0.5 --max_tokens=4096 --device=cuda

Writes to out_dir:
    heads.json                every number below (schema in `write_json`);
    head_spectra.png          per layer, heads × rotary frequency, the energy share E(i)/Σ E,
                              the designed groups marked at the left, each head's centroid marked;
    distance_vs_centroid.png  one point per head: spectral centroid vs mean attention distance,
                              coloured by designed group (right panel: against centroid_in_band);
    coding_rate.png           R, R^c and ΔR by layer, normalised and raw.

The headline: signal − noise contrasts. The claim under test is that signal heads look further
back and sit lower in their frequency band than noise heads. Per layer, a contrast is the mean
over the designed signal heads minus the mean over the noise heads (so a layer effect cancels), of
  log_distance          ln mean_distance             (> 0: signal heads look further back)
  log_distance_no_self  ln mean_distance_no_self     (the same without attention to itself)
  log_centroid_in_band  ln centroid_in_band          (< 0: signal heads lower in their band)
  self_attention        self_attention               (q = k makes every head lean to itself)
and layer "all" is their mean over layers. contrast_tests: for this checkpoint, the layer-"all"
contrast against shuffles of the group labels within each layer (Monte Carlo p). Across seeds,
`contrast_test` (used by compare.py) tests per-seed differences against a control variant or the
untrained checkpoints with the exact sign-flip test of stats.py.

Definitions (all on `num_batches` × `batch_size` windows of `block_size` tokens taken at evenly
spaced offsets of data_dir/<split>.bin; A is the causal attention matrix of a head, rows i =
queries, columns j <= i = keys; queries i >= 1, since position 0 can only attend to itself):
  mean_distance      Σ_j A_ij (i − j), averaged over the queries, in tokens.
  self_attention     A_ii, averaged over the queries.
  mean_distance_no_self  Σ_i Σ_j A_ij (i − j) / Σ_i (1 − A_ii): the mean distance of the attention
                     mass not on the token itself (null for a head that only attends to itself).
                     With a sink (PrismConfig.mask_self), A covers the real keys only and its rows
                     sum to 1 − the sink's share: the sink counts as distance 0 in both distances.
  entropy            −Σ_j A_ij ln A_ij, averaged over the queries, in nats.
  spectrum E(i)      mean over all tokens t of ‖q_t^(i)‖·‖k_t^(i)‖, where x^(i) is rotary pair i of
                     a head, the dims (i, i + p/2) (half-split RoPE); rotation keeps pair norms.
  spectral_centroid  exp(Σ_i E(i) ln ω_i / Σ_i E(i)): the energy-weighted mean of the log angular
                     frequency, reported as an angular frequency (radians per token); its
                     wavelength 2π/centroid is reported too, in tokens.
  centroid_in_band   spectral_centroid / ω_0 of the head's own band (its fastest frequency): where
                     in its band a head sits, with the designed ×π offset of the noise band removed.
  bimodality         (secondary) over all heads of all layers, x = ln(spectral_centroid); exact
                     1-D 2-means (the split of sorted x minimising the within-cluster sum of
                     squares W); score (m_high − m_low) / sqrt(W / n). It pools layers (a layer
                     effect reads as two modes), includes the designed +ln π offset (not
                     comparable between π-on and π-off), and has little power: keep it beside
                     the contrasts, not in their place. bimodality_null: its median and 95th
                     percentile for n iid normal values (≈ 2.65 for large n: 2-means always splits).
  regime             "signal" / "noise": the head's 2-means cluster (low / high frequency).
  bimodality_in_band the same score on ln(centroid_in_band).
  R, Rc, dR          per layer, on the layer's normalised input tokens Z (pooled over the batches:
                     ceil(max_tokens / num_batches) random token positions of each batch, at most
                     max_tokens = 4096 tokens in all by default), at precision eps (default 0.5):
                     R = ½ log det(I + d/(n ε²) ZᵀZ), Rc = Σ_k ½ log det(I + p/(n ε²) (Z U_k)ᵀ(Z U_k))
                     with the dictionary U_k as the model holds it (grows with ‖U‖), dR = R − Rc.
  Rc_orth, dR_orth   the normalised rates: each U_k replaced by an orthonormal basis of its span,
                     so they depend on the subspaces only. With ρ = H·p/d = 2 the subspaces hold
                     twice the dimensions of Z, and at the default ε = 0.5 dR_orth < 0 even for
                     tokens that lie exactly in the dictionary's subspaces (tests/test_analyze.py
                     shows it; at ε ≈ 8 the same tokens give dR_orth > 0): read it across layers
                     and against the untrained checkpoint, not against 0.
  neumann_radius     max_k β·λ_max(W_kᵀW_k) (model.neumann_radius): the series behind the attention
                     step converges only where this is below 1.

For a model without rotary heads (no spectrum, centroid, regime, bimodality), without designed
groups (no contrasts), or without a dictionary (no Rc, dR), those fields are null and heads.json's
`not_applicable` says why.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from sample import (UsageError, default_checkpoint_help, load_checkpoint_model, pick_device,
                    require_checkpoint)

GROUP_COLORS = {"signal": "#1f77b4", "noise": "#d62728", None: "#7f7f7f"}

# -----------------------------------------------------------------------------
# Metrics on the analysis records. Each works on plain tensors, so it can be checked on hand-built
# ones; they return sums (with counts) so that batches accumulate in bounded memory.


def attention_sums(attn):
    """attn (B, H, T, T) causal attention probabilities -> dict of per-head sums over batch and
    query positions i >= 1 (float64, shape (H,)): `distance` Σ_j A_ij (i − j), `entropy`
    −Σ_j A_ij ln A_ij, `self_mass` A_ii; and `n_queries`."""
    B, H, T, _ = attn.shape
    a = attn.double()
    pos = torch.arange(T, dtype=torch.float64, device=a.device)
    # Σ_j A_ij (i − j) = i Σ_j A_ij − Σ_j A_ij j   (A_ij = 0 for j > i)
    dist = pos * a.sum(-1) - a @ pos                          # (B, H, T)
    ent = -torch.special.xlogy(a, a).sum(-1)                  # (B, H, T)
    diag = a.diagonal(dim1=-2, dim2=-1)                       # (B, H, T)
    return dict(distance=dist[..., 1:].sum(dim=(0, 2)).cpu(),
                entropy=ent[..., 1:].sum(dim=(0, 2)).cpu(),
                self_mass=diag[..., 1:].sum(dim=(0, 2)).cpu(), n_queries=B * (T - 1))


def pair_norms(x):
    """(…, p) -> (…, p/2): the norm of each rotary pair (dims i and i + p/2)."""
    half = x.shape[-1] // 2
    return torch.sqrt(x[..., :half].double() ** 2 + x[..., half:].double() ** 2)


def spectrum_sums(q, k):
    """q (B, H, T, p), k (B, Hk, T, p) -> (E_sum (H, p/2), n_tokens): per head and rotary pair the
    sum over tokens of ‖q^(i)‖·‖k^(i)‖. Grouped keys (Hk < H) are shared by H/Hk query heads."""
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    e = (pair_norms(q) * pair_norms(k)).sum(dim=(0, 2))
    return e.cpu(), q.shape[0] * q.shape[2]


def spectral_centroid(energy, freqs):
    """energy, freqs (..., P) -> (...,): exp(Σ E_i ln ω_i / Σ E_i), NaN where Σ E = 0."""
    energy = torch.as_tensor(energy, dtype=torch.float64)
    logf = torch.as_tensor(freqs, dtype=torch.float64).log()
    total = energy.sum(-1)
    return torch.exp((energy * logf).sum(-1) / total)  # 0/0 -> NaN


def _within_ss_by_cut(xs):
    """xs (m, n) rows sorted ascending -> (m, n − 1): the within-cluster sum of squares W of each
    row when cut into xs[:, :c] and xs[:, c:], for c = 1 … n − 1 (prefix sums)."""
    xs = xs - xs.mean(axis=1, keepdims=True)
    n = xs.shape[1]
    c = np.arange(1, n)
    s1, s2 = np.cumsum(xs, axis=1)[:, :-1], np.cumsum(xs**2, axis=1)[:, :-1]
    t1, t2 = xs.sum(axis=1, keepdims=True), (xs**2).sum(axis=1, keepdims=True)
    return (s2 - s1**2 / c) + ((t2 - s2) - (t1 - s1) ** 2 / (n - c))


def two_means_1d(x):
    """Exact 1-D 2-means. x (n,) -> (labels (n,) 0 = low cluster, 1 = high, detail dict). The best
    split of sorted values is contiguous, so every cut is tried; ties go to the first cut."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    xs = x[order]
    n = len(xs)
    cut = int(np.argmin(_within_ss_by_cut(xs[None])[0])) + 1
    lo, hi = xs[:cut], xs[cut:]
    w = ((lo - lo.mean()) ** 2).sum() + ((hi - hi.mean()) ** 2).sum()
    labels = np.zeros(n, dtype=int)
    labels[order[cut:]] = 1
    return labels, dict(within_ss=float(w), low_mean=float(lo.mean()), high_mean=float(hi.mean()),
                        n_low=int(cut), n_high=int(n - cut), low_max=float(lo[-1]),
                        high_min=float(hi[0]))


def bimodality_null(n, draws=2000, seed=0):
    """What `bimodality` gives for n values with no two modes at all (iid standard normal; the
    score does not depend on location or scale): median and 95th percentile over `draws` samples.
    For large n it tends to 2·sqrt(2/π) / sqrt(1 − 2/π) ≈ 2.65; a uniform spread gives ≈ 3.46."""
    if n < 3:
        return None
    xs = np.sort(np.random.default_rng(seed).standard_normal((draws, n)), axis=1)
    w = _within_ss_by_cut(xs)
    cut = w.argmin(axis=1) + 1
    csum = np.cumsum(xs, axis=1)
    low = csum[np.arange(draws), cut - 1] / cut
    high = (csum[:, -1] - csum[np.arange(draws), cut - 1]) / (n - cut)
    score = (high - low) / np.sqrt(w.min(axis=1) / n)
    return dict(what=f"bimodality of {n} iid normal values (one mode)", draws=draws, seed=seed,
                median=float(np.median(score)), p95=float(np.percentile(score, 95)))


def bimodality(x):
    """(score, labels, detail) for values x: see the module docstring. score is None (with
    detail["reason"]) where it is undefined."""
    x = np.asarray(x, dtype=np.float64)
    if len(x) < 2:
        return None, None, {"reason": f"needs at least 2 heads with a centroid, has {len(x)}"}
    labels, d = two_means_1d(x)
    gap = d["high_mean"] - d["low_mean"]
    s = math.sqrt(d["within_ss"] / len(x))
    d.update(gap=gap, pooled_std=s, threshold=(d["low_max"] + d["high_min"]) / 2)
    if gap <= 0 or np.ptp(x) == 0:
        return 0.0, labels, d
    if s == 0:
        d["reason"] = "no spread within the two clusters (perfectly separated): gap / 0"
        return None, labels, d
    return gap / s, labels, d


def mcr2_diagnostics(Z, subspaces, eps):
    """Z (n, d) tokens as rows, subspaces (K, p, d) holding each U_kᵀ or None -> dict of R, Rc,
    dR, Rc_orth, dR_orth (floats, nats) and neumann_radius (model.neumann_radius: the series that
    motivates the attention step converges only below 1); all but R None without a dictionary."""
    from model import coding_rate, compressed_coding_rate, neumann_radius  # noqa: PLC0415

    Z = Z.double()
    R = float(coding_rate(Z, eps))
    out = dict(R=R, Rc=None, dR=None, Rc_orth=None, dR_orth=None, neumann_radius=None,
               n_tokens=int(Z.shape[0]))
    if subspaces is not None:
        U = subspaces.detach().double().to(Z.device)
        Rc = float(compressed_coding_rate(Z, U, eps))
        # An orthonormal basis of each span: Q of U_k = QR, returned as (K, p, d) like U. This is
        # the normalised R^c: it depends on the subspaces only, not on the scale of U.
        Q = torch.linalg.qr(U.transpose(1, 2)).Q.transpose(1, 2)
        Rc_orth = float(compressed_coding_rate(Z, Q, eps))
        out.update(Rc=Rc, dR=R - Rc, Rc_orth=Rc_orth, dR_orth=R - Rc_orth,
                   neumann_radius=neumann_radius(Z, U, eps))
    return out


# -----------------------------------------------------------------------------
# Signal vs noise: contrasts on the designed head groups, and tests of them.
# The claim under test is that signal heads look further back and sit lower in their band than
# noise heads. Each contrast is, within one layer, the mean over signal heads minus the mean over
# noise heads, so anything shared by a layer's heads (a layer effect) cancels exactly; 2-means
# bimodality pools layers and cannot tell the two apart. A checkpoint is tested by permuting the
# group labels among each layer's heads; a set of seeds by flipping the signs of per-seed
# differences (stats.py), against a control variant or the same seeds' untrained checkpoints.

CONTRASTS = {  # name: (head field, transform); expected sign for the claim in the comment
    "log_distance": ("mean_distance", math.log),                  # > 0: signal looks further
    "log_distance_no_self": ("mean_distance_no_self", math.log),  # > 0, self-attention left out
    "log_centroid_in_band": ("centroid_in_band", math.log),       # < 0: signal lower in band
    "self_attention": ("self_attention", float),                  # attention mass on itself
}


def _head_values(heads, contrast):
    field, transform = CONTRASTS[contrast]
    return [transform(h[field]) if h.get(field) is not None and h.get("group")
            and (transform is float or h[field] > 0) else None for h in heads]


def _contrast(values, groups):
    sig = [v for v, g in zip(values, groups) if g == "signal" and v is not None]
    noi = [v for v, g in zip(values, groups) if g == "noise" and v is not None]
    return float(np.mean(sig) - np.mean(noi)) if sig and noi else None


def layer_contrasts(heads):
    """[{layer, <contrast>: signal mean − noise mean, ...}] per layer, and the mean over layers as
    layer "all"; None where a group is missing or the field does not apply."""
    layers = sorted({h["layer"] for h in heads})
    out = []
    for l in layers:
        hs = [h for h in heads if h["layer"] == l]
        out.append(dict(layer=l, **{c: _contrast(_head_values(hs, c), [h["group"] for h in hs])
                                    for c in CONTRASTS}))
    overall = {}
    for c in CONTRASTS:
        vals = [row[c] for row in out]
        overall[c] = float(np.mean(vals)) if vals and all(v is not None for v in vals) else None
    return out + [dict(layer="all", **overall)]


def label_permutation_test(heads, contrast, draws=9999, seed=0):
    """One checkpoint: is the designed signal/noise contrast (mean over layers) larger than label
    shuffles within each layer give? -> {statistic, p} with a two-sided Monte Carlo p-value
    (1 + #{|T*| ≥ |T|}) / (1 + draws); None where the contrast does not apply."""
    by_layer = {}
    for h, v in zip(heads, _head_values(heads, contrast)):
        if v is not None:
            by_layer.setdefault(h["layer"], ([], []))
            by_layer[h["layer"]][0].append(v)
            by_layer[h["layer"]][1].append(h["group"] == "signal")
    layers = [(np.array(v), np.array(s)) for v, s in by_layer.values() if 0 < sum(s) < len(s)]
    if not layers:
        return dict(statistic=None, p=None, draws=draws)

    def statistic(perm_masks):  # (draws, n) boolean masks per layer -> (draws,) statistics
        return np.mean([(m * v).sum(-1) / m.sum(-1) - (~m * v).sum(-1) / (~m).sum(-1)
                        for (v, _), m in zip(layers, perm_masks)], axis=0)

    observed = float(statistic([s[None] for _, s in layers])[0])
    rng = np.random.default_rng(seed)
    shuffled = [np.array([rng.permutation(s) for _ in range(draws)]) for _, s in layers]
    null = statistic(shuffled)
    p = (1 + np.sum(np.abs(null) >= abs(observed) - 1e-12)) / (1 + draws)
    return dict(statistic=observed, p=float(p), draws=draws)


def contrast_test(treated, control=None, level=0.95):
    """Across seeds. treated, control: lists of heads.json dicts paired by index (the same seed).
    Per layer (and "all") and contrast: the per-seed difference treated − control (or treated
    alone when control is None), its mean with a Student-t interval and the exact sign-flip
    p-value -> [{layer, contrast, n, mean, lo, hi, p}]."""
    from lab.stats import paired_summary  # noqa: PLC0415

    if control is not None and len(control) != len(treated):
        raise ValueError(f"{len(treated)} treated but {len(control)} control checkpoints: "
                         "pair them by seed")

    def rows(result):
        return {row["layer"]: row for row in result.get("contrasts") or layer_contrasts(result["heads"])}

    t_rows = [rows(r) for r in treated]
    c_rows = [rows(r) for r in control] if control is not None else None
    out = []
    for layer in t_rows[0]:
        for c in CONTRASTS:
            diffs = []
            for s, tr in enumerate(t_rows):
                a = tr.get(layer, {}).get(c)
                b = 0.0 if c_rows is None else c_rows[s].get(layer, {}).get(c)
                if a is not None and b is not None:
                    diffs.append(a - b)
            if len(diffs) < len(t_rows) or not diffs:
                continue
            s = paired_summary(diffs, level)
            out.append(dict(layer=layer, contrast=c, n=s["n"], mean=s["mean"], lo=s["lo"],
                            hi=s["hi"], p=s["p"]))
    return out


# -----------------------------------------------------------------------------
# Running a model over batches.


def _rope_frequencies(model, layer):
    """(H, p/2) float64 frequencies of a layer's heads on the CPU, or None (no rotary heads)."""
    f = model.rope_frequencies(layer)
    return None if f is None else torch.as_tensor(f, dtype=torch.float64).cpu()


def _per_layer(value, layer):
    """A list with one entry per layer, or one value (e.g. head_groups) for every layer."""
    if value is None:
        return None
    if isinstance(value, list) and len(value) and isinstance(value[0], (torch.Tensor, list, tuple)):
        return value[min(layer, len(value) - 1)]
    return value


def _finite(x):
    return None if x is None or not math.isfinite(x) else float(x)


def _ratio(num, den):
    return float(num / den) if den > 1e-12 else None  # a head whose mass is all on itself


@torch.no_grad()
def analyze_model(model, batches, eps=0.5, max_tokens=4096, num_batches=None, seed=1337,
                  progress=True):
    """Run `model.analyze` over `batches` (an iterable of (x, y) LongTensors) and return the
    heads.json content. Per layer only per-head sums and a capped pool of Z rows are kept."""
    from tqdm import tqdm  # noqa: PLC0415

    model.eval()
    arch = getattr(model, "arch", None) or type(model).__name__
    not_applicable = {}
    n_layer = getattr(getattr(model, "config", None), "n_layer", None)
    freqs_all = [_rope_frequencies(model, l) for l in range(n_layer or 1)]
    if any(f is None for f in freqs_all):
        freqs_all = None
    groups_all = model.head_groups()
    if freqs_all is None:
        why = f"no rotary heads (arch {arch}): no rotary frequencies to measure"
        for key in ("spectrum", "spectral_centroid", "centroid_in_band", "regime", "bimodality",
                    "bimodality_in_band"):
            not_applicable[key] = why
    if groups_all is None:
        not_applicable["group"] = f"no designed signal/noise head groups (arch {arch})"
    gen = torch.Generator().manual_seed(seed)
    per_batch = None if num_batches is None else math.ceil(max_tokens / max(1, num_batches))

    acc = None  # per layer: dict of running sums
    loss_sum, loss_n, tokens = 0.0, 0, 0
    for x, y in tqdm(batches, total=num_batches, desc="analyzing", unit="batch",
                     disable=not progress, file=sys.stderr):
        _, loss, layers = model.analyze(x, y)
        if loss is not None:
            loss_sum, loss_n = loss_sum + float(loss) * x.numel(), loss_n + x.numel()
        tokens += x.numel()
        if acc is None:
            acc = [dict(dist=0, ent=0, self=0, nq=0, E=0, nt=0, Z=[], nz=0) for _ in layers]
        for rec, a in zip(layers, acc):
            if "attn" in rec:
                s = attention_sums(rec["attn"])
                a["dist"], a["ent"] = a["dist"] + s["distance"], a["ent"] + s["entropy"]
                a["self"], a["nq"] = a["self"] + s["self_mass"], a["nq"] + s["n_queries"]
            if freqs_all is not None and "q" in rec and "k" in rec:
                E, n = spectrum_sums(rec["q"], rec["k"])
                a["E"], a["nt"] = a["E"] + E, a["nt"] + n
            if "z" in rec and a["nz"] < max_tokens:
                z = rec["z"].reshape(-1, rec["z"].shape[-1])
                take = min(per_batch or max_tokens, max_tokens - a["nz"], z.shape[0])
                pick = torch.randperm(z.shape[0], generator=gen)[:take].to(z.device)
                a["Z"].append(z[pick].double().cpu())
                a["nz"] += take
        del layers
    if acc is None:
        raise UsageError("no batches to analyze")

    heads, layers_out = [], []
    for l, a in enumerate(acc):
        H = a["dist"].shape[0] if isinstance(a["dist"], torch.Tensor) else None
        freqs = _per_layer(freqs_all, l)
        groups = _per_layer(groups_all, l)
        if isinstance(a["E"], torch.Tensor):
            H = H or a["E"].shape[0]
        if freqs is not None and isinstance(a["E"], torch.Tensor) and (
                tuple(freqs.shape) != tuple(a["E"].shape)):
            not_applicable.setdefault(
                "spectrum", f"rope_frequencies {tuple(freqs.shape)} do not match the heads' "
                            f"rotary pairs {tuple(a['E'].shape)}")
            freqs = None
        E = a["E"] / a["nt"] if isinstance(a["E"], torch.Tensor) and freqs is not None else None
        centroid = spectral_centroid(E, freqs) if E is not None else None
        for h in range(H or 0):
            c = _finite(float(centroid[h])) if centroid is not None else None
            heads.append(dict(
                layer=l, head=h,
                group=groups[h] if groups is not None else None,
                mean_distance=float(a["dist"][h] / a["nq"]) if a["nq"] else None,
                mean_distance_no_self=_ratio(a["dist"][h], a["nq"] - a["self"][h]) if a["nq"] else None,
                self_attention=float(a["self"][h] / a["nq"]) if a["nq"] else None,
                entropy=float(a["ent"][h] / a["nq"]) if a["nq"] else None,
                spectral_centroid=c,
                centroid_wavelength=(2 * math.pi / c) if c else None,
                centroid_in_band=(c / float(freqs[h].max())) if c else None,
                regime=None,
                spectrum=[float(v) for v in E[h]] if E is not None else None,
                frequencies=[float(v) for v in freqs[h]] if E is not None else None,
            ))
        if a["nz"]:
            subspaces = model.subspaces(l)
            if subspaces is None:
                not_applicable.setdefault("Rc", f"no dictionary of subspaces (arch {arch})")
                not_applicable.setdefault("dR", not_applicable["Rc"])
            diag = mcr2_diagnostics(torch.cat(a["Z"]), subspaces, eps)
        else:
            not_applicable.setdefault("R", "the model records no layer input tokens z")
            diag = dict(R=None, Rc=None, dR=None, Rc_orth=None, dR_orth=None,
                        neumann_radius=None, n_tokens=0)
        layers_out.append(dict(layer=l, **diag))

    result = dict(
        arch=arch,
        model_config=_jsonable(getattr(getattr(model, "config", None), "__dict__", {})),
        val_loss=loss_sum / loss_n if loss_n else None,
        tokens_analyzed=tokens,
        eps=eps,
        max_tokens=max_tokens,
        bimodality=None,
        bimodality_detail=None,
        bimodality_null=None,
        bimodality_in_band=None,
        bimodality_in_band_detail=None,
        regime_agreement=None,
        layers=layers_out,
        heads=heads,
    )
    _add_regimes(result, not_applicable)
    if groups_all is not None:
        result["contrasts"] = layer_contrasts(heads)
        result["contrast_tests"] = {c: label_permutation_test(heads, c) for c in CONTRASTS}
    else:
        result["contrasts"] = result["contrast_tests"] = None
        not_applicable["contrasts"] = not_applicable["group"]
    cfg = getattr(model, "config", None)
    if getattr(cfg, "rope_bands", None) == "shift":  # PRISM's ×rope_ratio band shift, computed
        from model import band_facts  # noqa: PLC0415

        result["band_facts"] = band_facts(cfg.head_dim, cfg.rope_theta, cfg.rope_ratio,
                                          cfg.block_size)
    else:
        result["band_facts"] = None
    result["summary"] = _summary(heads)
    result["not_applicable"] = not_applicable
    result["definitions"] = DEFINITIONS
    return result


def _add_regimes(result, not_applicable):
    heads = result["heads"]
    with_c = [h for h in heads if h["spectral_centroid"] is not None]
    if "bimodality" in not_applicable:
        return
    if len(with_c) < len(heads):
        not_applicable.setdefault(
            "regime_some_heads", f"{len(heads) - len(with_c)} heads have no q/k energy: no centroid")
    score, labels, detail = bimodality([math.log(h["spectral_centroid"]) for h in with_c])
    result["bimodality"], result["bimodality_detail"] = score, detail
    result["bimodality_null"] = bimodality_null(len(with_c))
    if score is None and "reason" in detail:
        not_applicable["bimodality"] = detail["reason"]
    if labels is not None:
        for h, lab in zip(with_c, labels):
            h["regime"] = "noise" if lab else "signal"
        detail["threshold_frequency"] = math.exp(detail["threshold"])
        grouped = [h for h in with_c if h["group"] is not None]
        if grouped:
            result["regime_agreement"] = sum(h["regime"] == h["group"] for h in grouped) / len(grouped)
    score, _, detail = bimodality([math.log(h["centroid_in_band"]) for h in with_c])
    result["bimodality_in_band"], result["bimodality_in_band_detail"] = score, detail


def _summary(heads):
    """Per designed group and per regime: head count, mean of mean_distance and entropy, and the
    geometric mean of the spectral centroid."""
    out = {}
    for key in ("group", "regime"):
        for name in ("signal", "noise"):
            hs = [h for h in heads if h[key] == name]
            if not hs:
                continue
            cs = [h["spectral_centroid"] for h in hs if h["spectral_centroid"]]
            out[f"{key}={name}"] = dict(
                heads=len(hs),
                mean_distance=float(np.mean([h["mean_distance"] for h in hs])),
                entropy=float(np.mean([h["entropy"] for h in hs])),
                spectral_centroid=float(np.exp(np.mean(np.log(cs)))) if cs else None)
    return out


def _jsonable(d):
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool, type(None)))}


DEFINITIONS = {
    "mean_distance": "sum_j A_ij (i - j), averaged over query positions i >= 1, in tokens",
    "self_attention": "A_ii, averaged over query positions i >= 1",
    "mean_distance_no_self": "sum_i sum_j A_ij (i - j) / sum_i (1 - A_ii), queries i >= 1",
    "entropy": "-sum_j A_ij ln A_ij, averaged over query positions i >= 1, in nats",
    "spectrum": "E(i) = mean over tokens of |q^(i)| |k^(i)|, rotary pair i = dims (i, i + p/2)",
    "spectral_centroid": "exp(sum_i E(i) ln w_i / sum_i E(i)), angular frequency in rad/token",
    "centroid_wavelength": "2 pi / spectral_centroid, in tokens",
    "centroid_in_band": "spectral_centroid / w_0 of the head's own band (its fastest frequency)",
    "contrasts": "per layer (and 'all' = mean over layers): mean over designed signal heads "
                 "minus mean over noise heads of ln mean_distance, ln mean_distance_no_self, "
                 "ln centroid_in_band and self_attention",
    "contrast_tests": "layer-'all' contrast against group labels shuffled within each layer: "
                      "two-sided Monte Carlo p = (1 + #{|T*| >= |T|}) / (1 + draws)",
    "bimodality": "secondary: exact 1-D 2-means on x = ln(spectral_centroid) over all heads of "
                  "all layers; (m_high - m_low) / sqrt(W / n), W = within-cluster sum of squares",
    "regime": "signal = head in the low-frequency 2-means cluster, noise = in the high one",
    "regime_agreement": "fraction of heads whose regime equals their designed group",
    "bimodality_null": "median / 95th percentile of the score for as many iid normal values",
    "bimodality_in_band": "the same score on ln(centroid_in_band)",
    "R": "1/2 logdet(I + d/(n eps^2) Z^T Z) of the layer's normalised input tokens, nats",
    "Rc": "sum_k 1/2 logdet(I + p/(n eps^2) (Z U_k)^T (Z U_k)) with the dictionary as held",
    "dR": "R - Rc",
    "Rc_orth": "normalised Rc: each U_k replaced by an orthonormal basis of its span",
    "dR_orth": "R - Rc_orth (at eps = 0.5 and rho = 2, < 0 even for ideal union-of-subspaces tokens)",
    "neumann_radius": "max_k beta lambda_max(W_k^T W_k), beta = p/(n eps^2): the Neumann series "
                      "behind the attention step converges only below 1",
}


# -----------------------------------------------------------------------------
# Data.


def evenly_spaced_batches(data, batch_size, block_size, num_batches, device="cpu"):
    """num_batches (x, y) pairs of batch_size windows of block_size tokens (y = x shifted by one)
    from the 1-D token array `data`, at evenly spaced offsets (deterministic)."""
    n = num_batches * batch_size
    last = len(data) - block_size - 1
    starts = np.linspace(0, last, n).round().astype(np.int64) if n > 1 else np.zeros(1, np.int64)
    for b in range(num_batches):
        rows = [np.asarray(data[s:s + block_size + 1], dtype=np.int64)
                for s in starts[b * batch_size:(b + 1) * batch_size]]
        xy = torch.from_numpy(np.stack(rows))
        yield xy[:, :-1].to(device), xy[:, 1:].to(device)


def open_tokens(data_dir, split, block_size, vocab_size):
    path = Path(data_dir) / f"{split}.bin"
    if not path.is_file():
        raise UsageError(f"no {split}.bin in {data_dir}")
    try:
        data = np.memmap(path, dtype=np.uint16, mode="r")
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read {path} ({e})") from None
    if len(data) < block_size + 1:
        raise UsageError(f"{path} has {len(data)} tokens, fewer than block_size + 1 = "
                         f"{block_size + 1}: pass a smaller --block_size")
    top = int(data.max())
    if top >= vocab_size:
        raise UsageError(f"{path} holds token {top}, outside the model's vocabulary of {vocab_size}"
                         " (data prepared with another vocabulary?)")
    return data


# -----------------------------------------------------------------------------
# Output.


def write_json(result, path):
    """heads.json. Top level: arch, model_config, data, val_loss (on the analysed windows),
    tokens_analyzed, eps, max_tokens, contrasts [{layer, log_distance, log_distance_no_self,
    log_centroid_in_band, self_attention}], contrast_tests {contrast: {statistic, p, draws}},
    band_facts, bimodality (+ _detail), bimodality_null, bimodality_in_band (+ _detail),
    regime_agreement, summary, not_applicable {field: reason}, definitions {field: text},
    layers [{layer, R, Rc, dR, Rc_orth, dR_orth, neumann_radius, n_tokens}], heads [{layer, head,
    group, mean_distance, mean_distance_no_self, self_attention, entropy, spectral_centroid,
    centroid_wavelength, centroid_in_band, regime, spectrum [E(i)], frequencies [ω_i]}]."""
    Path(path).write_text(json.dumps(_clean(result), indent=1, allow_nan=False) + "\n",
                          encoding="utf-8")


def _clean(x):
    """JSON has no NaN or infinity: a non-finite number (e.g. the loss of a diverged model) -> null."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _plt():
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def _note(ax, text):
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, transform=ax.transAxes,
            fontsize=11)
    ax.set_xticks([])
    ax.set_yticks([])


def _title(result):
    cfg = result.get("model_config", {})
    parts = [result["arch"]]
    if "rope_ratio" in cfg:
        parts.append(f"rope_ratio={cfg['rope_ratio']:.4g}")
    if result.get("val_loss") is not None:
        data = result.get("data") or {}
        windows = (f"{data['num_batches'] * data['batch_size']} windows of {data['block_size']} "
                   f"{data['split']} tokens" if data else "the analysed windows")
        parts.append(f"loss {result['val_loss']:.3f} on {windows}")
    return ", ".join(parts)


def plot_head_spectra(result, path):
    plt = _plt()
    from matplotlib.colors import Normalize  # noqa: PLC0415
    from matplotlib.patches import Rectangle  # noqa: PLC0415

    n_layers = len(result["layers"])
    heads = result["heads"]
    has_spectrum = any(h["spectrum"] is not None for h in heads)
    ncols = min(4, max(1, n_layers))
    nrows = math.ceil(n_layers / ncols) if has_spectrum else 1
    if not has_spectrum:
        ncols = 1
    n_heads = max((h["head"] for h in heads), default=0) + 1
    fig, axes = plt.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True,
                             layout="constrained",
                             figsize=(3.6 * ncols + 1.4, 0.16 * n_heads * nrows + 1.3 * nrows + 0.8))
    if not has_spectrum:
        _note(axes[0, 0], result["not_applicable"].get("spectrum", "no head spectrum"))
        fig.suptitle(f"head spectra — {_title(result)}")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return
    vmax = max(max(np.array(h["spectrum"]) / max(sum(h["spectrum"]), 1e-300))
               for h in heads if h["spectrum"] is not None)
    norm = Normalize(0, vmax)
    mesh = None
    for l in range(nrows * ncols):
        ax = axes[l // ncols, l % ncols]
        if l >= n_layers:
            ax.axis("off")
            continue
        for h in (h for h in heads if h["layer"] == l and h["spectrum"] is not None):
            f = np.array(h["frequencies"])
            e = np.array(h["spectrum"])
            order = np.argsort(f)
            f, share = f[order], e[order] / max(e.sum(), 1e-300)
            # cell edges halfway (geometrically) between neighbouring frequencies
            mid = np.sqrt(f[1:] * f[:-1]) if len(f) > 1 else np.array([])
            lo = f[0] ** 2 / mid[0] if len(mid) else f[0] / 2
            hi = f[-1] ** 2 / mid[-1] if len(mid) else f[0] * 2
            edges = np.concatenate([[lo], mid, [hi]])
            mesh = ax.pcolormesh(edges, [h["head"] - 0.5, h["head"] + 0.5], share[None, :],
                                 cmap="viridis", norm=norm, shading="flat")
            if h["spectral_centroid"]:
                ax.plot(h["spectral_centroid"], h["head"], marker="|", color="white",
                        markersize=7, markeredgewidth=2)
            ax.add_patch(Rectangle((-0.06, h["head"] - 0.5), 0.04, 1, clip_on=False,
                                   transform=ax.get_yaxis_transform(),
                                   color=GROUP_COLORS.get(h["group"], "#7f7f7f")))
        ax.set_xscale("log")
        ax.set_ylim(n_heads - 0.5, -0.5)
        ax.set_title(f"layer {l}", fontsize=10)
        if l % ncols == 0:
            ax.set_ylabel("head")
        if l // ncols == nrows - 1:
            ax.set_xlabel("rotary frequency ω (rad/token)")
    bar = ("designed group (blue signal, red noise)" if any(h["group"] for h in heads)
           else "grey, no designed groups")
    fig.suptitle(f"head spectra: energy share E(i)/ΣE per rotary pair — {_title(result)}\n"
                 f"left bar: {bar}; white tick: spectral centroid; blank cells: frequencies "
                 f"outside the head's own band", fontsize=10)
    fig.colorbar(mesh, ax=axes.ravel().tolist(), label="energy share", shrink=0.9,
                 fraction=0.03, pad=0.02)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _major_labels_only(axis):
    """Log axes label their minor ticks when a decade is short, and the labels then collide."""
    from matplotlib.ticker import NullFormatter  # noqa: PLC0415

    axis.set_minor_formatter(NullFormatter())


def _scatter_heads(ax, heads, xkey):
    """Mean distance against heads' `xkey` (None: spread by layer), coloured by designed group."""
    for group in ("signal", "noise", None):
        hs = [h for h in heads if h["group"] == group and h["mean_distance"] is not None
              and (xkey is None or h[xkey])]
        if not hs:
            continue
        if xkey is None:
            n_heads = max(h["head"] for h in hs) + 1
            xs = [h["layer"] + 0.8 * (h["head"] + 0.5) / n_heads - 0.4 for h in hs]
        else:
            xs = [h[xkey] for h in hs]
        ys = [max(h["mean_distance"], 1e-2) for h in hs]
        label = f"{group} heads" if group else "heads (no designed groups)"
        ax.scatter(xs, ys, s=28, alpha=0.8, color=GROUP_COLORS[group], label=label,
                   edgecolor="black", linewidth=0.4)
        if len(heads) <= 160:
            for x, y, h in zip(xs, ys, hs):
                ax.annotate(str(h["layer"]), (x, y), fontsize=6, xytext=(3, 2),
                            textcoords="offset points")
    dists = [h["mean_distance"] for h in heads if h["mean_distance"] is not None]
    if dists and max(dists) > 20 * max(min(dists), 1e-2):
        ax.set_yscale("log")  # distances spanning orders of magnitude
        _major_labels_only(ax.yaxis)
    else:
        ax.ticklabel_format(axis="y", useOffset=False)
    if xkey is None:
        ax.set_xticks(sorted({h["layer"] for h in heads}))
    ax.grid(True, which="major", alpha=0.3)


def plot_distance_vs_centroid(result, path):
    """Left: against the spectral centroid (what `bimodality` and `regime` use). Right: against
    centroid_in_band, the same with the designed ×rope_ratio offset of the noise band removed."""
    plt = _plt()
    heads = result["heads"]
    has_c = any(h["spectral_centroid"] for h in heads)
    if not has_c:
        fig, ax = plt.subplots(figsize=(7, 5))
        _scatter_heads(ax, heads, None)
        ax.set_xlabel("layer (no rotary heads: spectral centroid does not apply)")
        ax.set_ylabel("mean attention distance (tokens)")
        ax.set_title(f"attention distance by layer — {_title(result)}\n"
                     + result["not_applicable"].get("spectral_centroid", ""), fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    panels = [("spectral_centroid", "bimodality", "spectral centroid ω̄ (rad/token)"),
              ("centroid_in_band", "bimodality_in_band",
               "centroid in band ω̄ / ω₀ (band offset removed)")]
    for ax, (xkey, bkey, xlabel) in zip(axes, panels):
        _scatter_heads(ax, heads, xkey)
        ax.set_xscale("log")
        _major_labels_only(ax.xaxis)
        ax.set_xlabel(xlabel)
        detail = result.get(f"{bkey}_detail") or {}
        if "threshold" in detail:
            ax.axvline(math.exp(detail["threshold"]), color="grey", linestyle="--", linewidth=1,
                       label="2-means threshold")
        b = result.get(bkey)
        sub = f"{bkey.replace('_', ' ')} " + (f"{b:.2f}" if b is not None else "n/a")
        null = result.get("bimodality_null")
        if null and b is not None:
            sub += f" (one mode: {null['median']:.2f}, 95% < {null['p95']:.2f})"
        if xkey == "spectral_centroid" and result.get("regime_agreement") is not None:
            sub += f"; regime = group for {100 * result['regime_agreement']:.0f}% of heads"
        ax.set_title(sub, fontsize=10)
    axes[0].set_ylabel("mean attention distance (tokens)")
    axes[0].legend(fontsize=8)
    contrasts = ""
    if result.get("contrasts"):
        overall, tests = result["contrasts"][-1], result["contrast_tests"]
        contrasts = "\nsignal − noise, mean over layers: " + ", ".join(
            f"{c} {overall[c]:+.2f} (label-shuffle p = {tests[c]['p']:.2g})"
            for c in ("log_distance", "log_centroid_in_band") if overall[c] is not None)
    fig.suptitle(f"attention distance vs spectral centroid, one point per head (number: layer)"
                 f" — {_title(result)}{contrasts}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_coding_rate(result, path):
    plt = _plt()
    layers = result["layers"]
    fig, ax = plt.subplots(figsize=(11, 5))
    xs = [d["layer"] for d in layers]
    styles = [("R", "$R(Z)$", "black", "-"),
              ("Rc_orth", "$R^c$, normalised (orthonormal basis of each $U_k$)", "#1f77b4", "-"),
              ("dR_orth", "$\\Delta R = R - R^c$, normalised", "#2ca02c", "-"),
              ("Rc", "$R^c$ of $U$ as held (scales with $\\|U\\|$)", "#1f77b4", "--"),
              ("dR", "$\\Delta R$ of $U$ as held", "#2ca02c", "--")]
    drawn = 0
    for key, label, color, ls in styles:
        pts = [(x, d[key]) for x, d in zip(xs, layers) if d[key] is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", color=color, linestyle=ls, label=label)
            drawn += 1
    if drawn == 0:
        _note(ax, result["not_applicable"].get("R", "no coding rates"))
    else:
        ax.set_xlabel("layer")
        ax.set_ylabel("nats")
        ax.set_xticks(xs)
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
        ax.grid(True, alpha=0.3)
    n = layers[0]["n_tokens"] if layers else 0
    sub = f"ε = {result['eps']}, n = {n} tokens per layer"
    radius = [d["neumann_radius"] for d in layers if d.get("neumann_radius") is not None]
    if radius:  # how far the attention step is from the series it is derived from
        sub += (f"\nNeumann radius β·λ_max {min(radius):.3g} to {max(radius):.3g} by layer "
                "(the series behind the attention step needs < 1)")
    if "Rc" in result["not_applicable"]:
        sub += f"; R^c, ΔR: {result['not_applicable']['Rc']}"
    ax.set_title(f"MCR² coding rates by layer — {_title(result)}\n{sub}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(result, out_dir):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(result, out / "heads.json")
    plot_head_spectra(result, out / "head_spectra.png")
    plot_distance_vs_centroid(result, out / "distance_vs_centroid.png")
    plot_coding_rate(result, out / "coding_rate.png")
    return out


# -----------------------------------------------------------------------------
# Command line.


def build_parser():
    p = argparse.ArgumentParser(
        description="Per-head and per-layer analysis of a prism-nano checkpoint on held-out text: "
                    "attention distance and entropy, rotary spectra, signal/noise regimes and "
                    "their bimodality, MCR² coding rates. Writes heads.json and three figures.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    from train import default_checkpoint  # noqa: PLC0415

    p.add_argument("--ckpt", default=default_checkpoint(), help=default_checkpoint_help())
    p.add_argument("--data_dir", default="data/tinystories",
                   help="folder with <split>.bin (uint16 tokens, as prepared for training)")
    p.add_argument("--split", default="val", help="which <split>.bin of data_dir to read")
    p.add_argument("--out_dir", default="out/analysis", help="where heads.json and figures go")
    p.add_argument("--num_batches", type=int, default=10, help="batches to analyse")
    p.add_argument("--batch_size", type=int, default=4, help="windows per batch")
    p.add_argument("--block_size", type=int, default=0,
                   help="tokens per window; 0 = the model's block_size")
    p.add_argument("--eps", type=float, default=0.5, help="precision ε of the coding rates")
    p.add_argument("--max_tokens", type=int, default=4096,
                   help="tokens pooled per layer for the coding rates (spread over the batches)")
    p.add_argument("--seed", type=int, default=1337, help="seed for choosing the pooled tokens")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... or auto")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return p


def check_args(args):
    for name in ("num_batches", "batch_size", "max_tokens"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1 (got {getattr(args, name)})")
    if args.block_size < 0:
        raise UsageError(f"--block_size must be >= 0 (got {args.block_size})")
    if not args.eps > 0:
        raise UsageError(f"--eps must be > 0 (got {args.eps})")


def run(args):
    check_args(args)
    require_checkpoint(args.ckpt)
    if not (Path(args.data_dir) / f"{args.split}.bin").is_file():
        raise UsageError(f"no {args.split}.bin in {args.data_dir}")
    device = pick_device(args.device)
    model = load_checkpoint_model(args.ckpt, device)
    block = args.block_size or model.config.block_size
    if block > model.config.block_size:
        raise UsageError(f"--block_size={block} is longer than the model's block_size "
                         f"{model.config.block_size}")
    if block < 2:
        raise UsageError("--block_size must be >= 2")
    data = open_tokens(args.data_dir, args.split, block, model.config.vocab_size)
    batches = evenly_spaced_batches(data, args.batch_size, block, args.num_batches, device)
    result = analyze_model(model, batches, eps=args.eps, max_tokens=args.max_tokens,
                           num_batches=args.num_batches, seed=args.seed,
                           progress=not args.no_progress)
    result["data"] = dict(ckpt=str(args.ckpt), data_dir=str(args.data_dir), split=args.split,
                          num_batches=args.num_batches, batch_size=args.batch_size,
                          block_size=block, seed=args.seed)
    out = write_outputs(result, args.out_dir)
    print(headline(result) + f"; wrote {out / 'heads.json'} and 3 figures")
    return 0


def headline(result):
    """One line: the layer-"all" signal − noise contrasts with their p-values, then bimodality."""
    parts = [f"{len(result['heads'])} heads in {len(result['layers'])} layers"]
    if result.get("contrasts"):
        overall = result["contrasts"][-1]
        for c in ("log_distance", "log_centroid_in_band"):
            t = result["contrast_tests"][c]
            if overall[c] is not None:
                parts.append(f"signal − noise {c} {overall[c]:+.3f}"
                             + (f" (label-shuffle p = {t['p']:.3g})" if t["p"] is not None else ""))
    b, null = result["bimodality"], result["bimodality_null"]
    if b is not None:
        parts.append(f"bimodality {b:.2f}" + (f" (one mode: {null['median']:.2f}, 95% below "
                                              f"{null['p95']:.2f})" if null else ""))
    return "; ".join(parts)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
