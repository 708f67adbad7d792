import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from lab import compare
from lab.variants import PRESETS, RETIRED, count_params, variant_args

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def elsewhere(tmp_path_factory, monkeypatch):
    """Every test runs in an empty folder of its own: nothing depends on what the user's data/,
    out/ or runs/ hold, and a default path (--results, --records) never reaches the repository's."""
    cwd = tmp_path_factory.mktemp("cwd")
    monkeypatch.chdir(cwd)
    return cwd


@pytest.fixture(scope="session")
def report_data(stories, tmp_path_factory):
    """The compact-vocabulary data with the validation stories split into selection and report:
    the first 32 of them (about 4,000 tokens in all: every run scores both splits whole)."""
    from lab.data import prepare_study

    out = tmp_path_factory.mktemp("report_data")
    train, val = stories
    first = val.read_text(encoding="utf-8").split("<|endoftext|>")[:32]
    (out / "val.txt").write_text("<|endoftext|>".join(first), encoding="utf-8")
    prepare_study(train, out / "val.txt", out_dir=out, vocab_size=512, progress=False)
    return out


def run_compare(capsys, *argv):
    try:
        compare.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code, capsys.readouterr()
    return 0, capsys.readouterr()


# -----------------------------------------------------------------------------
# The plan


def test_dry_run_shows_the_whole_plan_and_trains_nothing(report_data, tmp_path, capsys):
    code, out = run_compare(capsys, f"--data_dir={report_data}", "--preset=cpu-small",
                            f"--out_dir={tmp_path / 'runs'}", f"--records={tmp_path / 'rec'}",
                            f"--results={tmp_path / 'R.md'}", "--time_steps=1", "--dry_run")
    assert code == 0, out.err
    meta = json.loads((report_data / "meta.json").read_text())
    iters = round(4 * meta["train_tokens"] / 2048)
    text = out.out
    for arm in compare.STUDY_ARMS:  # every arm with its size and work
        params = count_params(*variant_args("cpu-small", arm, 513))
        assert re.search(rf"^  {arm} +{params:,} ", text, re.M)
        assert re.search(rf"^  {arm} +\d+ ms/step", text.split("estimated")[0], re.M)
    assert "learning-rate grid: 0.001, 0.002, 0.004, 0.008, 0.016 (x2 apart" in text
    assert "report seeds: 2, 3, 4, 5, 6, 7, 8, 9 (8), paired; the grid seed 1 only picks" in text
    assert (f"per run: {iters} iterations x 2,048 tokens = {iters * 2048:,} tokens (4.00 epochs"
            in text)
    assert "runs: 30 grid + 48 report seeds = 78 trainings" in text
    assert "Holm-adjusted p at least 0.03906 — below 0.05" in text
    assert "ms/step" in text and "estimated time:" in text and " h in one process" in text
    assert f"records: {tmp_path / 'rec' / 'cpu-small'}/<variant>/lr<lr>/seed<seed>/" in text
    assert "nothing trained" in text
    assert not (tmp_path / "runs").exists() and not (tmp_path / "rec").exists()
    assert not (tmp_path / "R.md").exists()


def test_dry_run_warns_when_the_seeds_cannot_reach_significance(report_data, tmp_path, capsys):
    code, out = run_compare(capsys, f"--data_dir={report_data}", "--seeds=1,2,3,4,5",
                            "--time_steps=0", "--dry_run", f"--records={tmp_path}")
    # 4 report seeds
    assert code == 0 and "Holm-adjusted p at least 0.625 — NOT below 0.05" in out.out


def test_smallest_attainable_adjusted_p():
    assert compare.smallest_adjusted_p(8, 5) == pytest.approx(5 * 2 / 2 ** 8)  # 0.039: can decide
    assert compare.smallest_adjusted_p(7, 5) > 0.05 > compare.smallest_adjusted_p(6, 1)
    assert compare.smallest_adjusted_p(5, 1) == 0.0625  # 5 seeds never reach 0.05


@pytest.mark.parametrize("argv,words", [
    (["--archs=prism,llama"], "unknown variant 'llama'"),
    (["--epochs=0.001"], "too few for 8 evaluations"),
    (["--seeds=a,b"], "--seeds must be comma-separated numbers"),
    (["--lrs=1e-3,3e-3"], "--lrs must be x2 apart"),
    (["--seeds=1,1"], "must not repeat"),
])
def test_bad_plans_are_one_clear_error(report_data, tmp_path, capsys, argv, words):
    code, out = run_compare(capsys, f"--data_dir={report_data}", f"--out_dir={tmp_path}",
                            "--time_steps=0", "--dry_run", *argv)
    assert code == 1 and words in out.err and out.err.startswith("error: ")


