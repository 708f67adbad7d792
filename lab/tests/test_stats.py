"""stats.py: the exact sign-flip test, the paired interval and Holm's correction."""
import itertools

import numpy as np
import pytest

from lab import stats


def test_sign_flip_enumerates_all_patterns():
    d = [0.3, -0.1, 0.2, 0.5]
    # by hand: the share of the 16 sign patterns whose |mean| reaches the observed one
    obs = abs(np.mean(d))
    count = sum(abs(np.mean(np.array(s) * d)) >= obs - 1e-12
                for s in itertools.product((1, -1), repeat=4))
    assert stats.sign_flip_pvalue(d) == pytest.approx(count / 16)
    assert stats.sign_flip_pvalue(d, "greater") <= stats.sign_flip_pvalue(d)


def test_sign_flip_smallest_p_is_bounded_by_the_number_of_seeds():
    for n in (3, 5, 6, 8):
        all_positive = np.arange(1, n + 1, dtype=float)
        assert stats.sign_flip_pvalue(all_positive) == stats.min_sign_flip_pvalue(n) == 2 / 2**n
    assert stats.min_sign_flip_pvalue(5) > 0.05  # five seeds can never reach 5%, two-sided


def test_sign_flip_is_honest_and_has_power():
    rng = np.random.default_rng(0)
    null = [stats.sign_flip_pvalue(rng.standard_normal(8)) for _ in range(400)]
    assert 0.02 < np.mean(np.array(null) <= 0.05) < 0.09  # rejects ~5% with no effect
    shifted = [stats.sign_flip_pvalue(rng.standard_normal(8) + 1.5) for _ in range(200)]
    assert np.mean(np.array(shifted) <= 0.05) > 0.8  # a shift of 1.5 SD is found


def test_paired_interval_covers_a_known_shift():
    rng = np.random.default_rng(1)
    shift, covered = 0.07, 0
    for _ in range(400):
        s = stats.paired_summary(shift + 0.05 * rng.standard_normal(6))
        covered += s["lo"] <= shift <= s["hi"]
        assert s["lo"] < s["mean"] < s["hi"] and s["n"] == 6
    assert 0.91 < covered / 400 < 0.98  # a 95% interval covers the truth ~95% of the time


def test_holm_orders_and_scales():
    p = [0.01, 0.04, 0.03, None, 0.5]
    adjusted = stats.holm(p)
    # sorted 0.01, 0.03, 0.04, 0.5 -> x4, x3 (0.09), x2 (0.08, lifted to 0.09), x1
    assert adjusted == pytest.approx([0.04, 0.09, 0.09, None, 0.5])
    assert stats.holm([0.9, 0.8]) == [1.0, 1.0]  # capped at 1
    order = np.argsort([x for x in p if x is not None])
    kept = [a for a in adjusted if a is not None]
    assert all(kept[order[i]] <= kept[order[i + 1]] for i in range(len(order) - 1))


def test_correlation_bound_is_exceeded_five_percent_of_the_time_with_no_relation():
    """Independent pairs exceed the bound ~5% of the time; strongly related ones mostly do."""
    rng = np.random.default_rng(2)
    bound = stats.correlation_bound(8)
    assert 0.70 < bound < 0.71  # t(0.975, 6) = 2.447: 2.447 / √(6 + 2.447²)
    null = [abs(np.corrcoef(rng.standard_normal((2, 8)))[0, 1]) for _ in range(4000)]
    assert 0.04 < np.mean(np.array(null) > bound) < 0.06
    x = rng.standard_normal((400, 8))
    related = [np.corrcoef(a, a + 0.3 * rng.standard_normal(8))[0, 1] for a in x]
    assert np.mean(np.array(related) > bound) > 0.9


@pytest.mark.parametrize("df, level, expected", [   # Student-t tables (scipy.stats.t.ppf agrees to 1e-12)
    (1, 0.95, 12.706204736174694), (2, 0.95, 4.302652729749462), (7, 0.95, 2.364624251592785),
    (8, 0.99, 3.355387331333395), (30, 0.90, 1.697260886593957),
])
def test_the_t_quantile_in_closed_form_matches_the_tables(df, level, expected):
    assert stats.t_quantile(level, df) == pytest.approx(expected, rel=1e-10)
