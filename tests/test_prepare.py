"""Tests of prepare_tinystories.py: the tokens against an independent re-implementation, the compact
vocabulary, the downloader against a local HTTP server, the sample, bad input and Ctrl-C."""
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import tiktoken

import prepare_tinystories as pt
from conftest import SHARED

REPO = Path(__file__).resolve().parent.parent
SEP = "<|endoftext|>"
OUTPUTS = ["meta.json", "train.bin", "val.bin"]
V2_TRAIN, V2_VAL = pt.FILES["train"], pt.FILES["val"]
ENC = tiktoken.get_encoding("gpt2")


def reference(text):
    """The spec, re-implemented: (stories, token ids, UTF-8 bytes of the stories)."""
    stories = [s.strip() for s in text.split(SEP) if s.strip()]
    ids = [t for s in stories for t in ENC.encode_ordinary(s) + [ENC.eot_token]]
    return stories, np.array(ids, dtype=np.uint16), sum(len(s.encode("utf-8")) for s in stories)


def compact_reference(train_ids, size):
    """(GPT-2 ids kept, in compact-id order; lookup GPT-2 id -> compact id): the `size` most
    frequent training tokens, most frequent first, ties by lower id, end-of-text always kept."""
    counts = np.bincount(train_ids, minlength=ENC.n_vocab)
    keep = sorted(range(ENC.n_vocab), key=lambda t: (-counts[t], t))[:size]
    if ENC.eot_token not in keep:
        keep[-1] = ENC.eot_token
    lookup = np.full(ENC.n_vocab, size, dtype=np.uint16)
    lookup[keep] = np.arange(size)
    return keep, lookup


def read_text(path):
    return Path(path).read_text(encoding="utf-8")


def tokens(path):
    return np.fromfile(path, dtype="<u2")


def run_main(argv):
    """main(argv) in-process; returns the exit code (0 when it returns normally)."""
    try:
        pt.main([str(a) for a in argv] + ["--no_progress"])
    except SystemExit as e:
        return e.code
    return 0


def error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "nothing printed to stderr"
    return err[-1]


def assert_no_output(out_dir):
    """Neither outputs nor temporaries: out_dir is absent or empty."""
    assert not Path(out_dir).exists() or not os.listdir(out_dir), sorted(os.listdir(out_dir))


# -----------------------------------------------------------------------------
# tokens