def test_data_without_a_report_split_and_mismatched_sizes_stop_the_study(
        compact_data, report_data, tmp_path, capsys, monkeypatch):
    code, out = run_compare(capsys, f"--data_dir={tmp_path / 'none'}", "--dry_run")
    assert code == 1 and "no meta.json" in out.err
    code, out = run_compare(capsys, f"--data_dir={compact_data}", "--dry_run")
    assert code == 1 and "no report split" in out.err and "python -m lab.data" in out.err
    monkeypatch.setitem(PRESETS["cpu-small"], "gemma3", dict(PRESETS["cpu-small"]["gemma3"],
                                                             mlp_hidden=2048))
    code, out = run_compare(capsys, f"--data_dir={report_data}", "--dry_run", "--time_steps=0")
    assert code == 1 and "gemma3 has" in out.err and "off PRISM's" in out.err


# -----------------------------------------------------------------------------
# The learning-rate grid, on a stub loss


def stub_loss(best, calls):
    def score(lr):
        calls.append(lr)
        return (math.log2(lr / best)) ** 2  # a bowl in log lr, lowest at `best`
    return score


def _fake_study(speeds):
    """Arms whose curves fall linearly from 4 to 3 over 100 iterations; one seed each."""
    curve = [(i, 4 - i / 100) for i in range(0, 101, 5)]
    return {v: dict(runs=[dict(tokens_per_sec=sp)], curves=[curve]) for v, sp in speeds.items()}


def test_equal_wall_clock_stops_a_slower_arm_where_the_fastest_one_finishes():
    plan = dict(budget=dict(iters=100))
    at = compare.equal_wall_clock(plan, _fake_study({"fast": 2000.0, "slow": 1000.0}))
    assert at["fast"] == (2000.0, 100, 3.0)
    assert at["slow"][1] == 50 and at["slow"][2] == pytest.approx(3.5)  # between evaluations
    assert compare.curve_between([(0, 4.0), (10, 3.0)], 2.5) == pytest.approx(3.75)
    assert compare.equal_wall_clock(plan, _fake_study({"a": 1.0, "b": None})) == {}


def test_equal_wall_clock_can_take_speeds_measured_side_by_side(tmp_path):
    """--speeds: lab.bench's records (median at the preset's block size) replace the runs' own
    tokens/s, so arms trained on different machines are timed on one."""
    lines = [dict(kind="train_step", arch="fast", block_size=128, tokens_per_sec=t) for t in (900, 1000, 5000)]
    lines += [dict(kind="train_step", arch="slow", block_size=128, tokens_per_sec=250),
              dict(kind="train_step", arch="slow", block_size=256, tokens_per_sec=9999),
              dict(kind="prepare", mb_per_sec=10.0)]
    path = tmp_path / "bench.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    speeds = compare.bench_speeds(path, 128, ["fast", "slow"])
    assert speeds == {"fast": 1000, "slow": 250}
    plan = dict(budget=dict(iters=100), speeds=speeds)
    at = compare.equal_wall_clock(plan, _fake_study({"fast": 1.0, "slow": 1.0}))  # runs: equal
    assert at["fast"][:2] == (1000, 100) and at["slow"][:2] == (250, 25)
    with pytest.raises(compare.CompareError, match="no training step of other"):
        compare.bench_speeds(path, 128, ["fast", "other"])


def test_rankings_at_every_whole_epoch_and_the_end():
    study = _fake_study({"a": 1.0, "b": 1.0})
    study["b"]["curves"] = [[(i, 3.6 - i / 500) for i in range(0, 101, 5)]]  # b ahead, then behind
    plan = dict(budget=dict(iters=100), data=dict(train_tokens=2500), tokens_per_iter=100,
                epochs=4.0)
    ranks = compare.rankings(plan, study)
    assert [e for e, _ in ranks] == [1.0, 2.0, 3.0, 4.0]
    assert ranks[0][1] == {"b": 1, "a": 2} and ranks[-1][1] == {"a": 1, "b": 2}


def test_grid_with_an_interior_best_does_not_grow():
    calls = []
    best, scores, added, at_edge = compare.choose_lr([1, 2, 4, 8, 16], stub_loss(4, calls), 3)
    assert (best, added, at_edge) == (4, [], False) and calls == [1, 2, 4, 8, 16]


@pytest.mark.parametrize("true_best,want_added", [(0.25, [0.5, 0.25, 0.125]), (64, [32, 64, 128])])
def test_grid_grows_by_x2_past_the_edge_until_the_best_is_inside(true_best, want_added):
    calls = []
    best, scores, added, at_edge = compare.choose_lr([1, 2, 4, 8, 16], stub_loss(true_best, calls),
                                                     5)
    assert best == true_best and added == want_added and not at_edge
    assert sorted(scores) == sorted([1, 2, 4, 8, 16, *want_added])
    assert len(calls) == len(set(calls))  # no rate is trained twice


def test_grid_growth_stops_at_its_limit_and_says_it_is_still_at_the_edge():
    best, _, added, at_edge = compare.choose_lr([1, 2, 4, 8, 16], stub_loss(1024, []), 2)
    assert (best, added, at_edge) == (64, [32, 64], True)


@pytest.mark.parametrize("true_best,want", [(4 * 2 ** 0.4, 4 * 2 ** 0.5),
                                             (4 * 2 ** -0.4, 4 * 2 ** -0.5), (4, 4)])
