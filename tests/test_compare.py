import json

import pytest

import compare
from baselines import PRESETS, count_params, variant_args


def run_compare(capsys, *argv):
    try:
        compare.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code, capsys.readouterr()
    return 0, capsys.readouterr()


def test_dry_run_checks_the_plan_and_trains_nothing(compact_data, tmp_path, capsys):
    code, out = run_compare(capsys, f"--data_dir={compact_data}", "--preset=cpu-small",
                            "--tokens=400000", "--seeds=1,2,3", f"--out_dir={tmp_path / 'runs'}",
                            f"--results={tmp_path / 'R.md'}", "--dry_run")
    assert code == 0
    assert "10 variants x 3 seeds, 195 iters x 2,048 tokens" in out.out
    assert "lr sweep over [0.001, 0.003, 0.01] (48 iters each)" in out.out
    assert "prism-pi-off" in out.out and "nothing trained" in out.out
    assert not (tmp_path / "runs").exists() and not (tmp_path / "R.md").exists()


@pytest.mark.parametrize("argv,words", [
    (["--archs=prism,llama"], "unknown variant 'llama'"),
    (["--tokens=1000"], "too few for 10 evaluations"),
    (["--seeds=a,b"], "--seeds must be comma-separated numbers"),
])
def test_bad_plans_are_one_clear_error(compact_data, tmp_path, capsys, argv, words):
    code, out = run_compare(capsys, f"--data_dir={compact_data}", f"--out_dir={tmp_path}",
                            "--dry_run", *argv)
    assert code == 1 and words in out.err and out.err.startswith("error: ")


def test_missing_data_and_mismatched_sizes_stop_the_comparison(compact_data, tmp_path, capsys,
                                                                monkeypatch):
    code, out = run_compare(capsys, f"--data_dir={tmp_path / 'none'}", "--dry_run")
    assert code == 1 and "no meta.json" in out.err
    monkeypatch.setitem(PRESETS["cpu-small"], "gemma3", dict(PRESETS["cpu-small"]["gemma3"],
                                                             mlp_hidden=2048))
    code, out = run_compare(capsys, f"--data_dir={compact_data}", "--dry_run")
    assert code == 1 and "gemma3 has" in out.err and "off PRISM's" in out.err


def test_a_small_comparison_writes_table_curves_and_heads_and_resumes(compact_data, tmp_path,
                                                                     capsys, monkeypatch):
    argv = [f"--data_dir={compact_data}", "--preset=cpu-small", "--tokens=8192", "--seeds=2",
            "--archs=prism,prism-pi-off", "--lr=3e-3", "--evals=2", "--eval_iters=1",
            "--analysis_batches=1", f"--out_dir={tmp_path / 'runs'}",
            f"--results={tmp_path / 'docs' / 'RESULTS.md'}"]
    code, _ = run_compare(capsys, *argv)
    assert code == 0
    results = (tmp_path / "docs" / "RESULTS.md").read_text()
    params = count_params(*variant_args("cpu-small", "prism", 513))
    assert f"| prism | {params:,} | 0.003 |" in results and "| prism-pi-off |" in results
    assert f"Command: `python compare.py {' '.join(argv)}`" in results
    assert "bimodality" in results
    png = (tmp_path / "docs" / "compare_cpu-small.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    run = tmp_path / "runs" / "cpu-small" / "prism" / "seed2"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["seed"] == 2 and summary["iters"] == 4 and summary["lr"] == 3e-3
    assert json.loads((run / "analysis" / "heads.json").read_text())["bimodality"] is not None
    # A second call finds every run done and trains nothing.
    import train

    monkeypatch.setattr(train, "train", lambda *a, **k: pytest.fail("a finished run was redone"))
    code, _ = run_compare(capsys, *argv)
    assert code == 0
    assert results.count("<!-- compare.py cpu-small -->") == 1
    # Another budget in the same folder would silently reuse these runs: refused instead.
    code, out = run_compare(capsys, *[a.replace("--tokens=8192", "--tokens=16384") for a in argv])
    assert code == 1 and "finished run of 4 iterations, not 8" in out.err
    assert (tmp_path / "docs" / "RESULTS.md").read_text().count("<!-- compare.py cpu-small -->") == 1
