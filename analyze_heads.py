"""
What every attention head of a checkpoint does on held-out text (PRISM.md §6): how far back it
looks, how much it attends to itself, which rotary frequencies it uses, whether the designed signal
heads differ from the noise heads, and how each layer's tokens code under MCR².

    python analyze_heads.py                      # the newest out/*/ckpt.pt, on its own data
    python analyze_heads.py --ckpt=out/prism_50m --num_batches=20 --out_dir=out/analysis_50m

Writes heads.json (every number; schema in `write_json`) and three figures to out_dir:
head_spectra.png, distance_vs_centroid.png and coding_rate.png. The text is num_batches ×
batch_size windows at evenly spaced offsets of data_dir/<split>.bin, the same every run; its loss
is the mean over these windows, and differs a little from train.py's (random windows).

The headline: signal − noise contrasts. The claim under test is that signal heads look further back
and sit lower in their frequency band than noise heads. Per layer a contrast is the mean over the
signal heads minus the mean over the noise heads (so anything shared by a layer's heads cancels) of
  log_distance          ln mean_distance             (> 0: signal heads look further back)
  log_distance_no_self  ln mean_distance_no_self     (the same without attention to itself)
  log_centroid_in_band  ln centroid_in_band          (< 0: signal heads lower in their band)
  self_attention        self_attention               (q = k makes every head lean to itself)
and layer "all" is their mean over layers, tested against shuffles of the group labels within each
layer (contrast_tests). lab/heads.py tests them across seeds.

Definitions (A: a head's causal attention matrix, rows i = queries, columns j <= i = keys; queries
i >= 1, since position 0 can only attend to itself):
  mean_distance      Σ_j A_ij (i − j), averaged over the queries, in tokens.
  self_attention     A_ii, averaged over the queries.
  mean_distance_no_self  Σ_i Σ_j A_ij (i − j) / Σ_i (1 − A_ii): the mean distance of the mass not
                     on the token itself (null for a head that only attends to itself). Where rows
                     sum to less than 1 (a sink, in the lab), the sink counts as distance 0.
  entropy            −Σ_j A_ij ln A_ij, averaged over the queries, in nats.
  spectrum E(i)      mean over tokens of ‖q^(i)‖·‖k^(i)‖, x^(i) the rotary pair i of a head, dims
                     (i, i + p/2) (half-split RoPE); the rotation keeps pair norms.
  spectral_centroid  exp(Σ_i E(i) ln ω_i / Σ_i E(i)), in radians per token: the head's average
                     frequency, weighted by energy on a log scale.
  centroid_in_band   spectral_centroid / ω_0, the fastest frequency of the head's own band: where
                     in its band a head sits, the ×π offset of the noise band removed.
  R, Rc, dR          per layer, on the layer's normalised input tokens Z (at most max_tokens, drawn
                     evenly from the batches): R = ½ log det(I + d/(n ε²) ZᵀZ), Rc = Σ_k ½ log det(I
                     + p/(n ε²) (Z U_k)ᵀ(Z U_k)) with the dictionary as held (grows with ‖U‖),
                     dR = R − Rc.
  Rc_orth, dR_orth   the same with each U_k replaced by an orthonormal basis of its span, so they
                     depend on the subspaces only. With ρ = H·p/d = 2 and ε = 0.5, dR_orth < 0 even
                     for tokens that lie exactly in the subspaces (tests/test_analyze.py): read it
                     across layers and against the untrained checkpoint, not against 0.
  neumann_radius     max_k β·λ_max(W_kᵀW_k) (model.neumann_radius): the series the attention step is
                     derived from converges only where this is below 1.
A model without rotary heads, designed groups or a dictionary gets nulls for what needs them, and
heads.json's `not_applicable` says why.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import matplotlib
import numpy as np
import torch
from tqdm import tqdm

matplotlib.use("Agg")  # figures to files, no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from model import coding_rate, compressed_coding_rate, neumann_radius
from sample import UsageError, find_checkpoint, load_checkpoint_model, pick_device

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


def pair_norms(x, pairs="interleaved"):
    """(…, p) -> (…, p/2): the norm of each rotary pair, dims (2i, 2i + 1) ("interleaved", as
    PRISM rotates them) or (i, i + p/2) ("halves", the lab's other models)."""
    x = x.double()
    if pairs == "interleaved":
        return x.unflatten(-1, (-1, 2)).norm(dim=-1)
    half = x.shape[-1] // 2
    return torch.sqrt(x[..., :half] ** 2 + x[..., half:] ** 2)


def spectrum_sums(q, k, pairs="interleaved"):
    """q (B, H, T, p), k (B, Hk, T, p) -> (E_sum (H, p/2), n_tokens): per head and rotary pair the
    sum over tokens of ‖q^(i)‖·‖k^(i)‖. Grouped keys (Hk < H) are shared by H/Hk query heads."""
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    e = (pair_norms(q, pairs) * pair_norms(k, pairs)).sum(dim=(0, 2))
    return e.cpu(), q.shape[0] * q.shape[2]


def spectral_centroid(energy, freqs):
    """energy, freqs (..., P) -> (...,): exp(Σ E_i ln ω_i / Σ E_i), NaN where Σ E = 0."""
    energy = torch.as_tensor(energy, dtype=torch.float64)
    logf = torch.as_tensor(freqs, dtype=torch.float64).log()
    return torch.exp((energy * logf).sum(-1) / energy.sum(-1))  # 0/0 -> NaN


def mcr2_diagnostics(Z, subspaces, eps):
    """Z (n, d) tokens as rows, subspaces (K, p, d) holding each U_kᵀ or None -> dict of R, Rc,
    dR, Rc_orth, dR_orth (nats) and neumann_radius; all but R None without a dictionary."""
    Z = Z.double()
    R = float(coding_rate(Z, eps))
    out = dict(R=R, Rc=None, dR=None, Rc_orth=None, dR_orth=None, neumann_radius=None,
               frame_bounds=None, n_tokens=int(Z.shape[0]))
    if subspaces is not None:
        U = subspaces.detach().double().to(Z.device)
        Rc = float(compressed_coding_rate(Z, U, eps))
        # An orthonormal basis of each span (Q of U_k = QR), (K, p, d) like U: R^c of the
        # subspaces alone, whatever the scale of U.
        Q = torch.linalg.qr(U.transpose(1, 2)).Q.transpose(1, 2)
        Rc_orth = float(compressed_coding_rate(Z, Q, eps))
        D = U.reshape(-1, U.shape[-1])  # every atom a row
        bounds = torch.linalg.eigvalsh(D.T @ D)  # a tight frame with bound 1: both are 1
        out.update(Rc=Rc, dR=R - Rc, Rc_orth=Rc_orth, dR_orth=R - Rc_orth,
                   neumann_radius=float(neumann_radius(Z, U, eps)),
                   frame_bounds=[float(bounds[0]), float(bounds[-1])])
    return out


# -----------------------------------------------------------------------------
# Signal vs noise: contrasts on the designed head groups, and the label-shuffle test of one
# checkpoint. Within one layer a contrast is the signal heads' mean minus the noise heads', so
# anything shared by a layer's heads cancels exactly.

CONTRASTS = {  # name: (head field, transform); expected sign for the claim in the comment
    "log_distance": ("mean_distance", math.log),                  # > 0: signal looks further
    "log_distance_no_self": ("mean_distance_no_self", math.log),  # > 0, self-attention left out
    "log_centroid_in_band": ("centroid_in_band", math.log),       # < 0: signal lower in band
    "self_attention": ("self_attention", float),                  # attention mass on itself
}


def head_values(heads, contrast):
    """Each head's value of `contrast` (None where it does not apply)."""
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
    out = []
    for l in sorted({h["layer"] for h in heads}):
        hs = [h for h in heads if h["layer"] == l]
        out.append(dict(layer=l, **{c: _contrast(head_values(hs, c), [h["group"] for h in hs])
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
    for h, v in zip(heads, head_values(heads, contrast)):
        if v is not None:
            values, signal = by_layer.setdefault(h["layer"], ([], []))
            values.append(v)
            signal.append(h["group"] == "signal")
    layers = [(np.array(v), np.array(s)) for v, s in by_layer.values() if 0 < sum(s) < len(s)]
    if not layers:
        return dict(statistic=None, p=None, draws=draws)

    def statistic(masks):  # per layer (draws, n) boolean masks -> (draws,) statistics
        return np.mean([(m * v).sum(-1) / m.sum(-1) - (~m * v).sum(-1) / (~m).sum(-1)
                        for (v, _), m in zip(layers, masks)], axis=0)

    observed = float(statistic([s[None] for _, s in layers])[0])
    rng = np.random.default_rng(seed)
    null = statistic([np.array([rng.permutation(s) for _ in range(draws)]) for _, s in layers])
    p = (1 + np.sum(np.abs(null) >= abs(observed) - 1e-12)) / (1 + draws)
    return dict(statistic=observed, p=float(p), draws=draws)


# -----------------------------------------------------------------------------
# Running a model over batches.


def _ratio(num, den):
    return float(num / den) if den > 1e-12 else None  # a head whose mass is all on itself


@torch.no_grad()
def analyze_model(model, batches, eps=0.5, max_tokens=4096, num_batches=None, seed=1337,
                  progress=True):
    """Run `model.analyze` over `batches` (an iterable of (x, y) LongTensors) and return the
    heads.json content. Per layer only per-head sums and a capped pool of Z rows are kept."""
    model.eval()
    arch = model.arch
    n_layer = model.config.n_layer

    def ask(hook, *args):  # what a model without such a thing lacks is None
        return getattr(model, hook)(*args) if hasattr(model, hook) else None

    freqs_all = [ask("rope_frequencies", l) for l in range(n_layer)]
    freqs_all = None if any(f is None for f in freqs_all) else [
        torch.as_tensor(f, dtype=torch.float64).cpu() for f in freqs_all]
    groups = ask("head_groups")
    not_applicable = {}
    if freqs_all is None:
        for key in ("spectrum", "spectral_centroid", "centroid_in_band"):
            not_applicable[key] = f"no rotary heads (arch {arch}): no rotary frequencies to measure"
    if groups is None:
        not_applicable["group"] = f"no designed signal/noise head groups (arch {arch})"
    gen = torch.Generator().manual_seed(seed)
    per_batch = max_tokens if num_batches is None else math.ceil(max_tokens / max(1, num_batches))

    acc = [dict(dist=0, ent=0, self=0, nq=0, E=0, nt=0, Z=[], nz=0) for _ in range(n_layer)]
    loss_sum, tokens = 0.0, 0
    for x, y in tqdm(batches, total=num_batches, desc="analyzing", unit="batch",
                     disable=not progress, file=sys.stderr):
        _, loss, layers = model.analyze(x, y)
        loss_sum, tokens = loss_sum + float(loss) * x.numel(), tokens + x.numel()
        for rec, a in zip(layers, acc):
            s = attention_sums(rec["attn"])
            a["dist"], a["ent"] = a["dist"] + s["distance"], a["ent"] + s["entropy"]
            a["self"], a["nq"] = a["self"] + s["self_mass"], a["nq"] + s["n_queries"]
            if freqs_all is not None:
                E, n = spectrum_sums(rec["q"], rec["k"], model.rope_pairs)
                a["E"], a["nt"] = a["E"] + E, a["nt"] + n
            if a["nz"] < max_tokens:
                z = rec["z"].reshape(-1, rec["z"].shape[-1])
                take = min(per_batch, max_tokens - a["nz"], z.shape[0])
                pick = torch.randperm(z.shape[0], generator=gen)[:take].to(z.device)
                a["Z"].append(z[pick].double().cpu())
                a["nz"] += take
        del layers
    if not tokens:
        raise UsageError("no batches to analyze")

    heads, layers_out = [], []
    for l, a in enumerate(acc):
        freqs = freqs_all[l] if freqs_all is not None else None
        E = a["E"] / a["nt"] if freqs is not None else None
        centroid = spectral_centroid(E, freqs) if E is not None else None
        for h in range(a["dist"].shape[0]):
            c = float(centroid[h]) if centroid is not None else None
            c = c if c is not None and math.isfinite(c) else None  # no q·k energy: no centroid
            heads.append(dict(
                layer=l, head=h, group=groups[h] if groups is not None else None,
                mean_distance=float(a["dist"][h] / a["nq"]),
                mean_distance_no_self=_ratio(a["dist"][h], a["nq"] - a["self"][h]),
                self_attention=float(a["self"][h] / a["nq"]),
                entropy=float(a["ent"][h] / a["nq"]),
                spectral_centroid=c,
                centroid_in_band=(c / float(freqs[h].max())) if c else None,
                spectrum=[float(v) for v in E[h]] if E is not None else None,
                frequencies=[float(v) for v in freqs[h]] if E is not None else None))
        subspaces = ask("subspaces", l)
        if subspaces is None:
            why = f"no dictionary of subspaces (arch {arch})"
            not_applicable["Rc"] = not_applicable["dR"] = why
        layers_out.append(dict(layer=l, **mcr2_diagnostics(torch.cat(a["Z"]), subspaces, eps)))

    config = {k: v for k, v in vars(model.config).items()
              if isinstance(v, (int, float, str, bool, type(None)))}
    result = dict(arch=arch, model_config=config,
                  val_loss=loss_sum / tokens, tokens_analyzed=tokens, eps=eps,
                  max_tokens=max_tokens, layers=layers_out, heads=heads)
    if groups is not None:
        result["contrasts"] = layer_contrasts(heads)
        result["contrast_tests"] = {c: label_permutation_test(heads, c) for c in CONTRASTS}
    else:
        result["contrasts"] = result["contrast_tests"] = None
        not_applicable["contrasts"] = not_applicable["group"]
    result["not_applicable"] = not_applicable
    return result


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
    """heads.json. Top level: arch, model_config, data, val_loss (the mean over the analysed
    windows), tokens_analyzed, eps, max_tokens, contrasts [{layer, log_distance,
    log_distance_no_self, log_centroid_in_band, self_attention}], contrast_tests {contrast:
    {statistic, p, draws}}, not_applicable {field: reason}, layers [{layer, R, Rc, dR, Rc_orth,
    dR_orth, neumann_radius, n_tokens}], heads [{layer, head, group, mean_distance,
    mean_distance_no_self, self_attention, entropy, spectral_centroid, centroid_in_band,
    spectrum [E(i)], frequencies [ω_i]}]. The module docstring defines each."""
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


def _note(ax, text):
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _title(result):
    """What was analysed, and how its loss was measured."""
    data = result.get("data") or {}
    where = (f"{data['num_batches'] * data['batch_size']} evenly spaced windows of "
             f"{data['block_size']} {data['split']} tokens" if data else "the analysed windows")
    loss = result["val_loss"]
    return (f"{result['arch']}, loss {loss:.3f} as the mean over {where}" if loss is not None
            else f"{result['arch']} on {where}") + " (training's val loss uses random windows)"


def plot_head_spectra(result, path):
    """One panel per layer, in a grid: per head (rows), the share of its q·k energy at each rotary
    frequency (columns), its group at the left, its centroid as a white tick."""
    heads = result["heads"]
    n_layers = len(result["layers"])
    if all(h["spectrum"] is None for h in heads):
        fig, ax = plt.subplots(figsize=(7, 4))
        _note(ax, result["not_applicable"]["spectrum"])
        fig.suptitle(_title(result), fontsize=9)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return
    ncols = math.ceil(math.sqrt(n_layers))
    nrows = math.ceil(n_layers / ncols)
    n_heads = max(h["head"] for h in heads) + 1
    fig, axes = plt.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True,
                             layout="constrained",
                             figsize=(3.8 * ncols + 1.2,
                                      max(2.6, 0.2 * n_heads + 1.2) * nrows + 1.3))
    vmax = max(max(h["spectrum"]) / max(sum(h["spectrum"]), 1e-300) for h in heads)
    norm, mesh = Normalize(0, vmax), None
    for l, ax in enumerate(axes.ravel()):
        if l >= n_layers:
            ax.axis("off")
            continue
        for h in (h for h in heads if h["layer"] == l):
            order = np.argsort(h["frequencies"])
            f = np.array(h["frequencies"])[order]
            share = np.array(h["spectrum"])[order] / max(sum(h["spectrum"]), 1e-300)
            # cell edges halfway (geometrically) between neighbouring frequencies
            mid = np.sqrt(f[1:] * f[:-1])
            edges = (np.concatenate([[f[0] ** 2 / mid[0]], mid, [f[-1] ** 2 / mid[-1]]])
                     if len(f) > 1 else np.array([f[0] / 2, f[0] * 2]))
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
        ax.set_yticks(range(n_heads))
        ax.set_title(f"layer {l}", fontsize=10)
        if l % ncols == 0:
            ax.set_ylabel("head")
        if l // ncols == nrows - 1 or l + ncols >= n_layers:
            ax.set_xlabel("rotary frequency (radians per token)")
    bar = ("left bar: the head's designed group (blue signal, red noise)"
           if any(h["group"] for h in heads) else "no designed head groups")
    fig.suptitle("Which rotary frequencies each head uses: the share of its query·key energy at "
                 "each frequency\n(fast frequencies on the right tell apart nearby positions, "
                 "slow ones on the left far ones; white tick: the head's average frequency;\n"
                 f"{bar}; blank: outside the head's own band)\n{_title(result)}", fontsize=9)
    fig.colorbar(mesh, ax=axes.ravel().tolist(), label="share of the head's energy", shrink=0.9,
                 fraction=0.04, pad=0.02)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _scatter_heads(ax, heads, xkey):
    """Mean distance against heads' `xkey` (None: spread by layer), coloured by designed group,
    each point labelled with its layer."""
    for group in ("signal", "noise", None):
        hs = [h for h in heads if h["group"] == group and (xkey is None or h[xkey])]
        if not hs:
            continue
        n_heads = max(h["head"] for h in hs) + 1
        xs = [h[xkey] if xkey else h["layer"] + 0.8 * (h["head"] + 0.5) / n_heads - 0.4
              for h in hs]
        ys = [max(h["mean_distance"], 1e-2) for h in hs]
        ax.scatter(xs, ys, s=28, alpha=0.8, color=GROUP_COLORS[group], edgecolor="black",
                   linewidth=0.4, label=f"{group} heads" if group else "heads (no groups)")
        for x, y, h in zip(xs, ys, hs):
            ax.annotate(str(h["layer"]), (x, y), fontsize=6, xytext=(3, 2),
                        textcoords="offset points")
    dists = [h["mean_distance"] for h in heads]
    if max(dists) > 20 * max(min(dists), 1e-2):  # distances spanning orders of magnitude
        ax.set_yscale("log")
        ax.yaxis.set_minor_formatter(NullFormatter())  # minor labels would collide
    ax.set_ylabel("how far back the head looks\n(mean attention distance, tokens)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)


def plot_distance_vs_centroid(result, path):
    """One point per head: how far it looks against its average frequency (left) and against
    where that sits in the head's own band (right)."""
    heads = result["heads"]
    if not any(h["spectral_centroid"] for h in heads):
        fig, ax = plt.subplots(figsize=(9, 5))
        _scatter_heads(ax, heads, None)
        ax.set_xticks(range(len(result["layers"])))
        ax.set_xlabel("layer (no rotary heads, so no frequencies to plot)")
        ax.set_title(f"How far each head looks, by layer\n{_title(result)}", fontsize=9)
    else:
        fig, axes = plt.subplots(1, 2, figsize=(12, 5.5), sharey=True)
        for ax, key, label in ((axes[0], "spectral_centroid",
                                "the head's average rotary frequency (radians per token)"),
                               (axes[1], "centroid_in_band", "where that frequency sits in the "
                                "head's own band (1 = its fastest)")):
            _scatter_heads(ax, heads, key)
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(label)
        axes[1].set_ylabel("")
        claim = ""
        if result.get("contrasts"):
            overall, tests = result["contrasts"][-1], result["contrast_tests"]
            parts = [f"{what} {overall[c]:+.2f} (p = {tests[c]['p']:.2g})" for c, what in
                     (("log_distance", "log distance"), ("log_centroid_in_band",
                                                         "log place in band"))
                     if overall[c] is not None]
            claim = ("\nsignal minus noise heads, mean over layers: " + ", ".join(parts)
                     + "; p: how often shuffled group labels give as large a difference")
        fig.suptitle("How far each head looks against the frequencies it uses (number: its layer)"
                     f"{claim}\n{_title(result)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_coding_rate(result, path):
    """Left: the MCR² rates of each layer's input tokens. Right: the Neumann radius by layer."""
    layers = result["layers"]
    xs = [d["layer"] for d in layers]
    fig, (ax, ax_r) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [3, 2]})
    styles = [("R", "R: the cost of coding the tokens all together", "black", "-"),
              ("Rc_orth", "R$^c$: the cost of coding them subspace by subspace", "#1f77b4", "-"),
              ("dR_orth", "ΔR = R − R$^c$: the gain MCR² maximises", "#2ca02c", "-"),
              ("Rc", "R$^c$ of the dictionary at its learned scale", "#1f77b4", "--"),
              ("dR", "ΔR of the dictionary at its learned scale", "#2ca02c", "--")]
    for key, label, color, ls in styles:
        pts = [(x, d[key]) for x, d in zip(xs, layers) if d[key] is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", color=color, linestyle=ls, label=label)
    ax.set_xlabel("layer")
    ax.set_ylabel("nats")
    ax.set_xticks(xs)
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)
    title = (f"MCR² coding rates of each layer's input (ε = {result['eps']}, "
             f"{layers[0]['n_tokens']} tokens)")
    if layers[0]["Rc"] is not None:
        title += ("\nsolid: each subspace as an orthonormal basis, dashed: as learned\nan "
                  "overcomplete dictionary can make ΔR negative even for ideal tokens: compare "
                  "layers, not its sign")
    ax.set_title(title, fontsize=9)
    radius = [(x, d["neumann_radius"]) for x, d in zip(xs, layers) if d["neumann_radius"]]
    if radius:
        ax_r.semilogy(*zip(*radius), marker="o", color="#9467bd")
        ax_r.axhline(1, color="grey", linestyle="--", linewidth=1)
        ax_r.text(xs[0], 1, " the series converges below this line", va="bottom", fontsize=8)
        ax_r.set_xticks(xs)
        ax_r.set_xlabel("layer")
        ax_r.set_ylabel("β·λmax, the largest over the layer's heads")
        ax_r.grid(True, alpha=0.3)
        ax_r.set_title("Neumann radius: how far the series the attention is derived from\n"
                       "is from converging (it converges below 1)", fontsize=9)
    else:
        _note(ax_r, result["not_applicable"].get("Rc", "no dictionary"))
    fig.suptitle(_title(result), fontsize=9)
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
        description="What each attention head of a prism-nano checkpoint does on held-out text: "
                    "attention distance and self-attention, rotary spectra, signal/noise "
                    "contrasts, MCR² coding rates. Writes heads.json and three figures.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default=None,
                   help="a checkpoint file, or a folder holding ckpt.pt; default: the newest "
                        "out/*/ckpt.pt")
    p.add_argument("--data_dir", default=None,
                   help="folder with <split>.bin; default: the one the checkpoint was trained on")
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
    path = find_checkpoint(args.ckpt)
    device = pick_device(args.device)
    model, facts = load_checkpoint_model(path, device)
    data_dir = args.data_dir or (facts["train_config"] or {}).get("data_dir")
    if data_dir is None:
        raise UsageError(f"{path} does not say which data it was trained on: give --data_dir")
    block = args.block_size or model.config.block_size
    if not 2 <= block <= model.config.block_size:
        raise UsageError(f"--block_size={block} must be between 2 and the model's block_size "
                         f"{model.config.block_size}")
    data = open_tokens(data_dir, args.split, block, model.config.vocab_size)
    batches = evenly_spaced_batches(data, args.batch_size, block, args.num_batches, device)
    result = analyze_model(model, batches, eps=args.eps, max_tokens=args.max_tokens,
                           num_batches=args.num_batches, seed=args.seed,
                           progress=not args.no_progress)
    result["data"] = dict(ckpt=str(path), data_dir=str(data_dir), split=args.split,
                          num_batches=args.num_batches, batch_size=args.batch_size,
                          block_size=block, seed=args.seed)
    out = write_outputs(result, args.out_dir)
    print(headline(result) + f"\nwrote {out / 'heads.json'} and 3 figures")
    return 0


def headline(result):
    """What was measured (and why its loss is not training's), then the layer-"all" contrasts."""
    d = result["data"]
    lines = [f"{len(result['heads'])} heads in {len(result['layers'])} layers; loss "
             f"{result['val_loss']:.4f}: the mean over {d['num_batches'] * d['batch_size']} evenly "
             f"spaced windows of {d['split']} (training's val loss is over random windows)"]
    if result.get("contrasts"):
        overall = result["contrasts"][-1]
        for c in ("log_distance", "log_centroid_in_band"):
            p = result["contrast_tests"][c]["p"]
            if overall[c] is not None:
                lines.append(f"signal − noise heads, {c} {overall[c]:+.3f} (label-shuffle p = "
                             f"{p:.3g})")
    return "\n".join(lines)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
