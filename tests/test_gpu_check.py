""".ci/gpu_check --cpu: every step of the GPU check runs at toy size and passes, the reports are
written, and a failing step is reported while the others still run."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / ".ci" / "gpu_check"
STEPS = ["data", "train", "compile", "fp16", "fused", "bench", "sample"]


def run_check(out, data_dir, *args):
    env = dict(os.environ, PRISM_DATA_DIR=str(data_dir), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(SCRIPT), "--cpu", *args, str(out)], env=env,
                          capture_output=True, text=True, timeout=600, check=False)


def test_every_step_passes_on_the_cpu(compact_data, tmp_path):
    out = tmp_path / "check"
    proc = run_check(out, compact_data)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in report["steps"]] == STEPS
    failed = {s["name"]: s.get("error") for s in report["steps"] if s["status"] != "passed"}
    assert not failed and report["passed"]
    steps = {s["name"]: s["details"] for s in report["steps"]}
    assert steps["train"]["iters"] == 20 and steps["train"]["tokens_per_sec_steady"] > 0
    assert steps["compile"]["max_rel_diff"] <= 1e-4
    assert steps["fp16"]["scaler_scale"] > 0
    assert len(steps["bench"]["rows"]) == 6 and all(r["tokens_per_sec"] > 0
                                                    for r in steps["bench"]["rows"])
    assert steps["sample"]["greedy_tokens_equal"] == 200  # float32: the cache changes nothing
    md = (out / "report.md").read_text()
    assert all(f"| {name} |" in md and f"## {name}: passed" in md for name in STEPS)
    # On a CPU the report says what it ran and prints no empty values: no MFU or CUDA memory,
    # the fused setting as a plain answer, the model named as the toy it is.
    assert "None" not in md and "mfu" not in md and "peak_mem" not in md
    assert "- fused: False" in md and "- model: a toy PRISM (n_layer=2" in md
    assert os.access(SCRIPT, os.X_OK)


def test_a_failing_step_is_reported_and_the_rest_still_run(tmp_path):
    out = tmp_path / "check"
    proc = run_check(out, tmp_path / "no-such-data", "--only=data,train,fused")
    assert proc.returncode == 1
    report = json.loads((out / "report.json").read_text())
    status = {s["name"]: s["status"] for s in report["steps"]}
    assert status == {"data": "failed", "train": "failed", "fused": "passed"}
    assert "no data" in report["steps"][1]["error"] and not report["passed"]
    assert "## train: failed" in (out / "report.md").read_text()
