"""lab/heads.py: the across-seed test of the signal − noise contrasts (power on a planted effect,
quiet on none, paired against a control), and the pooled 2-means bimodality score (its definition,
its null, and why it is no headline: a layer effect reads as two modes, a designed split does
not)."""
import math

import numpy as np
import pytest

import analyze_heads as ah
from lab import heads
from model import build_model
from tests.test_analyze import check_outputs, random_batches, rejection_rate, synthetic_heads


def seeds(rng, n=8, **kw):
    return [dict(heads=synthetic_heads(rng, **kw)) for _ in range(n)]


def across_seed_p(layer="all", contrast="log_distance", control=None):
    def p(results):
        treated = results if control is None else results[0]
        ctrl = None if control is None else results[1]
        row = next(r for r in heads.contrast_test(treated, ctrl)
                   if r["layer"] == layer and r["contrast"] == contrast)
        return row["p"]
    return p


def test_across_seed_test_has_power_and_stays_quiet():
    # 8 seeds (the exact two-sided test's smallest p is 2/2^8), designed split 1 SD per head
    assert rejection_rate(across_seed_p(), 40, lambda r: seeds(r, split=1.0)) > 0.8
    assert rejection_rate(across_seed_p(layer=2), 40, lambda r: seeds(r, split=1.0)) > 0.5
    assert rejection_rate(across_seed_p(), 200, lambda r: seeds(r)) < 0.1
    assert rejection_rate(across_seed_p(), 200,
                          lambda r: seeds(r, layer_effect=(0, 0, 0, 6.0))) < 0.1


def test_across_seed_test_against_a_control_is_paired():
    # trained (split 1 SD) against untrained (no split) seeds: the difference is found ...
    make = lambda r: (seeds(r, split=1.0), seeds(r))  # noqa: E731
    assert rejection_rate(across_seed_p(control=True), 40, make) > 0.8
    # ... and two variants with the same split are not told apart
    same = lambda r: (seeds(r, split=1.0), seeds(r, split=1.0))  # noqa: E731
    assert rejection_rate(across_seed_p(control=True), 150, same) < 0.1
    rows = heads.contrast_test(*make(np.random.default_rng(0)))
    row = next(r for r in rows if r["layer"] == "all" and r["contrast"] == "log_centroid_in_band")
    assert row["n"] == 8 and row["lo"] < row["mean"] < row["hi"] < 0  # signal lower in its band
    with pytest.raises(ValueError, match="pair them by seed"):
        heads.contrast_test(seeds(np.random.default_rng(0)), seeds(np.random.default_rng(0), n=3))


def test_contrast_test_reads_heads_json_contrasts_when_present():
    """A record's heads.json carries its contrasts; a bare list of heads gets them computed."""
    rng = np.random.default_rng(1)
    bare = seeds(rng, split=1.0)
    stored = [dict(r, contrasts=ah.layer_contrasts(r["heads"])) for r in bare]
    assert heads.contrast_test(stored) == heads.contrast_test(bare)


# -- bimodality -----------------------------------------------------------------------------


def test_bimodality_definition():
    x = [0.1, -0.1, 0.0, 5.0, 5.1, 4.9]
    score, labels, d = heads.bimodality(x)
    assert list(labels) == [0, 0, 0, 1, 1, 1]
    assert d["gap"] == pytest.approx(5.0)
    assert d["pooled_std"] == pytest.approx(math.sqrt(4 * 0.01 / 6))
    assert score == pytest.approx(5.0 / math.sqrt(0.04 / 6))
    assert heads.bimodality([2.0, 2.0, 2.0])[0] == 0.0
    assert heads.bimodality([1.0])[0] is None
    none, _, d = heads.bimodality([1.0, 3.0])   # two clusters of one: no spread, no score
    assert none is None and "reason" in d
    # the exact 2-means picks the cut with the least within-cluster sum of squares
    _, labels, _ = heads.bimodality([0, 1, 2, 10, 30])
    assert list(labels) == [0, 0, 0, 0, 1]
    x = np.random.default_rng(3).standard_normal(40)
    xs = np.sort(x)
    brute = min(range(1, 40), key=lambda c: xs[:c].var() * c + xs[c:].var() * (40 - c))
    assert heads.two_means_1d(x)[1]["n_low"] == brute


def test_bimodality_null_matches_theory():
    """One normal mode: cluster means ±sqrt(2/π), within std sqrt(1 − 2/π) -> ≈ 2.65."""
    null = heads.bimodality_null(1000, draws=400)
    theory = 2 * math.sqrt(2 / math.pi) / math.sqrt(1 - 2 / math.pi)
    assert null["median"] == pytest.approx(theory, abs=0.05)
    assert null["p95"] > null["median"]


def test_a_layer_effect_reads_as_bimodality():
    """The contrasts cancel a layer effect (tests/test_analyze.py); the pooled score calls the
    shifted layer a second mode."""
    shifted = synthetic_heads(np.random.default_rng(0), layer_effect=(0, 0, 0, 6.0))
    score, _, _ = heads.bimodality([math.log(h["mean_distance"]) for h in shifted])
    assert score > heads.bimodality_null(len(shifted))["p95"]


def test_pooled_bimodality_misses_a_designed_split_that_the_label_test_finds():
    rng = np.random.default_rng(0)
    null = heads.bimodality_null(32)["p95"]
    split = [synthetic_heads(rng, split=2.0) for _ in range(100)]
    pooled = np.mean([heads.bimodality([math.log(h["mean_distance"]) for h in hs])[0] > null
                      for hs in split])
    labelled = np.mean([ah.label_permutation_test(hs, "log_distance", draws=199)["p"] <= 0.05
                        for hs in split[:30]])
    assert pooled < 0.3 and labelled > 0.9  # 2 SD apart: ~10% against ~100%


@pytest.mark.parametrize("arch, args", [
    ("gpt2", dict(vocab_size=64, block_size=32, n_layer=2, n_embd=32, n_head=4)),
    ("gemma3", dict(vocab_size=64, block_size=32, n_layer=2, n_embd=32, n_head=4, head_dim=8,
                    mlp_hidden=64, sliding_window=8, global_every=2)),
])
def test_the_lab_baselines_analyse_without_groups_or_rates(tmp_path, arch, args):
    model = build_model(arch, **args)
    # no groups, no dictionary: the hooks are absent; Gemma has RoPE (on half-split pairs)
    assert not hasattr(model, "head_groups") and not hasattr(model, "subspaces")
    assert hasattr(model, "rope_frequencies") == hasattr(model, "rope_pairs") == (arch == "gemma3")
    res = ah.analyze_model(model, random_batches(64, 2), num_batches=2, progress=False)
    ah.write_outputs(res, tmp_path)
    data = check_outputs(tmp_path)
    assert "group" in data["not_applicable"] and "Rc" in data["not_applicable"]
    has_rope = arch == "gemma3"
    assert ("spectral_centroid" in data["not_applicable"]) != has_rope
    assert all((h["spectral_centroid"] is not None) == has_rope for h in data["heads"])
