"""
What every attention head of a checkpoint does on held-out text: how far back it looks, how much
it attends to itself, which rotary frequencies it uses, whether the designed signal heads differ
from the noise heads, how each layer's tokens code under MCR², and, for one word of one story,
where every signal head and every noise head looks from it (the paper's picture).

    python analyze_heads.py                            # the newest out/*/ckpt.pt, on its own data
    python analyze_heads.py --ckpt=out/prism_50m --num_batches=20 --out_dir=out/analysis_50m
    python analyze_heads.py --word=park                # the picture at another word

Writes heads.json (every number) and three figures, four with the word figure, to --out_dir,
from num_batches × batch_size windows at evenly spaced offsets of data_dir/<split>.bin (the same
at every run). docs/PRISM.md §5 defines each measure and states the claim the contrasts test.
"""

import argparse
import json
import math
import sys
import textwrap
from pathlib import Path

import matplotlib
import numpy as np
import torch
from tqdm import tqdm

matplotlib.use("Agg")  # figures to files, no display needed
import matplotlib.pyplot as plt  # noqa: E402

from model import coding_rate, compressed_coding_rate, neumann_radius
from sample import UsageError, find_checkpoint, load_checkpoint_model, load_tokenizer, pick_device

GROUP_COLORS = {"signal": "#1f77b4", "noise": "#d62728", None: "#7f7f7f"}

# -----------------------------------------------------------------------------
# Metrics on plain tensors (hand-built ones test them), as sums that batches accumulate.


def attention_sums(attn):
    """attn (B, H, T, T) causal attention probabilities -> dict of per-head sums over batch and
    query positions i >= 1 (float64, shape (H,)): `distance` Σ_j A_ij (i − j), `entropy`
    −Σ_j A_ij ln A_ij, `self_mass` A_ii; and `n_queries`."""
    B, H, T, _ = attn.shape
    a = attn.double()
    pos = torch.arange(T, dtype=torch.float64, device=a.device)
    # Σ_j A_ij (i − j) = i Σ_j A_ij − Σ_j A_ij j   (A_ij = 0 for j > i)
    per_query = dict(distance=pos * a.sum(-1) - a @ pos,  # each (B, H, T)
                     entropy=-torch.special.xlogy(a, a).sum(-1),
                     self_mass=a.diagonal(dim1=-2, dim2=-1))
    sums = {k: v[..., 1:].sum(dim=(0, 2)).cpu() for k, v in per_query.items()}
    return dict(sums, n_queries=B * (T - 1))


def spectrum_sums(q, k, pairs="interleaved"):
    """q (B, H, T, p), k (B, Hk, T, p) -> (E_sum (H, p/2), n_tokens): per head and rotary pair the
    sum over tokens of ‖q^(i)‖·‖k^(i)‖. A pair is dims (2i, 2i + 1) ("interleaved", PRISM) or
    (i, i + p/2) ("halves", the lab's other models); grouped keys (Hk < H) serve H/Hk heads each."""

    def norms(x):  # (…, p) -> (…, p/2)
        a, b = (x[..., 0::2], x[..., 1::2]) if pairs == "interleaved" else x.chunk(2, dim=-1)
        return torch.hypot(a.double(), b.double())

    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return (norms(q) * norms(k)).sum(dim=(0, 2)).cpu(), q.shape[0] * q.shape[2]


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
        # R^c of the spans alone, whatever U's scale: each U_k replaced by Q of U_k = QR
        Q = torch.linalg.qr(U.transpose(1, 2)).Q.transpose(1, 2)
        Rc_orth = float(compressed_coding_rate(Z, Q, eps))
        bounds = torch.linalg.eigvalsh(torch.einsum("kpd,kpe->de", U, U))  # of DᵀD = Σ U_kᵀU_k
        out.update(Rc=Rc, dR=R - Rc, Rc_orth=Rc_orth, dR_orth=R - Rc_orth,
                   neumann_radius=float(neumann_radius(Z, U, eps)),
                   frame_bounds=[float(bounds[0]), float(bounds[-1])])
    return out


# -----------------------------------------------------------------------------
# Signal vs noise: per layer, the signal heads' mean minus the noise heads' (what a layer's heads
# share cancels), and the label-shuffle test of one checkpoint.

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


