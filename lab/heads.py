"""
The study's tests of head specialisation across seeds, on the heads.json files that
analyze_heads.py writes (one per checkpoint), and the pooled 2-means bimodality score that the
first study used as its headline (kept to re-make RESULTS.md's power table; not a headline now).

contrast_test: per layer (and "all") and contrast, the per-seed difference of analyze_heads'
signal − noise contrasts, treated − control (or treated alone), with its Student-t interval and
the exact sign-flip p of lab/stats.py. compare.py runs it against a control variant or the same
seeds' untrained checkpoints.

bimodality: over all heads of all layers, x = ln(spectral_centroid) (or any values); exact 1-D
2-means (the split of sorted x minimising the within-cluster sum of squares W); score
(m_high − m_low) / sqrt(W / n). It pools layers (a layer effect reads as two modes), includes the
designed +ln π offset of the noise band, and has little power: RESULTS.md measures it.
bimodality_null: its median and 95th percentile for n iid normal values (≈ 2.65 for large n:
2-means always splits).
"""

import math

import numpy as np

from analyze_heads import CONTRASTS, layer_contrasts
from lab.stats import paired_summary


def contrast_test(treated, control=None, level=0.95):
    """Across seeds. treated, control: lists of heads.json dicts paired by index (the same seed).
    Per layer (and "all") and contrast: the per-seed difference treated − control (or treated
    alone when control is None), its mean with a Student-t interval and the exact sign-flip
    p-value -> [{layer, contrast, n, mean, lo, hi, p}]."""
    if control is not None and len(control) != len(treated):
        raise ValueError(f"{len(treated)} treated but {len(control)} control checkpoints: "
                         "pair them by seed")

    def rows(result):
        return {row["layer"]: row
                for row in result.get("contrasts") or layer_contrasts(result["heads"])}

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


def bimodality(x):
    """(score, labels, detail) for values x: see the module docstring. score is None (with
    detail["reason"]) where it is undefined."""
    x = np.asarray(x, dtype=np.float64)
    if len(x) < 2:
        return None, None, {"reason": f"needs at least 2 values, has {len(x)}"}
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

