import json

import pytest

from lab import bench

TINY = ["--preset=cpu-small", "--vocab_size=256", "--batch_size=2", "--steps=2", "--warmup=1",
        "--threads=1", "--device=cpu", "--no_prime"]


@pytest.fixture
def small_text(tmp_path, stories):
    """The first ~20 KB of the stories: enough to tokenise, quick to do it three times."""
    text = stories[0].read_text(encoding="utf-8")[:20000]
    path = tmp_path / "small.txt"
    path.write_text(text[: text.rindex("<|endoftext|>")] + "<|endoftext|>\n", encoding="utf-8")
    return path


def test_one_tiny_configuration_end_to_end(tmp_path, small_text, capsys):
    out = tmp_path / "bench.jsonl"
    bench.main(TINY + ["--archs=prism", "--block_sizes=32", f"--json={out}",
                                       f"--prepare_file={small_text}"])
    lines = out.read_text().splitlines()
    parsed = [json.loads(line) for line in lines]  # every line is valid JSON
    steps = [r for r in parsed if r["kind"] == "train_step"]
    assert len(steps) == 1 and len(parsed) == 2
    rec = steps[0]
    assert "error" not in rec, rec.get("error")
    assert set(bench.REQUIRED_KEYS) <= rec.keys()
    assert rec["arch"] == "prism" and rec["block_size"] == 32 and rec["batch_size"] == 2
    assert rec["params"] > 0 and rec["step_ms"] > 0 and rec["peak_mem_mb"] >= rec["base_mem_mb"] > 0
    assert rec["tokens_per_sec"] == pytest.approx(2 * 32 / (rec["step_ms"] / 1000))
    assert len(rec["step_ms_all"]) == 2 and rec["mfu"] is None  # MFU on a GPU only
    assert rec["device"] == "cpu" and rec["dtype"] == "float32" and rec["threads"] == 1
    prep_rec = [r for r in parsed if r["kind"] == "prepare"][0]
    assert prep_rec["mb_per_sec"] > 0 and prep_rec["tokens"] > 0
    assert "tokenize_files" in prep_rec["source"]
    table = capsys.readouterr().out
    assert "step ms" in table and "prism" in table and "MB/s of text tokenised" in table


def test_a_failing_configuration_is_reported_not_fatal():
    cfg = dict(preset="cpu-small", arch="no-such-arch", block_size=32, vocab_size=256,
               batch_size=2, steps=1, warmup=0, device="cpu", dtype="float32", compile=False,
               optimizer=False, threads=1, peak_tflops=None, profile=False, profile_rows=5)
    rec = bench.run_isolated(cfg)
    assert "unknown variant" in rec["error"]


def test_ratios_in_the_table():
    def rec(arch, ms, flops):
        return {"arch": arch, "block_size": 64, "params": 1e6, "step_ms": ms,
                "tokens_per_sec": 1.0, "cpu_ms_median": ms, "peak_mem_mb": 300.0,
                "base_mem_mb": 200.0,
                "achieved_tflops": 1e-3, "flops_per_token": flops, "mfu": None}
    table = bench.format_table([rec("prism", 110.0, 12.0), rec("gpt2", 100.0, 10.0),
                                {"arch": "gemma3", "block_size": 64, "error": "timeout after 5 s"}],
                               ref="gpt2")
    prism_row = table.splitlines()[1].split()
    assert prism_row[:6] == ["prism", "64", "1.00M", "110.0", "110.0", "1.10"]
    assert prism_row[-2] == "1.20"  # FLOPs relative to gpt2
    assert "error: timeout after 5 s" in table.splitlines()[3]


@pytest.mark.parametrize("arg, message", [
    ("--archs=prism,nope", "unknown arch 'nope'"),
    ("--block_sizes=128,abc", "'abc' is not a positive integer"),
    ("--block_sizes=128,-5", "'-5' is not a positive integer"),
    ("--block_sizes=", "expected a comma-separated list"),
    ("--ref=gemma3", "not among --archs"),
])
def test_bad_arguments_are_one_line_errors(arg, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--archs=prism,gpt2", arg] if arg.startswith("--ref") else [arg])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_every_variant_is_accepted_and_repeats_are_dropped():
    args = bench.parse_args(["--archs=prism,prism-white-ista,rope-attention,prism",
                             "--block_sizes=64,32,64"])
    assert args.archs == ["prism", "prism-white-ista", "rope-attention"]
    assert args.block_sizes == [64, 32]
    assert args.ref == "prism"  # no gpt2 among them: the first arch