def layer_contrasts(heads):
    """[{layer, <contrast>: signal mean − noise mean, ...}] per layer, and the mean over layers as
    layer "all"; None where a group is missing or the field does not apply."""
    rows = []
    for l in sorted({h["layer"] for h in heads}):
        hs, row = [h for h in heads if h["layer"] == l], dict(layer=l)
        for c in CONTRASTS:
            pairs = [(h["group"], v) for h, v in zip(hs, head_values(hs, c)) if v is not None]
            sig, noi = ([v for g, v in pairs if g == want] for want in ("signal", "noise"))
            row[c] = float(np.mean(sig) - np.mean(noi)) if sig and noi else None
        rows.append(row)
    overall = {c: float(np.mean([r[c] for r in rows]))
               if rows and all(r[c] is not None for r in rows) else None for c in CONTRASTS}
    return rows + [dict(layer="all", **overall)]


def label_permutation_test(heads, contrast, draws=9999, seed=0):
    """One checkpoint: is the designed signal/noise contrast (mean over layers) larger than label
    shuffles within each layer give? -> {statistic, p} with a two-sided Monte Carlo p-value
    (1 + #{|T*| ≥ |T|}) / (1 + draws); None where the contrast does not apply."""
    by_layer = {}  # layer: [(value, is signal), ...]
    for h, v in zip(heads, head_values(heads, contrast)):
        if v is not None:
            by_layer.setdefault(h["layer"], []).append((v, h["group"] == "signal"))
    layers = [tuple(map(np.array, zip(*pairs))) for pairs in by_layer.values()]
    layers = [(v, s) for v, s in layers if 0 < s.sum() < len(s)]
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
# Running a model over evenly spaced windows of a split.


def evenly_spaced_batches(data, batch_size, block_size, num_batches, device="cpu"):
    """num_batches (x, y) pairs of batch_size windows of block_size tokens (y = x shifted by one)
    from the 1-D token array `data`, at evenly spaced offsets (deterministic)."""
    last = len(data) - block_size - 1  # the last start with a target for every token
    starts = np.linspace(0, last, num_batches * batch_size).round().astype(np.int64)
    for b in range(num_batches):
        xy = torch.from_numpy(np.stack([np.asarray(data[s:s + block_size + 1], dtype=np.int64)
                                        for s in starts[b * batch_size:(b + 1) * batch_size]]))
        yield xy[:, :-1].to(device), xy[:, 1:].to(device)


def open_tokens(data_dir, split, block_size, vocab_size):
    path = Path(data_dir) / f"{split}.bin"
    try:
        data = np.memmap(path, dtype=np.uint16, mode="r")
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read {path} ({getattr(e, 'strerror', None) or e})") from None
    if len(data) < block_size + 1:
        raise UsageError(f"{path} has {len(data)} tokens, fewer than block_size + 1 = "
                         f"{block_size + 1}: pass a smaller --block_size")
    if int(data.max()) >= vocab_size:
        raise UsageError(f"{path} holds token {int(data.max())}, outside the model's vocabulary of "
                         f"{vocab_size} (data prepared with another vocabulary?)")
    return data


def find_word(data, tokenizer, word, block_size):
    """(tokens, position): the first story of `data` with `word` as a token of its own (after a
    space, or starting a story), up to and including it, at most block_size tokens; or None."""
    for target in (tokenizer.encode(" " + word), tokenizer.encode(word)):
        hits = np.flatnonzero(np.asarray(data) == target[0]) if len(target) == 1 else []
        if len(hits):
            end = int(hits[0]) + 1
            eots = np.flatnonzero(np.asarray(data[max(0, end - block_size):end]) == tokenizer.eot)
            start = max(0, end - block_size) + (int(eots[-1]) + 1 if len(eots) else 0)
            return torch.from_numpy(np.asarray(data[start:end], dtype=np.int64)), end - start - 1
    return None