def test_round_trip_local_files(stories, tmp_path):
    train, val = stories
    out = tmp_path / "out"
    assert run_main(["--train_file", train, "--val_file", val, "--out_dir", out,
                     "--threads", 2]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_token"]) == ("gpt2", 50257, 50256)
    assert "compact_vocab" not in meta
    for split, path in (("train", train), ("val", val)):
        ref_stories, ref_ids, ref_bytes = reference(read_text(path))
        ids = tokens(out / f"{split}.bin")
        assert np.array_equal(ids, ref_ids)
        assert (meta[f"{split}_tokens"], meta[f"{split}_stories"], meta[f"{split}_bytes"]) == \
            (len(ref_ids), len(ref_stories), ref_bytes)
        assert meta["sources"][split] == os.path.abspath(path)
    val_stories = reference(read_text(val))[0]
    assert ENC.decode(tokens(out / "val.bin").tolist()) == SEP.join(val_stories) + SEP
    assert sorted(os.listdir(out)) == OUTPUTS  # no temporaries left


def test_compact_vocabulary(stories, tmp_path):
    train, val = stories
    out, K = tmp_path / "out", 500
    assert run_main(["--train_file", train, "--val_file", val, "--out_dir", out,
                     "--vocab_size", K]) == 0
    meta = json.loads((out / "meta.json").read_text())
    cv = meta["compact_vocab"]
    keep, lookup = compact_reference(reference(read_text(train))[1], K)
    assert cv["gpt2_ids"] == keep and cv["size"] == cv["unknown_token"] == K
    assert meta["vocab_size"] == K + 1 and meta["eot_token"] == lookup[ENC.eot_token]
    for split, path in (("train", train), ("val", val)):
        ref_ids = reference(read_text(path))[1]
        ids = tokens(out / f"{split}.bin")
        assert np.array_equal(ids, lookup[ref_ids])  # one compact token per GPT-2 token
        assert cv[f"{split}_coverage"] == pytest.approx(np.isin(ref_ids, keep).mean(), abs=1e-6)
        assert cv[f"{split}_coverage"] < 1


def test_split_off_val_every_kth_story(stories, tmp_path):
    out = tmp_path / "out"
    assert run_main(["--train_file", stories[0], "--val_fraction", 0.1, "--out_dir", out]) == 0
    meta = json.loads((out / "meta.json").read_text())
    ref_stories = reference(read_text(stories[0]))[0]
    for split, keep in (("val", lambda i: i % 10 == 0), ("train", lambda i: i % 10 != 0)):
        want = [s for i, s in enumerate(ref_stories) if keep(i)]
        _, ref_ids, ref_bytes = reference(SEP.join(want))
        assert np.array_equal(tokens(out / f"{split}.bin"), ref_ids)
        assert (meta[f"{split}_stories"], meta[f"{split}_bytes"]) == (len(want), ref_bytes)


def test_reader_across_read_boundaries(tmp_path):
    """Separators, CRLF and multi-byte characters cut across reads come out the same; a bad byte
    is reported at its offset in the file, whatever the reads."""
    p = tmp_path / "t.txt"
    p.write_bytes("  Héllo wörld 🙂\r\n<|endoftext|>\r\n\n<|endoftext|>\nSecond — story\n"
                  "<|endoftext|>Third".encode("utf-8"))
    bad = tmp_path / "bad.txt"
    bad.write_bytes("ä\nstory ü\n<|endoftext|>\n€ two\n".encode("utf-8") + b"\xe2\x82 x\n")
    bad_at = bad.read_bytes().index(b"\xe2\x82 ")
    truncated = tmp_path / "truncated.txt"
    truncated.write_bytes(b"fine story\n\xc3")
    for read_bytes in (1, 2, 3, 7, 1 << 20):
        assert list(pt.iter_stories(p, read_bytes=read_bytes)) == \
            ["Héllo wörld 🙂", "Second — story", "Third"]
        with pytest.raises(pt.PrepareError, match=f"byte offset {bad_at}:"):
            list(pt.iter_stories(bad, read_bytes=read_bytes))
        with pytest.raises(pt.PrepareError, match="byte offset 11:"):
            list(pt.iter_stories(truncated, read_bytes=read_bytes))


# -----------------------------------------------------------------------------
# bad input: one line, exit status 1, no output


@pytest.mark.parametrize("case", ["missing", "empty", "no stories", "not utf-8", "no separator",
                                  "one story", "vocab too small", "vocab too large"])
def test_bad_input_fails_in_one_line(case, stories, tmp_path, capsys, monkeypatch):
    path, extra = tmp_path / "in.txt", []
    contents = {"empty": b"", "no stories": f"\n{SEP}\n   \n{SEP}\n".encode(),
                "not utf-8": b"A good story.\n" + SEP.encode() + b"\nA bad \xff byte.\n",
                "no separator": b"word " * 2000, "one story": b"Just one story.\n"}
    if case in contents:
        path.write_bytes(contents[case])
    if case == "no separator":
        monkeypatch.setattr(pt, "MAX_STORY_CHARS", 1000)
    if case.startswith("vocab"):
        path, extra = stories[0], ["--vocab_size", 255 if case == "vocab too small" else 50258]
    out = tmp_path / "out"
    assert run_main(["--train_file", path, "--out_dir", out, *extra]) == 1
    line = error_line(capsys)
    assert line.startswith("error: ") and line == line.strip()
    want = {"missing": f"{path}: no such file", "empty": f"{path}: the file is empty",
            "no stories": f"{path}: no stories",
            "not utf-8": f"{path}: not UTF-8 at byte offset 34",
            "no separator": f"{path}: no {SEP} line in over 1,000 characters",
            "one story": "a single story; splitting off a validation set needs 2",
            "vocab too small": "--vocab_size must be in [256, 50257], got 255",
            "vocab too large": "--vocab_size must be in [256, 50257], got 50258"}[case]
    assert want in line
    assert_no_output(out)


def test_ctrl_c_leaves_no_output(stories, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.bin").write_bytes(b"from an earlier run")  # must survive untouched
    real, calls = pt.encode_batch, []

    def encode_then_interrupt(*args):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(pt, "encode_batch", encode_then_interrupt)
    assert run_main(["--train_file", stories[0], "--val_file", stories[1], "--out_dir", out]) == 130
    assert len(calls) == 2
    assert error_line(capsys).startswith("interrupted")
    assert os.listdir(out) == ["train.bin"]
    assert (out / "train.bin").read_bytes() == b"from an earlier run"


def test_memory_stays_bounded_on_a_big_file(stories, tmp_path):
    """20 MB of stories: held in memory at once, text and token lists would take over 200 MB."""
    data = Path(stories[0]).read_bytes()
    big = tmp_path / "big.txt"
    big.write_bytes(data * -(-20_000_000 // len(data)))
    wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
               "sys.exit(r.returncode)")

    def peak_mb(*cmd):  # peak RSS of the command (KiB on Linux)
        r = subprocess.run([sys.executable, "-c", wrapper, sys.executable, *map(str, cmd)],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return int(r.stdout.split()[-1]) / 1024

    with_bpe = peak_mb("-c", "import numpy, tqdm, tiktoken; tiktoken.get_encoding('gpt2')")
    peak = peak_mb(REPO / "prepare_tinystories.py", "--train_file", big, "--out_dir",
                   tmp_path / "out", "--threads", 2, "--no_progress")
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["train_tokens"] > 4_000_000
    assert peak - with_bpe < 50, (peak, with_bpe)


# -----------------------------------------------------------------------------
# downloads, from a local HTTP server


class MirrorHandler(http.server.BaseHTTPRequestHandler):
    """Serves server.files by name, with Range support, in one of these modes: ok, 404, 503
    (always), drop (the first response per file stops after drop_after bytes), ignore_range."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        srv, name, rng = self.server, self.path.lstrip("/"), self.headers.get("Range")
        with srv.lock:
            srv.log.append((name, rng))
            first = sum(n == name for n, _ in srv.log) == 1
        if srv.mode == "404" or name not in srv.files:
            return self.send_error(404)
        if srv.mode == "503":
            return self.send_error(503)
        data, start = srv.files[name], 0
        if rng and srv.mode != "ignore_range":
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                return self.send_error(416)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:start + srv.drop_after] if srv.mode == "drop" and first
                         else data[start:])


@pytest.fixture
def mirror(stories, monkeypatch):
    monkeypatch.setattr(pt, "RETRY_WAIT", 0.001)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), MirrorHandler)
    srv.files = {V2_TRAIN: Path(stories[0]).read_bytes(), V2_VAL: Path(stories[1]).read_bytes()}
    srv.mode, srv.drop_after, srv.log, srv.lock = "ok", 50_000, [], threading.Lock()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def download_main(mirror, out, *extra):
    return run_main(["--base_url", mirror.url, "--out_dir", out, "--threads", 1, *extra])


def check_downloaded(mirror, out):
    raw = out / "raw"
    assert sorted(os.listdir(raw)) == sorted([V2_TRAIN, V2_VAL])  # no .part left
    for name in (V2_TRAIN, V2_VAL):
        assert (raw / name).read_bytes() == mirror.files[name]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["train_stories"] == len(reference(mirror.files[V2_TRAIN].decode())[0])


def test_download_then_no_second_download(mirror, tmp_path):
    out = tmp_path / "out"
    assert download_main(mirror, out) == 0
    check_downloaded(mirror, out)
    assert mirror.log == [(V2_VAL, None), (V2_TRAIN, None)]  # the small file first
    assert download_main(mirror, out) == 0
    assert len(mirror.log) == 2


@pytest.mark.parametrize("case", ["resumed", "server ignores Range", "no range left"])
def test_download_resumes_a_part_file(mirror, tmp_path, case):
    """A .part resumes from its end. A server that ignores Range sends the whole file, which
    replaces the .part (appended, it would corrupt the file); one that has no such range (416)
    makes the download start over."""
    mirror.mode = "ignore_range" if case == "server ignores Range" else "ok"
    out = tmp_path / "out"
    (out / "raw").mkdir(parents=True)
    part = {"resumed": mirror.files[V2_TRAIN][:100_000], "server ignores Range": b"garbage" * 99,
            "no range left": mirror.files[V2_TRAIN] + b"garbage"}[case]
    (out / "raw" / f"{V2_TRAIN}.part").write_bytes(part)
    assert download_main(mirror, out) == 0
    want = [f"bytes={len(part)}-"] + ([None] if case == "no range left" else [])
    assert [r for n, r in mirror.log if n == V2_TRAIN] == want
    check_downloaded(mirror, out)


def test_download_retries_a_dropped_connection(mirror, tmp_path, capsys):
    mirror.mode = "drop"
    out = tmp_path / "out"
    assert download_main(mirror, out) == 0
    assert [r for n, r in mirror.log if n == V2_TRAIN] == [None, "bytes=50000-"]
    check_downloaded(mirror, out)
    assert "connection closed after 50000 of" in capsys.readouterr().err


def test_download_gives_up_after_retries_on_5xx(mirror, tmp_path, capsys):
    mirror.mode = "503"
    assert download_main(mirror, tmp_path / "out") == 1
    assert error_line(capsys) == (f"error: download failed after {pt.RETRIES + 1} attempts: "
                                  f"HTTP 503 Service Unavailable: {mirror.url}/{V2_VAL}")
    assert len(mirror.log) == pt.RETRIES + 1
    assert_no_output(tmp_path / "out")


def test_download_404_fails_at_once(mirror, tmp_path, capsys):
    mirror.mode = "404"
    assert download_main(mirror, tmp_path / "out") == 1
    assert error_line(capsys) == \
        f"error: download failed: HTTP 404 Not Found: {mirror.url}/{V2_VAL}"
    assert len(mirror.log) == 1  # not retried
    assert_no_output(tmp_path / "out")


# -----------------------------------------------------------------------------
# --sample: the quickstart's data


def test_sample_options(capsys):
    args = pt.parse_args(["--sample"])
    assert (args.out_dir, args.raw_dir, args.vocab_size) == ("data/sample", "data/sample/raw", 4096)
    assert pt.parse_args(["--sample", "--vocab_size=50257"]).vocab_size == 50257
    assert (pt.parse_args([]).out_dir, pt.parse_args([]).vocab_size) == ("data/tinystories", None)
    with pytest.raises(SystemExit) as e:
        pt.parse_args(["--sample", "--train_file=x.txt"])
    assert e.value.code == 2 and "--sample makes its own text" in error_line(capsys)
    with pytest.raises(SystemExit) as e:
        pt.parse_args(["--help"])
    assert e.value.code == 0 and "--base_url" in capsys.readouterr().out


def test_sample_cuts_stories_2_to_1658_of_the_validation_file(mirror, tmp_path, monkeypatch):
    """Its record 1 is a fragment; stories wrapped in blank lines, spaces and \\r\\n come out
    stripped, their insides as they were; pieces of only whitespace are no records."""
    wraps = ("\n{}\n", "  \n\n{}  \n\n", "\r\n{}\r\n", " {}")
    insides = ("", " Lily saw a “big” dog. \nShe smiled.", "\n\n  Tom ran.\t")
    core = [f"Story {n}.{insides[n % 3]}" for n in range(1700)]
    messy = "ment of a story.\n" + SEP + "".join(
        wraps[n % 4].format(core[n]) + SEP + ("\n \n\t" + SEP if n % 5 == 0 else "")
        for n in range(2, 1700))
    mirror.files = {pt.SAMPLE_SOURCE: messy.encode("utf-8")}
    monkeypatch.chdir(tmp_path)
    assert run_main(["--sample", "--base_url", mirror.url, "--threads", 1]) == 0
    raw = tmp_path / "data" / "sample" / "raw"
    for split, (a, b) in (("train", (2, 1493)), ("val", (1494, 1658))):
        text = "".join(f"{core[n].strip()}\n{SEP}\n" for n in range(a, b + 1))
        assert (raw / pt.SAMPLE_FILES[split]).read_text(encoding="utf-8") == text
    meta = json.loads((tmp_path / "data" / "sample" / "meta.json").read_text())
    assert (meta["train_stories"], meta["val_stories"], meta["vocab_size"]) == (1492, 165, 4097)
    assert mirror.log == [(pt.SAMPLE_SOURCE, None)]


@pytest.mark.skipif(not (SHARED / "data" / "tinystories-sample-train.txt").is_file(),
                    reason=f"{SHARED / 'data'} does not hold the sample's reference files")
def test_sample_is_the_reference_byte_for_byte(mirror, tmp_path):
    """The quickstart's data from a mirror of the original file's first 1,658 records (as
    ../shared/tools/tinystories-mirror serves it): the reference text files and their tokens."""
    ref = {s: SHARED / "data" / name for s, name in pt.SAMPLE_FILES.items()}
    mirror.files = {pt.SAMPLE_SOURCE: b"Spot. The end.\n" + SEP.encode() + b"\n"
                    + ref["train"].read_bytes() + ref["val"].read_bytes()}
    out = tmp_path / "sample"
    assert run_main(["--sample", "--base_url", mirror.url, "--out_dir", out]) == 0
    keep, lookup = compact_reference(reference(read_text(ref["train"]))[1], 4096)
    for split, path in ref.items():
        assert (out / "raw" / path.name).read_bytes() == path.read_bytes()
        assert np.array_equal(tokens(out / f"{split}.bin"), lookup[reference(read_text(path))[1]])
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["vocab_size"], meta["train_tokens"], meta["val_tokens"], meta["val_bytes"]) == \
        (4097, 278070, 39643, 159995)