def test_refine_scores_the_rates_sqrt2_either_side_of_an_interior_best(true_best, want):
    calls = []  # the x2 grid's best is 4 in all three; the refined rates can beat it
    best, scores, added, at_edge = compare.choose_lr([1, 2, 4, 8, 16], stub_loss(true_best, calls),
                                                     3, refine=True)
    assert calls == [1, 2, 4, 8, 16, 4 / 2 ** 0.5, 4 * 2 ** 0.5] and added == [] and not at_edge
    assert best == pytest.approx(want) and len(scores) == 7


def test_refine_waits_for_an_interior_best():
    calls = []  # the best stays past the edge after two extensions: no refinement around an edge
    best, _, added, at_edge = compare.choose_lr([1, 2, 4, 8, 16], stub_loss(1024, calls), 2,
                                                refine=True)
    assert (best, added, at_edge) == (64, [32, 64], True) and len(calls) == 7


def test_a_diverged_rate_never_wins_and_one_rate_is_no_grid():
    best, _, added, _ = compare.choose_lr([1, 2, 4], lambda lr: math.nan if lr == 4 else 3 - lr, 3)
    assert (best, added) == (2, [])
    assert compare.choose_lr([3e-3], stub_loss(1, []), 3)[1:] == ({3e-3: pytest.approx(
        math.log2(3e-3) ** 2)}, [], False)


def test_recorded_rates_are_chosen_among_beside_the_grid():
    """--every_record: an arm's earlier records at the grid seed are scored beside the grid. One
    outside the grid that scores best is chosen; the grid grows only where the best is at the edge
    of every rate scored, records included."""
    grid, up = [1, 2, 4, 8, 16], 4 * math.sqrt(2)
    calls = []  # a record between grid rates, nearest the bowl's bottom: chosen, nothing added
    best, scores, added, at_edge = compare.choose_lr(grid, stub_loss(5.5, calls), 3,
                                                     recorded=[up])
    assert (best, added, at_edge) == (up, [], False) and sorted(calls) == sorted([*grid, up])
    assert compare.choose_lr(grid, stub_loss(5.5, []), 3)[0] == 4  # without it: the grid's best
    calls = []  # a record past the grid's edge is the best: the edge of all scored rates grows
    best, scores, added, at_edge = compare.choose_lr(grid, stub_loss(40, calls), 3, recorded=[32])
    assert (best, added, at_edge) == (32, [64], False) and sorted(scores) == [*grid, 32, 64]
    calls = []  # the grid's top is best but a record lies beyond it: the best is inside, no growth
    best, scores, added, at_edge = compare.choose_lr(grid, stub_loss(20, calls), 3, recorded=[32])
    assert (best, added, at_edge) == (16, [], False) and sorted(calls) == [*grid, 32]
    calls = []  # a recorded grid rate is scored once
    compare.choose_lr(grid, stub_loss(4, calls), 3, recorded=[4, 8])
    assert sorted(calls) == grid


def test_a_computed_rate_maps_to_the_recorded_one_of_the_same_name():
    """8e-3/√2 and 4e-3·√2 differ in the last bit and name one record (lr0.00565685): `canonical`
    maps the computed rate to the recorded one, so refining around 8e-3 trains no duplicate."""
    up, down = 4e-3 * math.sqrt(2), 8e-3 / math.sqrt(2)
    assert up != down and f"{up:g}" == f"{down:g}"
    recorded = {f"{up:g}": up}

    def canonical(lr):
        return recorded.get(f"{lr:g}", lr)

    grid = [2e-3, 4e-3, 8e-3, 1.6e-2]
    for rec in ((), (up,)):  # with --every_record the record is scored with the grid; else refined
        calls = []
        best, scores, added, at_edge = compare.choose_lr(grid, stub_loss(8e-3 * 2 ** 0.1, calls),
                                                         3, refine=True, recorded=rec,
                                                         canonical=canonical)
        assert (best, added, at_edge) == (8e-3, [], False)
        assert up in scores and down not in scores and len(scores) == 6
        assert len(calls) == len(set(calls)) == 6 and down not in calls, rec
        assert sorted(calls) == sorted([*grid, up, 8e-3 * math.sqrt(2)])
    # a rate scored in the same call is matched by name too, canonical or not
    calls = []
    compare.choose_lr(grid, stub_loss(8e-3 * 2 ** 0.1, calls), 3, refine=True, recorded=[up])
    assert up in calls and down not in calls and len({f"{lr:g}" for lr in calls}) == len(calls)