@torch.no_grad()
def analyze_model(model, batches, eps=0.5, max_tokens=4096, num_batches=None, seed=1337,
                  progress=True):
    """Run `model.analyze` over `batches` (an iterable of (x, y) LongTensors) and return the
    heads.json content. Per layer only per-head sums and a capped pool of Z rows are kept."""
    model.eval()
    arch, n_layer = model.arch, model.config.n_layer

    def ask(hook, *args):  # what a model without such a thing lacks is None
        return getattr(model, hook)(*args) if hasattr(model, hook) else None

    freqs = [ask("rope_frequencies", l) for l in range(n_layer)]
    rotary = all(f is not None for f in freqs)
    freqs = [torch.as_tensor(f, dtype=torch.float64).cpu() for f in freqs] if rotary else None
    groups = ask("head_groups")
    not_applicable = {}
    if not rotary:
        why = f"no rotary heads (arch {arch}): no rotary frequencies to measure"
        not_applicable = dict.fromkeys(("spectrum", "spectral_centroid", "centroid_in_band"), why)
    if groups is None:
        why = f"no designed signal/noise head groups (arch {arch})"
        not_applicable["group"] = not_applicable["contrasts"] = why
    gen = torch.Generator().manual_seed(seed)
    per_batch = max_tokens if num_batches is None else math.ceil(max_tokens / max(1, num_batches))

    acc = [dict(distance=0, entropy=0, self_mass=0, n_queries=0, E=0, n_tokens=0, Z=[], nz=0)
           for _ in range(n_layer)]
    loss_sum, tokens = 0.0, 0
    for x, y in tqdm(batches, total=num_batches, desc="analyzing", unit="batch",
                     disable=not progress, file=sys.stderr):
        _, loss, layers = model.analyze(x, y)
        loss_sum, tokens = loss_sum + float(loss) * x.numel(), tokens + x.numel()
        for rec, a in zip(layers, acc):
            sums = attention_sums(rec["attn"])
            if rotary:
                sums["E"], sums["n_tokens"] = spectrum_sums(rec["q"], rec["k"], model.rope_pairs)
            for key, value in sums.items():
                a[key] = a[key] + value
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
        n, away = a["n_queries"], a["n_queries"] - a["self_mass"]  # away: the mass not on itself
        E = a["E"] / a["n_tokens"] if rotary else None
        centroid = spectral_centroid(E, freqs[l]).tolist() if rotary else [math.nan] * len(away)
        for h, c in enumerate(centroid):
            c = c if math.isfinite(c) else None  # no q·k energy: no centroid
            heads.append(dict(
                layer=l, head=h, group=groups[h] if groups is not None else None,
                mean_distance=float(a["distance"][h] / n),
                mean_distance_no_self=float(a["distance"][h] / away[h]) if away[h] > 1e-12 else None,
                self_attention=float(a["self_mass"][h] / n), entropy=float(a["entropy"][h] / n),
                spectral_centroid=c, centroid_in_band=c / float(freqs[l][h].max()) if c else None,
                spectrum=[float(v) for v in E[h]] if rotary else None,
                frequencies=[float(v) for v in freqs[l][h]] if rotary else None))
        subspaces = ask("subspaces", l)
        if subspaces is None:
            not_applicable["Rc"] = not_applicable["dR"] = f"no dictionary of subspaces (arch {arch})"
        layers_out.append(dict(layer=l, **mcr2_diagnostics(torch.cat(a["Z"]), subspaces, eps)))

    config = {k: v for k, v in vars(model.config).items()
              if isinstance(v, (int, float, str, bool, type(None)))}
    contrasts = tests = None
    if groups is not None:
        contrasts = layer_contrasts(heads)
        tests = {c: label_permutation_test(heads, c) for c in CONTRASTS}
    return dict(arch=arch, model_config=config, val_loss=loss_sum / tokens, tokens_analyzed=tokens,
                eps=eps, max_tokens=max_tokens, layers=layers_out, heads=heads,
                contrasts=contrasts, contrast_tests=tests, not_applicable=not_applicable)


# -----------------------------------------------------------------------------
# Output: heads.json and the figures.


def headline(result, contrasts=True):
    """What was analysed and how its loss was measured; then, with designed groups, the claim's
    contrasts (signal − noise heads, mean over layers) with their label-shuffle p."""
    d = result.get("data") or {}
    where = (f"{d['num_batches'] * d['batch_size']} evenly spaced windows of {d['split']} "
             f"({d['block_size']} tokens each)" if d else "the analysed windows")
    loss = "" if result["val_loss"] is None else f", loss {result['val_loss']:.4f}: the mean"
    lines = [f"{result['arch']}, {len(result['heads'])} heads in {len(result['layers'])} layers"
             f"{loss} over {where}; training's val loss uses random windows"]
    if contrasts and result.get("contrasts"):
        overall, tests = result["contrasts"][-1], result["contrast_tests"]
        lines.append("signal − noise heads, mean over layers: " + ", ".join(
            f"{c} {overall[c]:+.3f} (label-shuffle p = {tests[c]['p']:.3g})"
            for c in ("log_distance", "log_centroid_in_band") if overall[c] is not None))
    return "\n".join(lines)


