"""
Paired statistics over seeds, used by lab/compare.py (losses) and lab/heads.py (head contrasts).

A comparison here is paired: arm A and arm B are trained with the same seeds, and a seed fixes the
data order (and each arm's own initialisation: arms of different shapes share no weights), so the
unit of evidence is the per-seed difference d_s = A_s − B_s. The tests below need only that the
seeds are independent, not that A_s and B_s are correlated (in the study's comparisons the
correlation of two arms' per-seed losses has no consistent sign: r from −0.75 to +0.77, mean +0.09,
over 19 pairs of arms at 8 seeds, where independent pairs exceed |r| = 0.71 one time in 20;
pairing then buys little power, but costs no validity). With n seeds:
  - sign_flip_pvalue: the exact permutation test of "d is symmetric about 0" (under the null each
    d_s is as likely to be −d_s): all 2ⁿ sign patterns, statistic |mean d|. No normality assumed.
    Its smallest possible two-sided p is 2/2ⁿ (0.0625 for 5 seeds, 0.031 for 6, 0.0078 for 8), so
    the number of seeds bounds what any comparison can show: see min_sign_flip_pvalue.
  - paired_summary: the mean difference, its Student-t 95% interval (this one assumes the d_s are
    roughly normal) and the exact p-value, in one record.
  - holm: Holm's step-down correction of a family of p-values (controls the family-wise error rate
    without independence assumptions).
"""

import itertools
import math

import numpy as np

MAX_EXACT_SEEDS = 20  # 2^20 sign patterns; beyond that the exact test is not enumerated


def sign_flip_pvalue(diffs, alternative="two-sided"):
    """Exact sign-flip p-value of the mean of paired differences `diffs` (n ≤ 20).

    alternative: "two-sided" (|mean| as large), "greater" (mean as large), "less" (as small).
    p = (number of sign patterns whose statistic is at least the observed one) / 2ⁿ; the observed
    pattern counts, so p ≥ 1/2ⁿ. A tolerance of 1e-12 (relative) treats ties as ties."""
    d = np.asarray(diffs, dtype=np.float64)
    n = len(d)
    if n == 0:
        raise ValueError("no differences to test")
    if n > MAX_EXACT_SEEDS:
        raise ValueError(f"{n} pairs: the exact test enumerates 2^n patterns, "
                         f"at most 2^{MAX_EXACT_SEEDS}")
    if alternative not in ("two-sided", "greater", "less"):
        raise ValueError(f"alternative must be two-sided, greater or less, not {alternative!r}")
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))  # (2^n, n)
    means = signs @ d / n
    observed = d.mean()
    tol = 1e-12 * max(1.0, float(np.abs(d).max()))
    if alternative == "two-sided":
        hits = np.abs(means) >= abs(observed) - tol
    elif alternative == "greater":
        hits = means >= observed - tol
    else:
        hits = means <= observed + tol
    return float(hits.mean())


def min_sign_flip_pvalue(n, alternative="two-sided"):
    """The smallest p-value sign_flip_pvalue can return for n pairs."""
    return (2.0 if alternative == "two-sided" else 1.0) / 2 ** n


def t_central_probability(t, df):
    """P(|T| < t) for Student's t with an integer df ≥ 1, in closed form (Abramowitz & Stegun
    26.7.3-4): with θ = atan(t/√df), a finite series in cos²θ."""
    theta = math.atan(t / math.sqrt(df))
    c2, term, total = math.cos(theta) ** 2, 1.0, 1.0
    if df % 2 == 0:  # sinθ (1 + c²/2 + 1·3 c⁴/(2·4) + …), df/2 terms
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        return math.sin(theta) * total
    if df == 1:
        return 2 * theta / math.pi
    for k in range(1, (df - 1) // 2):  # (2/π)(θ + sinθ cosθ (1 + 2c²/3 + 2·4 c⁴/(3·5) + …))
        term *= c2 * (2 * k) / (2 * k + 1)
        total += term
    return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)


def t_quantile(level, df):
    """The two-sided Student-t critical value for a `level` interval with an integer df ≥ 1:
    P(|T| < t) = level, by bisection on the closed form."""
    lo, hi = 0.0, 1.0
    while t_central_probability(hi, df) < level:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_central_probability(mid, df) < level else (lo, mid)
    return (lo + hi) / 2


def correlation_bound(n, level=0.95):
    """|r| that n independent pairs from a bivariate normal with no correlation exceed with
    probability 1 − level: r = t/√(n − 2 + t²), t the two-sided Student-t critical value with
    n − 2 degrees of freedom (exact under that null: r√(n − 2)/√(1 − r²) is t-distributed)."""
    t = t_quantile(level, n - 2)
    return t / math.sqrt(n - 2 + t * t)


def paired_summary(diffs, level=0.95):
    """{n, mean, sd, lo, hi, p, min_p} of paired differences: the mean with its Student-t interval
    at `level` (None for fewer than 2 pairs) and the exact two-sided sign-flip p-value."""
    d = np.asarray(diffs, dtype=np.float64)
    n = len(d)
    mean = float(d.mean())
    sd = float(d.std(ddof=1)) if n > 1 else None
    lo = hi = None
    if n > 1:
        half = t_quantile(level, n - 1) * sd / math.sqrt(n)
        lo, hi = mean - half, mean + half
    return dict(n=n, mean=mean, sd=sd, lo=lo, hi=hi, level=level,
                p=sign_flip_pvalue(d), min_p=min_sign_flip_pvalue(n))


def holm(pvalues):
    """Holm-adjusted p-values, in the order given. Sorted ascending p_(1) ≤ … ≤ p_(m), the adjusted
    value of p_(i) is max_{j ≤ i} min(1, (m − j + 1) p_(j)): multiply the smallest by m, the next
    by m − 1, …, and keep the sequence non-decreasing. None entries are passed through."""
    indexed = [(p, i) for i, p in enumerate(pvalues) if p is not None]
    m = len(indexed)
    out = list(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(indexed)):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out