def test_refining_around_a_recorded_rate_reuses_the_grid_rate_of_the_same_name():
    """The best is a record between grid rates (5.66e-3, its name rounded to 6 digits) and the
    grid's own 4e-3 and 8e-3 were scored in this call, after `canonical` was built: the refined
    neighbours 0.00565685/√2 and ·√2, off 4e-3 and 8e-3 by under 1e-6, are those runs, not a
    clash with the record lr0.004 (a study stopped on exactly this) or a near-copy lr0.00799999."""
    record = 0.00565685
    down, up = record / math.sqrt(2), record * math.sqrt(2)
    assert (f"{down:g}", f"{up:g}") == ("0.004", "0.00799999") and down != 4e-3
    calls = []
    best, scores, added, at_edge = compare.choose_lr(
        [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2], stub_loss(record, calls), 3, refine=True,
        recorded=[record], canonical=lambda lr: {"0.00565685": record}.get(f"{lr:g}", lr))
    assert (best, added, at_edge) == (record, [], False)
    assert sorted(calls) == sorted(scores) == [1e-3, 2e-3, 4e-3, record, 8e-3, 1.6e-2]
    calls = []  # a recorded rate 1e-4 (relative) off a refined one is another rate: both run
    near = 4e-3 * math.sqrt(2) * (1 + 1e-4)
    compare.choose_lr([1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2], stub_loss(4e-3, calls), 3, refine=True,
                      recorded=[near])
    assert near in calls and 4e-3 * math.sqrt(2) in calls and len(calls) == 8


# -----------------------------------------------------------------------------
# Paired statistics on synthetic per-seed losses