def _figure(path, title, panels, draw, panel_size=(4.0, 3.0), ncols=None, note=None):
    """The layout every figure shares: `panels` panels in a grid (ncols, or about square), each
    drawn by draw(ax, i), a title above, saved to path. With `note`, one panel saying it."""
    if note:
        panels, draw = 1, lambda ax, i: (ax.text(0.5, 0.5, note, ha="center", va="center", wrap=True,
                                                 transform=ax.transAxes), ax.set_axis_off())
    ncols = ncols or math.ceil(math.sqrt(panels))
    nrows = math.ceil(panels / ncols)
    fig, axes = plt.subplots(nrows, ncols, squeeze=False, layout="constrained",
                             figsize=(panel_size[0] * ncols + 1.0, panel_size[1] * nrows + 1.2))
    for i, ax in enumerate(axes.ravel()):
        draw(ax, i) if i < panels else ax.set_axis_off()
    width = int(fig.get_figwidth() * 14)  # characters of 9-point text a line holds
    fig.suptitle("\n".join(textwrap.fill(line, width) for line in title.split("\n")), fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig


def plot_head_spectra(result, path):
    """One panel per layer: per head (rows), the share of its q·k energy at each rotary frequency
    (columns), its group at the left, its average frequency as a white tick."""
    heads = result["heads"]
    layers = sorted({h["layer"] for h in heads})
    n_heads = max(h["head"] for h in heads) + 1
    spectra = [h for h in heads if h["spectrum"]]
    vmax = max((max(h["spectrum"]) / max(sum(h["spectrum"]), 1e-300) for h in spectra), default=1)

    def draw(ax, i):
        mesh = None
        for h in (h for h in spectra if h["layer"] == layers[i]):
            order = np.argsort(h["frequencies"])
            f = np.array(h["frequencies"])[order]
            share = np.array(h["spectrum"])[order] / max(sum(h["spectrum"]), 1e-300)
            mid = np.sqrt(f[1:] * f[:-1])  # cell edges halfway (geometrically) between frequencies
            edges = np.concatenate([[f[0] ** 2 / mid[0]], mid, [f[-1] ** 2 / mid[-1]]])
            mesh = ax.pcolormesh(edges, [h["head"] - 0.5, h["head"] + 0.5], share[None, :],
                                 cmap="viridis", vmin=0, vmax=vmax, shading="flat")
            if h["spectral_centroid"]:
                ax.plot(h["spectral_centroid"], h["head"], "|", color="white", ms=7, mew=2)
            ax.add_patch(plt.Rectangle((-0.06, h["head"] - 0.5), 0.04, 1, clip_on=False,
                                       transform=ax.get_yaxis_transform(),
                                       color=GROUP_COLORS[h["group"]]))
        ax.set(xscale="log", ylim=(n_heads - 0.5, -0.5), title=f"layer {layers[i]}", ylabel="head",
               xlabel="rotary frequency (radians per token)")
        if mesh is not None and i == len(layers) - 1:
            ax.figure.colorbar(mesh, ax=ax, label="share of the head's energy")

    _figure(path, "Which rotary frequencies each head uses: the share of its query·key energy at "
                  "each frequency (fast on the right tell nearby positions apart, slow on the left "
                  "far ones; white tick: the head's average; left bar: blue signal, red noise "
                  f"head)\n{headline(result, contrasts=False)}", len(layers), draw,
            (4.2, 0.22 * n_heads + 1.4), note=None if spectra else result["not_applicable"]["spectrum"])


def plot_distance_vs_centroid(result, path):
    """One point per head, coloured by group, numbered by layer: how far it looks against its
    average frequency (left) and its place in its band (right); without rotary heads, by layer."""
    heads = result["heads"]
    keys = [("spectral_centroid", "the head's average rotary frequency (radians per token)"),
            ("centroid_in_band", "that frequency over its band's fastest (1 = the top)")]
    if not any(h["spectral_centroid"] for h in heads):
        keys = [(None, "layer (no rotary heads, so no frequencies to plot)")]
    elif all(h["centroid_in_band"] == h["spectral_centroid"] for h in heads):
        keys = keys[:1]  # every band tops at 1 rad/token (PRISM's two bases): one panel says it
    distances = [h["mean_distance"] for h in heads]

    def draw(ax, i):
        xkey, xlabel = keys[i]
        for group in ("signal", "noise", None):
            hs = [h for h in heads if h["group"] == group and (xkey is None or h[xkey])]
            if not hs:
                continue
            n_heads = max(h["head"] for h in hs) + 1  # without a key, spread each layer's heads
            xs = [h[xkey] if xkey else h["layer"] + 0.8 * (h["head"] + 0.5) / n_heads - 0.4
                  for h in hs]
            ys = [max(h["mean_distance"], 1e-2) for h in hs]
            ax.scatter(xs, ys, s=28, alpha=0.8, color=GROUP_COLORS[group], edgecolor="black",
                       linewidth=0.4, label=f"{group} heads" if group else "heads (no groups)")
            for x, y, h in zip(xs, ys, hs):
                ax.annotate(str(h["layer"]), (x, y), fontsize=6, xytext=(3, 2),
                            textcoords="offset points")
        if max(distances) > 20 * max(min(distances), 1e-2):
            ax.set_yscale("log")
            ax.yaxis.set_minor_formatter(plt.NullFormatter())
        if xkey:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set(xlabel=xlabel, ylabel="how far back the head looks\n(mean attention distance, tokens)")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)

    _figure(path, "How far each head looks against the frequencies it uses (number: its layer); "
                  "label-shuffle p: how often shuffled group labels give as large a difference\n"
                  f"{headline(result)}", len(keys), draw, (6.0, 5.0), ncols=len(keys))


def plot_coding_rate(result, path):
    """Left: the MCR² rates of each layer's input tokens. Right: the Neumann radius by layer."""
    layers = result["layers"]
    xs = [d["layer"] for d in layers]
    styles = [("R", "R: the cost of coding the tokens all together", "black", "-"),
              ("Rc_orth", "R$^c$: the cost of coding them subspace by subspace", "#1f77b4", "-"),
              ("dR_orth", "ΔR = R − R$^c$: the gain MCR² maximises", "#2ca02c", "-"),
              ("Rc", "R$^c$ of the dictionary at its learned scale", "#1f77b4", "--"),
              ("dR", "ΔR of the dictionary at its learned scale", "#2ca02c", "--")]

    def draw(ax, i):
        if i == 0:
            for key, label, color, ls in styles:
                pts = [(x, d[key]) for x, d in zip(xs, layers) if d[key] is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="o", color=color, linestyle=ls, label=label)
            ax.axhline(0, color="grey", linewidth=0.5)
            ax.set(ylabel="nats", title=f"MCR² coding rates of each layer's input (ε = "
                   f"{result['eps']}, {layers[0]['n_tokens']} tokens); solid: subspaces as "
                   "orthonormal bases\nan overcomplete dictionary makes ΔR negative even for "
                   "ideal tokens: compare layers, not its sign")
            ax.legend(fontsize=7)
        else:
            radius = [(x, d["neumann_radius"]) for x, d in zip(xs, layers) if d["neumann_radius"]]
            if radius:
                ax.semilogy(*zip(*radius), marker="o", color="#9467bd")
                ax.axhline(1, color="grey", linestyle="--", linewidth=1)
            ax.set(ylabel="β·λmax, the largest over the layer's heads", title="Neumann radius: the "
                   "series the attention is motivated by\nconverges only below 1 (dashed)")
        ax.set(xlabel="layer", xticks=xs)
        ax.title.set_fontsize(8)
        ax.grid(True, alpha=0.3)

    _figure(path, headline(result, contrasts=False), 2, draw, (6.0, 4.5), ncols=2)


@torch.no_grad()
def plot_word_attention(model, tokens, position, tokenizer, path, context=24):
    """The paper's picture: where each head looks from one word. Per layer (rows), the signal
    heads (left) beside the noise heads (right); in each, a head's attention from the word over
    the last `context` tokens up to it. Heads without designed groups all go left."""
    model.eval()
    layers = model.analyze(tokens[None, :position + 1].to(next(model.parameters()).device))[2]
    groups = getattr(model, "head_groups", lambda: None)() or ["heads"] * layers[0]["attn"].shape[1]
    names = list(dict.fromkeys(groups))
    start = max(0, position + 1 - context)
    labels = [tokenizer.decode_bytes([int(t)]).decode("utf-8", "replace")
              for t in tokens[start:position + 1]]

    def draw(ax, i):
        layer, group = divmod(i, len(names))
        rows = [k for k, g in enumerate(groups) if g == names[group]]
        attn = layers[layer]["attn"][0, rows, position, start:position + 1].float().cpu().numpy()
        ax.imshow(attn, cmap="Blues" if names[group] == "signal" else "Reds", vmin=0, vmax=1,
                  aspect="auto")
        ax.set_yticks(range(len(rows)), [f"{names[group]} {k}" for k in rows], fontsize=6)
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
        ax.set_title(f"layer {layer}, {names[group]} heads", fontsize=8)

    return _figure(path, f"Where each head looks from the word '{labels[-1].strip()}' (rightmost "
                         "column): the attention from it to each of the tokens before it, darker = "
                         f"more\n{model.arch}, one story of the analysed split; every row sums to 1 "
                         "over the whole story, of which the last tokens are shown",
                   len(layers) * len(names), draw,
                   (0.25 * len(labels) + 1.5, 0.2 * len(groups) + 1.3), ncols=len(names))