def fake_study(shifts, seeds, noise=0.01, base=3.0):
    """Per-seed report losses: base + a seed effect every arm shares (pairing removes it) + the
    arm's shift + noise of mean exactly 0 (±noise, ±2·noise, ...), so the mean difference is the
    shift."""
    seed_effect = np.random.default_rng(0).normal(0, 0.2, len(seeds))
    wobble = noise * np.array([(k // 2 + 1) * (-1) ** k for k in range(len(seeds))])
    wobble -= wobble.mean()
    study = {}
    for arm, shift in shifts.items():
        eps = wobble if arm != "prism" else np.zeros(len(seeds))
        study[arm] = {"runs": [{"seed": s, "report_loss": base + e + shift + n}
                               for s, e, n in zip(seeds, seed_effect, eps)]}
    return study


def test_paired_differences_recover_a_known_shift_and_holm_scales_as_defined():
    seeds = list(range(1, 9))
    shifts = {"prism": 0.0, "big": 0.3, "small": -0.05, "none": 0.0}
    study = fake_study(shifts, seeds)
    plan = {"variants": list(shifts), "reference": "prism"}
    diffs = compare.paired_differences(plan, study)
    assert set(diffs) == {"big", "small", "none"}
    for arm in ("big", "small"):
        d = diffs[arm]
        assert d["n"] == 8 and d["mean"] == pytest.approx(shifts[arm])
        assert d["lo"] < shifts[arm] < d["hi"] and d["hi"] - d["lo"] < 0.05
        assert d["p"] == pytest.approx(2 / 2 ** 8)  # every seed the same sign: the exact floor
    raw = [diffs[a]["p"] for a in ("big", "small", "none")]
    # Holm: sorted ascending, the i-th smallest times (m − i), kept non-decreasing, capped at 1
    order = sorted(range(3), key=lambda i: raw[i])
    running, want = 0.0, [None] * 3
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (3 - rank) * raw[i]))
        want[i] = running
    assert [diffs[a]["p_holm"] for a in ("big", "small", "none")] == pytest.approx(want)
    # the two real shifts tie at the floor: both get m·p (the second's 2p is raised to the first's)
    assert diffs["big"]["p_holm"] == diffs["small"]["p_holm"] == pytest.approx(3 * 2 / 2 ** 8)
    assert diffs["big"]["p_holm"] < 0.05
    assert diffs["none"]["p_holm"] >= diffs["small"]["p_holm"]
    # another reference: every difference is taken from it instead
    other = compare.paired_differences(plan | {"reference": "big"}, study)
    assert set(other) == {"prism", "small", "none"}
    assert other["prism"]["mean"] == pytest.approx(-0.3)
    assert other["small"]["mean"] == pytest.approx(-0.35)


def test_paired_differences_pair_by_seed_not_by_position():
    study = fake_study({"prism": 0.0, "arm": 0.1}, [1, 2, 3, 4, 5, 6])
    study["arm"]["runs"].reverse()
    d = compare.paired_differences({"variants": ["prism", "arm"], "reference": "prism"},
                                   study)["arm"]
    assert d["lo"] < 0.1 < d["hi"] and d["sd"] < 0.05  # seed effects cancel only when paired


# -----------------------------------------------------------------------------
# Head contrasts: compare hands contrast_test (lab.heads) the right pairs


def head_study(*arms):
    return {v: {"heads": [{"arm": v, "seed": s} for s in (1, 2)],
                "init_heads": [{"arm": v, "init": True, "seed": s} for s in (1, 2)]}
            for v in arms}


@pytest.fixture
def stub_contrasts(monkeypatch):
    """contrast_test replaced by a stub that records its calls and returns, at layer 0 and "all",
    a row for each claim contrast and one that is not (p from the call's number, known)."""
    calls = []

    def contrast_test(treated, control=None):
        calls.append((treated, control))
        return [{"layer": layer, "contrast": c, "n": len(treated), "mean": 0.5, "lo": 0.1,
                 "hi": 0.9, "p": 0.001 * len(calls) * (i + 1)}
                for layer in (0, "all")
                for i, c in enumerate((*compare.CLAIM_CONTRASTS, "entropy"))]

    monkeypatch.setattr(compare, "contrast_test", contrast_test)
    return calls


@pytest.mark.parametrize("model,control", compare.HEAD_PAIRS)
def test_head_contrasts_pair_trained_untrained_and_the_two_arms(stub_contrasts, model, control):
    calls = stub_contrasts
    assert (model, control) in (("prism", "prism-pi-off"), ("recon", "recon-pi-off"))
    assert {model, control} <= set(compare.HEAD_ARMS)
    study = head_study(model, control)
    out = compare.head_contrasts(study)
    assert [t for t, _ in out] == [
        f"{model} trained (against 0)", f"{model} trained − {model} untrained",
        f"{control} trained (against 0)", f"{control} trained − {control} untrained",
        f"{model} − {control}, both trained"]
    assert calls[1] == (study[model]["heads"], study[model]["init_heads"])
    assert calls[4] == (study[model]["heads"], study[control]["heads"])
    assert calls[0][1] is None
    # the pre-registered family: the claim contrasts at layer "all" of the pair's two comparisons,
    # Holm-corrected together
    assert compare.head_pair(study) == (model, control)
    family = compare.claim_tests(out, (model, control))
    comparisons = [f"{model} trained − {model} untrained", f"{model} − {control}, both trained"]
    assert [(t, r["contrast"]) for t, r, _ in family] == [
        (t, c) for t in comparisons for c in compare.CLAIM_CONTRASTS]
    assert all(r["layer"] == "all" for _, r, _ in family)
    raw = [r["p"] for _, r, _ in family]
    assert [p for _, _, p in family] == pytest.approx(compare.stats.holm(raw))
    # a candidate with recorded heads adds exploratory rows against the pair's model; the
    # pre-registered family stays
    study["prism-white"] = {"heads": [{"arm": "prism-white", "seed": s} for s in (1, 2)]}
    more = compare.head_contrasts(study)
    assert [t for t, _ in more[5:]] == ["prism-white trained (against 0)",
                                        f"prism-white − {model}, both trained"]
    assert calls[-1] == (study["prism-white"]["heads"], study[model]["heads"])
    assert [(t, r["contrast"]) for t, r, _ in compare.claim_tests(more, (model, control))] == \
        [(t, r["contrast"]) for t, r, _ in family]


def test_the_claims_pair_is_the_first_whose_model_is_an_arm(stub_contrasts):
    assert compare.head_pair(["gpt2", "recon", "prism"]) == ("prism", "prism-pi-off")
    assert compare.head_pair(["gpt2", "recon", "recon-pi-off"]) == ("recon", "recon-pi-off")
    assert compare.head_pair(["gpt2", "prism-pi-off", "recon-pi-off"]) is None
    # both families in one study: each pair's own comparison, the candidates against the first
    study = head_study("prism", "prism-pi-off", "recon", "recon-pi-off")
    study["prism-untied"] = {"heads": [{"arm": "prism-untied", "seed": s} for s in (1, 2)]}
    titles = [t for t, _ in compare.head_contrasts(study)]
    assert "prism − prism-pi-off, both trained" in titles
    assert "recon − recon-pi-off, both trained" in titles
    assert "prism-untied − prism, both trained" in titles
    assert not any(t.startswith(("prism − recon", "recon − prism")) for t in titles)
    # a model without its control has no family (its comparison with the control is missing)
    only = compare.head_contrasts(head_study("prism"))
    assert [t for t, _, _ in compare.claim_tests(only, ("prism", "prism-pi-off"))] == \
        ["prism trained − prism untrained"] * len(compare.CLAIM_CONTRASTS)


# -----------------------------------------------------------------------------
# End to end: a tiny study, its records, resuming and the report from records alone


def git(root, *argv):
    return subprocess.run(["git", *argv], cwd=root, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_a_record_names_the_commit_dirty_only_for_uncommitted_python(tmp_path):
    import torch

    git(tmp_path, "init", "-q")
    (tmp_path / "model.py").write_text("x = 1\n")
    (tmp_path / "notes.md").write_text("a\n")
    git(tmp_path, "add", ".")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    head = git(tmp_path, "rev-parse", "HEAD")
    assert compare.code_version(tmp_path) == {"commit": head, "torch": torch.__version__}
    (tmp_path / "notes.md").write_text("b\n")        # not code
    (tmp_path / "scratch.py").write_text("y = 2\n")  # untracked
    assert compare.code_version(tmp_path)["commit"] == head
    (tmp_path / "model.py").write_text("x = 2\n")
    assert compare.code_version(tmp_path)["commit"] == head + "-dirty"
    assert compare.code_version(tmp_path / "nowhere")["commit"] == "unknown"


def test_a_tiny_study_leaves_records_resumes_and_reports_from_records_alone(
        report_data, compact_data, tmp_path, capsys, monkeypatch, elsewhere):
    records, results = tmp_path / "results", tmp_path / "docs" / "RESULTS.md"
    argv = [f"--data_dir={report_data}", "--preset=cpu-small", "--epochs=0.015", "--seeds=2,3,4",
            "--archs=prism,gpt2,recon", "--lrs=1e-3,2e-3", "--max_extensions=0", "--evals=2",
            "--eval_iters=1", "--analysis_batches=1", f"--out_dir={tmp_path / 'runs'}",
            f"--records={records}", f"--results={results}"]
    code, out = run_compare(capsys, *argv)
    assert code == 0, out.err
    section = results.read_text()
    params = count_params(*variant_args("cpu-small", "prism", 513))
    assert f"| prism | {params:,} |" in section and "| gpt2 |" in section
    assert "still at the grid's edge" in section  # two rates, no growth allowed
    recon = count_params(*variant_args("cpu-small", "recon", 513))
    assert f"| recon | {recon:,} |" in section
    assert "Holm-corrected over the 2 arms" in section
    assert "report seeds 3, 4." in section and "at seed 2, a seed that is not reported" in section
    # the head contrasts of analyze_heads, per layer, trained against untrained
    assert "*prism trained − prism untrained*" in section and "log_distance_no_self" in section
    # both families' head arms (the author's PRISM and our reconstruction), each against its own
    # untrained self; without their π-off controls among the arms, no pre-registered claim
    assert "*recon trained − recon untrained*" in section and "the claim" not in section
    assert "| 3 | " in section  # the last of cpu-small's 4 layers
    assert (tmp_path / "docs" / "compare_cpu-small.png").read_bytes().startswith(b"\x89PNG")
    # The records: a summary and a curve per run, heads for the head arm, trained and untrained;
    # no checkpoint.
    rec = records / "cpu-small"
    grid_best = json.loads((rec / "prism" / "lr0.001" / "seed2" / "summary.json").read_text())
    chosen = "lr0.001" if grid_best["selection_loss"] <= json.loads(
        (rec / "prism" / "lr0.002" / "seed2" / "summary.json").read_text())["selection_loss"] \
        else "lr0.002"
    for seed in (3, 4):  # the report seeds; seed 2 only ran the grid
        run = rec / "prism" / chosen / f"seed{seed}"
        s = json.loads((run / "summary.json").read_text())
        assert s["seed"] == seed and s["budget"]["iters"] == 2 and s["report_loss"] > 0
        assert (run / "log.jsonl").is_file() and (run / "heads.json").is_file()
        assert (rec / "prism" / "init" / f"seed{seed}" / "heads.json").is_file()
        assert (rec / "recon" / "init" / f"seed{seed}" / "heads.json").is_file()
    # every summary says what made it: the commit and torch's version
    import torch

    for path in rec.rglob("summary.json"):  # (HEAD may move while the test runs: others commit)
        code = json.loads(path.read_text())["code"]
        assert code["torch"] == torch.__version__
        assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", code["commit"])
        git(REPO, "cat-file", "-e", code["commit"].removesuffix("-dirty") + "^{commit}")
    assert not (rec / "gpt2" / "lr0.001" / "seed2" / "heads.json").exists()
    assert not list(records.rglob("*.pt"))
    # The untrained checkpoint is the model the seed's trained runs started from: train.py's
    # initialisation for that seed.
    import torch

    from model import build_model

    init = torch.load(tmp_path / "runs" / "cpu-small" / "prism" / "init" / "seed3" / "ckpt.pt",
                      weights_only=True)
    assert init["iter_num"] == 0
    torch.manual_seed(3)
    fresh = build_model("prism", **init["model_config"]).state_dict()
    assert all(torch.equal(fresh[k], v) for k, v in init["model"].items())
    other = "lr0.002" if chosen == "lr0.001" else "lr0.001"
    assert not (rec / "prism" / other / "seed3").exists()
    # Again, and from the records alone (no data folder, no checkpoints): nothing trains and the
    # section comes out the same.
    import train

    monkeypatch.setattr(train, "train", lambda *a, **k: pytest.fail("a recorded run was redone"))
    code, _ = run_compare(capsys, *argv)
    assert code == 0 and results.read_text() == section
    results.unlink()
    alone = [a for a in argv if not a.startswith(("--data_dir", "--out_dir"))]
    code, out = run_compare(capsys, *alone, f"--data_dir={tmp_path / 'gone'}",
                            f"--out_dir={tmp_path / 'gone'}", "--report_only")
    assert code == 0, out.err
    assert results.read_text() == section
    # --report_only reads no data at all, not even a default folder that is there but has no
    # report split (the default data/study, a quickstart's data/sample or data/tinystories
    # without test.bin); and what made a record is not part of what makes it this study's
    for folder in ("study", "sample", "tinystories"):
        shutil.copytree(compact_data, elsewhere / "data" / folder)
        assert "test_tokens" not in json.loads((compact_data / "meta.json").read_text())
    for path in rec.rglob("summary.json"):
        summary = json.loads(path.read_text())
        path.write_text(json.dumps(summary | {"code": {"commit": "0" * 40, "torch": "0"}}))
    results.unlink()
    code, out = run_compare(capsys, *alone, "--report_only")
    assert code == 0, out.err
    assert results.read_text() == section
    # A record made with another budget is refused, not silently reused.
    code, out = run_compare(capsys, *[a.replace("--epochs=0.015", "--epochs=0.03") for a in argv])
    assert code == 1 and "record of another study (its budget differs)" in out.err
    # --report_only with a run missing stops at it.
    code, out = run_compare(capsys, *alone, "--seeds=2,3,4,5", "--report_only")
    assert code == 1 and "no record" in out.err and "seed5" in out.err
    # The same records against another reference, into a section of its own: the first stays.
    code, out = run_compare(capsys, *alone, "--report_only", "--reference=gpt2",
                            "--section=against gpt2")
    assert code == 0, out.err
    text = results.read_text()
    assert text.startswith(section.rstrip()) and "<!-- compare.py against gpt2 -->" in text
    own = text.split("against gpt2 -->")[1]
    assert "Δ vs gpt2 [95% CI]" in own
    assert "## Comparison at preset `cpu-small`, against gpt2 — against gpt2\n" in own  # --section
    assert "the claim" not in own  # prism-pi-off is not an arm: no pre-registered family here
    assert (tmp_path / "docs" / "compare_against_gpt2.png").is_file()
    assert "--reference=gpt2 --section='against gpt2'" in text  # its own command re-makes it
    code, out = run_compare(capsys, *alone, "--report_only", "--reference=gpt2")
    assert code == 0 and "<!-- compare.py cpu-small vs gpt2 -->" in results.read_text()
    assert results.read_text().startswith(section.rstrip())  # never over the preset's section
    code, out = run_compare(capsys, *alone, "--report_only", "--reference=gemma3")
    assert code == 1 and "--reference=gemma3 is not one of --archs" in out.err
    # without prism among the arms and no --reference: the arms' tables, no comparison
    code, out = run_compare(capsys, *[a.replace("--archs=prism,gpt2,recon", "--archs=gpt2")
                                      for a in alone], "--report_only", "--section=gpt2 alone")
    assert code == 0, out.err
    assert "| gpt2 |" in results.read_text().split("gpt2 alone -->")[1]


def test_a_checkpoint_carrying_code_in_the_runs_folder_is_refused(report_data, tmp_path, capsys,
                                                                  unsafe_ckpt):
    import shutil

    from conftest import unsafe_message

    path, marker = unsafe_ckpt
    run_dir = tmp_path / "runs" / "cpu-small" / "prism" / "lr0.001" / "seed2"
    run_dir.mkdir(parents=True)
    shutil.copy(path, run_dir / "ckpt.pt")
    code, out = run_compare(capsys, f"--data_dir={report_data}", "--preset=cpu-small",
                            "--epochs=0.015", "--seeds=2,3", "--archs=prism", "--lrs=1e-3",
                            "--evals=2", f"--out_dir={tmp_path / 'runs'}",
                            f"--records={tmp_path / 'rec'}", f"--results={tmp_path / 'R.md'}")
    assert code == 1 and out.err.strip().splitlines()[-1] == unsafe_message(run_dir / "ckpt.pt")
    assert not marker.exists()


def test_screen_runs_only_the_grid_and_ranks_the_arms(report_data, tmp_path, capsys, monkeypatch):
    records, results = tmp_path / "results", tmp_path / "R.md"
    argv = [f"--data_dir={report_data}", "--preset=cpu-small", "--epochs=0.015", "--seeds=2",
            "--archs=prism,prism-untied", "--lrs=1e-3,2e-3", "--max_extensions=0", "--evals=2",
            "--eval_iters=1", "--analysis_batches=1", f"--out_dir={tmp_path / 'runs'}",
            f"--records={records}", f"--results={results}", "--screen"]
    code, out = run_compare(capsys, *argv[:-1], "--screen", "--dry_run", "--time_steps=0")
    assert code == 0 and "screen: the grid at seed 2 only" in out.out
    assert "runs: 4 grid + 0 report seeds = 4 trainings" in out.out
    code, out = run_compare(capsys, *argv)
    assert code == 0, out.err
    section = results.read_text()
    assert "## Screening at preset `cpu-small`" in section and "--screen" in section

    def speed_of(v):
        return np.mean([json.loads((records / "cpu-small" / v / f"lr{lr}" / "seed2" /
                                    "summary.json").read_text())["tokens_per_sec"]
                        for lr in ("0.001", "0.002")])

    best = {}
    for v in ("prism", "prism-untied"):
        losses = [json.loads((records / "cpu-small" / v / f"lr{lr}" / "seed2" / "summary.json")
                             .read_text())["selection_loss"] for lr in ("0.001", "0.002")]
        best[v] = min(losses)
        assert f"| {best[v]:.4f} |" in section
        assert f"| {speed_of(v):,.0f} |" in section
    assert f"| {best['prism-untied'] - best['prism']:+.4f} |" in section
    assert "| +0.0000 |" in section                     # prism against itself
    assert not list(records.rglob("seed3"))              # no report seeds were trained
    # every PRISM-arch arm records its heads, an ablation too (exploratory contrasts beside it)
    assert len(list((records / "cpu-small" / "prism-untied").rglob("heads.json"))) == 2
    # another reference gets a section of its own beside the first, from the same records
    code, out = run_compare(capsys, *argv, "--reference=prism-untied", "--report_only")
    assert code == 0, out.err
    text = results.read_text()
    assert "<!-- compare.py cpu-small screen -->" in text and section in text
    assert "<!-- compare.py cpu-small screen vs prism-untied -->" in text
    assert "## Screening at preset `cpu-small`, against prism-untied" in text
    own = text.split("screen vs prism-untied -->")[1]
    assert f"| {best['prism'] - best['prism-untied']:+.4f} |" in own
    # A retired candidate (its code deleted) still reports from its records: nothing rebuilds it,
    # its model_args are not checked, its params come from the records and its FLOPs/token from
    # RETIRED; running it is refused with the commit to check out.
    gone = records / "cpu-small" / "prism-gone"
    shutil.copytree(records / "cpu-small" / "prism-untied", gone)
    for path in gone.rglob("summary.json"):
        summary = json.loads(path.read_text())
        path.write_text(json.dumps(summary | {"variant": "prism-gone", "params": 1234567,
                                              "model_args": {"no_such_field": 1}}))
    monkeypatch.setitem(RETIRED, "prism-gone", dict(commit="abc1234", reason="noise at one seed",
                                                    flops_per_token={"cpu-small": 7.5e6}))
    retired = [a.replace("--archs=prism,prism-untied", "--archs=prism,prism-gone") for a in argv]
    code, out = run_compare(capsys, *retired, "--report_only", "--section=retired")
    assert code == 0, out.err
    own = results.read_text().split("<!-- compare.py retired -->")[1]
    assert f"| prism-gone | 1,234,567 | 7.50M | {speed_of('prism-untied'):,.0f} |" in own
    assert f"| {best['prism-untied'] - best['prism']:+.4f} |" in own
    code, out = run_compare(capsys, *retired)
    assert code == 1 and len(out.err.strip().splitlines()) == 1
    assert "prism-gone is a retired candidate" in out.err and "git checkout abc1234" in out.err


def test_the_committed_sections_re_make_from_the_records_alone(tmp_path, capsys):
    """Every committed record still reads: each section compare.py wrote into lab/RESULTS.md (the
    retired candidates' screen among them) comes out the same from lab/results by the command it
    prints, with --report_only and no data folder."""
    committed = (REPO / "lab" / "RESULTS.md").read_text()
    names = re.findall(r"^<!-- compare.py (.+?) -->$", committed, re.M)
    assert len(names) == 14
    results = tmp_path / "RESULTS.md"
    for name in names:
        start, end = f"<!-- compare.py {name} -->\n", f"<!-- /compare.py {name} -->"
        body = committed.split(start)[1].split(end)[0]
        command = re.search(r"(?:Study|Screen): `python -m lab.compare --data_dir=DATA (.*?)`",
                            body)[1]
        argv = [a.replace("--records=", f"--records={REPO}/").replace("--speeds=", f"--speeds={REPO}/")
                for a in command.split()]  # the repository's paths, from this test's own folder
        code, out = run_compare(capsys, *argv, "--report_only", f"--results={results}",
                                f"--out_dir={tmp_path / 'runs'}")
        assert code == 0, out.err
        remade = results.read_text().split(start)[1].split(end)[0]
        assert remade.replace(f"{REPO}/", "") == body


def test_the_grid_table_has_one_column_per_record_name():
    """4e-3·√2 and 8e-3/√2 differ in the last bit but name the same record (lr0.00565685): one
    column, and each arm's chosen rate bold in it."""
    up, down = 4e-3 * math.sqrt(2), 8e-3 / math.sqrt(2)
    assert up != down and f"{up:g}" == f"{down:g}"
    arm = dict(added=[], at_edge=False)
    study = {"a": dict(arm, grid={4e-3: 3.3, up: 3.2, 8e-3: 3.4}, lr=up, refined=[up]),
             "b": dict(arm, grid={8e-3: 3.1, down: 3.0, 1.6e-2: 3.5}, lr=down, refined=[down])}
    args = type("Args", (), dict(max_extensions=3, refine=True, every_record=False))
    lines = compare.grid_table(args, {"grid_seed": 1}, study)
    header, _, a, b = lines[2:]
    assert header.split(" | ")[1:-1] == ["0.004", "0.00566", "0.008", "0.016"]
    assert a.split(" | ")[2] == "**3.2000**" and b.split(" | ")[2] == "**3.0000**"
    assert "--every_record" not in lines[0]
    # with --every_record an arm's other record is a column like the grid's, and the note says so
    args.every_record = True
    study["b"] = dict(study["b"], grid={**study["b"]["grid"], 3.2e-2: 2.9}, lr=3.2e-2, refined=[],
                      records=[3.2e-2])
    lines = compare.grid_table(args, {"grid_seed": 1}, study)
    header, _, a, b = lines[2:]
    assert "every other record of the arm at that seed (--every_record)" in lines[0]
    assert header.split(" | ")[1:-1] == ["0.004", "0.00566", "0.008", "0.016", "0.032"]
    assert b.split(" | ")[5] == "**2.9000**" and "and the records at 0.032" in b