def write_outputs(result, out_dir, figures=True):
    """heads.json and, with figures, the three figures of `result` in out_dir. heads.json: arch,
    model_config, data, val_loss, tokens_analyzed, eps, max_tokens, contrasts (per layer and "all"),
    contrast_tests, not_applicable {field: reason}, layers [R, Rc, dR, Rc_orth, dR_orth,
    neumann_radius, frame_bounds per layer], heads [every measure per head]. JSON has no NaN or
    infinity: a non-finite number (the loss of a diverged model) is null."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clean = json.loads(json.dumps(result), parse_constant=lambda _: None)  # NaN, ±Infinity
    (out / "heads.json").write_text(json.dumps(clean, indent=1, allow_nan=False) + "\n",
                                    encoding="utf-8")
    if figures:
        plot_head_spectra(result, out / "head_spectra.png")
        plot_distance_vs_centroid(result, out / "distance_vs_centroid.png")
        plot_coding_rate(result, out / "coding_rate.png")
    return out


# -----------------------------------------------------------------------------
# Command line.


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", help="a ckpt.pt, or a folder holding one; None: the newest out/*/ckpt.pt")
    p.add_argument("--data_dir", help="folder with <split>.bin; None: the checkpoint's own data")
    p.add_argument("--split", default="val", help="which <split>.bin of data_dir to read")
    p.add_argument("--out_dir", default="out/analysis", help="where heads.json and the figures go")
    p.add_argument("--num_batches", type=int, default=10, help="batches to analyse")
    p.add_argument("--batch_size", type=int, default=4, help="windows per batch")
    p.add_argument("--block_size", type=int, default=0, help="tokens per window; 0: the model's")
    p.add_argument("--eps", type=float, default=0.5, help="precision ε of the coding rates")
    p.add_argument("--max_tokens", type=int, default=4096,
                   help="tokens pooled per layer for the coding rates (spread over the batches)")
    p.add_argument("--seed", type=int, default=1337, help="seed for choosing the pooled tokens")
    p.add_argument("--word", default="door",
                   help="the word of word_attention.png: its first use in the split; '': no figure")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... or auto")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    p.add_argument("--no_figures", action="store_true", help="write heads.json only")
    args = p.parse_args(argv)
    for name in ("num_batches", "batch_size", "max_tokens"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1 (got {getattr(args, name)})")
    if args.block_size < 0 or not args.eps > 0:
        raise UsageError(f"--block_size must be >= 0 and --eps > 0 (got {args.block_size}, {args.eps})")
    return args


def run(args):
    path, device = find_checkpoint(args.ckpt), pick_device(args.device)
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
                           num_batches=args.num_batches, seed=args.seed, progress=not args.no_progress)
    result["data"] = dict(ckpt=str(path), data_dir=str(data_dir), split=args.split,
                          num_batches=args.num_batches, batch_size=args.batch_size,
                          block_size=block, seed=args.seed)
    out = write_outputs(result, args.out_dir, figures=not args.no_figures)
    figures = 0 if args.no_figures else 3
    if args.word and not args.no_figures:
        tokenizer = load_tokenizer(model.vocabulary)
        found = find_word(data, tokenizer, args.word, model.config.block_size)
        if found is None:
            print(f"no '{args.word}' of its own in {args.split}.bin: word_attention.png not drawn")
        else:
            plot_word_attention(model, *found, tokenizer, out / "word_attention.png")
            figures += 1
    print(headline(result) + f"\nwrote {out / 'heads.json'} and {figures} figures")
    return 0


def main(argv=None):
    try:
        return run(parse_args(argv))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
