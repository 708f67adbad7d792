"""Tests of prepare_tinystories.py: round trip, bounded memory, the downloader against a local
HTTP server (resume, retries, 404), and every kind of bad input leaving no output behind."""
import hashlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tiktoken

import prepare_tinystories as pt
from conftest import SHARED

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "prepare_tinystories.py"
SEP = "<|endoftext|>"
OUTPUTS = ("train.bin", "val.bin", "meta.json")
V2_TRAIN, V2_VAL = pt.FILES["v2"]


def reference(text):
    """Independent re-implementation of the spec: stories, token ids, UTF-8 bytes."""
    stories = [s.strip() for s in text.split(SEP) if s.strip()]
    enc = tiktoken.get_encoding("gpt2")
    ids = []
    for s in stories:
        ids += enc.encode_ordinary(s) + [enc.eot_token]
    return stories, np.array(ids, dtype=np.uint16), sum(len(s.encode("utf-8")) for s in stories)


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_main(argv):
    """main(argv) in-process; returns the exit code (0 when it returns normally)."""
    try:
        pt.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code
    return 0


def error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "nothing printed to stderr"
    return err[-1]


def assert_nothing_left(out_dir):
    """A failed run that created out_dir (and its raw/ folder) removed them again."""
    assert not Path(out_dir).exists(), f"left behind: {out_dir} {sorted(Path(out_dir).rglob('*'))}"


# -----------------------------------------------------------------------------
# round trip


def test_round_trip_local_files(stories, tmp_path):
    train, val = stories
    out = tmp_path / "out"
    assert run_main(["--train_file", train, "--val_file", val, "--out_dir", out, "--workers", 2,
                     "--no_progress"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    enc = tiktoken.get_encoding("gpt2")
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_token"]) == ("gpt2", 50257, 50256)
    for split, path in (("train", train), ("val", val)):
        text = Path(path).read_text(encoding="utf-8")
        ref_stories, ref_ids, ref_bytes = reference(text)
        ids = np.memmap(out / f"{split}.bin", dtype=np.uint16, mode="r")
        assert np.array_equal(ids, ref_ids)
        assert meta[f"{split}_tokens"] == len(ref_ids)
        assert meta[f"{split}_stories"] == len(ref_stories)
        assert meta[f"{split}_bytes"] == ref_bytes
        assert meta["sources"][split]["sha256"] == sha256(path)
        assert meta["sources"][split]["bytes"] == os.path.getsize(path)
        if split == "val":
            assert enc.decode(ids.tolist()) == SEP.join(ref_stories) + SEP
    assert meta["split"] is None
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)  # no temporaries left


def test_compact_vocabulary_maps_and_counts_unknown_tokens(stories, tmp_path):
    train, val = stories
    out, K = tmp_path / "out", 500
    assert run_main(["--train_file", train, "--val_file", val, "--out_dir", out, "--workers", 1,
                     "--vocab_size", K, "--no_progress"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    cv = meta["compact_vocab"]
    keep = np.array(cv["gpt2_ids"])
    assert meta["vocab_size"] == K + 1 and cv["unknown_token"] == K and len(set(keep)) == K
    assert keep[meta["eot_token"]] == 50256
    _, train_ref, _ = reference(Path(train).read_text(encoding="utf-8"))
    counts = np.bincount(train_ref, minlength=50257)
    assert counts[keep].min() >= np.delete(counts, keep).max()  # the K most frequent tokens
    for split, path in (("train", train), ("val", val)):
        _, ref_ids, _ = reference(Path(path).read_text(encoding="utf-8"))
        ids = np.memmap(out / f"{split}.bin", dtype=np.uint16, mode="r")
        assert len(ids) == meta[f"{split}_tokens"] == len(ref_ids)  # one token per GPT-2 token
        known = np.isin(ref_ids, keep)
        assert np.array_equal(keep[ids[known]], ref_ids[known])  # map, then unmap: the same ids
        assert np.all(ids[~known] == K)
        assert cv[f"{split}_unknown"] == int((~known).sum()) > 0
        assert cv[f"{split}_coverage"] == pytest.approx(known.mean(), abs=1e-6)


@pytest.mark.parametrize("size, message", [
    (60000, "--vocab_size must be in [256, 50256], got 60000"),
    (50257, "--vocab_size must be in [256, 50256], got 50257"),
    (255, "--vocab_size must be at least 256, got 255: the kept tokens must hold the end-of-text"),
    (3, "--vocab_size must be at least 256, got 3"),
    (0, "--vocab_size must be at least 256, got 0"),
])
def test_compact_vocabulary_size_is_checked(stories, tmp_path, capsys, size, message):
    train, val = stories
    assert run_main(["--train_file", train, "--val_file", val, "--out_dir", tmp_path / "o",
                     "--vocab_size", size, "--no_progress"]) == 1
    line = error_line(capsys)
    assert line.startswith("error: ") and message in line
    assert_nothing_left(tmp_path / "o")


def test_smallest_compact_vocabulary_is_accepted(stories, tmp_path):
    train, val = stories
    out = tmp_path / "o"
    assert run_main(["--train_file", train, "--val_file", val, "--out_dir", out, "--workers", 1,
                     "--vocab_size", pt.MIN_VOCAB_SIZE, "--no_progress"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["vocab_size"] == pt.MIN_VOCAB_SIZE + 1
    if Path(train) == REFERENCE["train"]:  # the real sample: the error message cites its coverage
        assert round(meta["compact_vocab"]["train_coverage"], 2) == 0.76


def test_vocab_size_is_checked_before_any_download(mirror, tmp_path, capsys):
    assert run_main(download_argv(mirror, tmp_path / "o", "--sample", "--vocab_size", 3)) == 1
    assert "--vocab_size must be at least 256" in error_line(capsys)
    assert mirror.log == []
    assert_nothing_left(tmp_path / "o")


def test_split_off_val_every_kth_story(stories, tmp_path):
    train, _ = stories
    out = tmp_path / "out"
    assert run_main(["--train_file", train, "--val_fraction", 0.1, "--out_dir", out,
                     "--workers", 1, "--no_progress"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    ref_stories, _, _ = reference(Path(train).read_text(encoding="utf-8"))
    k = 10
    want = {"val": [s for i, s in enumerate(ref_stories) if i % k == 0],
            "train": [s for i, s in enumerate(ref_stories) if i % k != 0]}
    assert meta["split"]["k"] == k
    for split, ss in want.items():
        _, ref_ids, ref_bytes = reference(SEP.join(ss))
        assert np.array_equal(np.memmap(out / f"{split}.bin", dtype=np.uint16, mode="r"), ref_ids)
        assert (meta[f"{split}_stories"], meta[f"{split}_bytes"]) == (len(ss), ref_bytes)
        assert meta["sources"][split]["sha256"] == sha256(train)


@pytest.mark.parametrize("vocab_size", [None, 500])
def test_report_fraction_splits_validation_by_whole_stories(stories, tmp_path, vocab_size):
    train, val = stories
    out = tmp_path / "out"
    argv = ["--train_file", train, "--val_file", val, "--out_dir", out, "--workers", 1,
            "--report_fraction", 0.5, "--no_progress"]
    assert run_main(argv + (["--vocab_size", vocab_size] if vocab_size else [])) == 0
    meta = json.loads((out / "meta.json").read_text())
    ref_stories, ref_ids, ref_bytes = reference(Path(val).read_text(encoding="utf-8"))
    want = {"test": ref_stories[1::2], "val": ref_stories[0::2]}  # every second story reports
    for split, ss in want.items():
        _, ids, n_bytes = reference(SEP.join(ss))
        got = np.memmap(out / f"{split}.bin", dtype=np.uint16, mode="r")
        if vocab_size:
            got = np.array(meta["compact_vocab"]["gpt2_ids"] + [-1])[got]
            ids = np.where(np.isin(ids, meta["compact_vocab"]["gpt2_ids"]), ids.astype(np.int64), -1)
        assert np.array_equal(got, ids)
        assert (meta[f"{split}_stories"], meta[f"{split}_tokens"], meta[f"{split}_bytes"]) == \
            (len(ss), len(ids), n_bytes)
    assert meta["val_tokens"] + meta["test_tokens"] == len(ref_ids)
    assert meta["val_bytes"] + meta["test_bytes"] == ref_bytes
    assert meta["report_split"]["report_fraction"] == 0.5
    if vocab_size:
        assert "test_coverage" in meta["compact_vocab"]
    # Prepared again without a report split, the folder holds no stale test.bin.
    assert run_main(argv[:-3] + ["--no_progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)
    assert "test_tokens" not in json.loads((out / "meta.json").read_text())


def test_report_stories_are_spread_evenly_and_deterministic():
    for f in (0.5, 0.3, 0.25, 0.9):
        picks = [pt.is_report_story(j, f) for j in range(200)]
        for n in range(1, 201):
            assert sum(picks[:n]) == int(n * f + 1e-9)  # floor(n·f) in every prefix


def test_report_split_needs_a_story_on_each_side(tmp_path, capsys):
    one = tmp_path / "val.txt"
    one.write_text("Just one story.\n" + SEP + "\n", encoding="utf-8")
    train = tmp_path / "train.txt"
    train.write_text(("A story.\n" + SEP + "\n") * 3, encoding="utf-8")
    assert run_main(["--train_file", train, "--val_file", one, "--out_dir", tmp_path / "o",
                     "--report_fraction", 0.5, "--no_progress"]) == 1
    assert "cannot be split" in error_line(capsys)
    assert_nothing_left(tmp_path / "o")


def test_reader_handles_chunk_boundaries(tmp_path):
    """Separators, CRLF and multi-byte characters cut across reads come out the same."""
    text = ("  Héllo wörld 🙂\r\n<|endoftext|>\r\n\n<|endoftext|>\nSecond — story\n"
            "<|endoftext|>Third")
    p = tmp_path / "t.txt"
    p.write_bytes(text.encode("utf-8"))
    want = ["Héllo wörld 🙂", "Second — story", "Third"]
    for read_bytes in (1, 2, 3, 5, 7, 1 << 20):
        h = hashlib.sha256()
        assert list(pt.iter_stories(p, hasher=h, read_bytes=read_bytes)) == want
        assert h.hexdigest() == sha256(p)


# -----------------------------------------------------------------------------
# memory


@pytest.fixture(scope="session")
def big_text(stories, tmp_path_factory):
    """~50 MB of real stories (the sample repeated: tokenizes at the same speed as fresh text)."""
    data = Path(stories[0]).read_bytes()
    path = tmp_path_factory.mktemp("big") / "big.txt"
    with open(path, "wb") as f:
        for _ in range(-(-50_000_000 // len(data))):
            f.write(data)
    return path


def peak_rss_mb(cmd):
    """Peak RSS (MB) of the largest process in cmd's process tree, via a wrapper that reads
    getrusage(RUSAGE_CHILDREN) after waiting for it (so earlier children of pytest don't count)."""
    wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
               "sys.exit(r.returncode)")
    r = subprocess.run([sys.executable, "-c", wrapper] + [str(c) for c in cmd], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return int(r.stdout.strip().splitlines()[-1]) / 1024  # ru_maxrss is in KiB on Linux


@pytest.mark.parametrize("workers", [1, 2])
def test_memory_bounded_on_50mb(big_text, tmp_path, workers):
    assert os.path.getsize(big_text) >= 50_000_000
    baseline = peak_rss_mb([sys.executable, "-c", "import numpy, tiktoken, tqdm"])
    # the GPT-2 BPE tables alone take tens of MB: a fixed cost, whatever the input size
    with_bpe = peak_rss_mb([sys.executable, "-c", "import numpy, tiktoken, tqdm; "
                            "tiktoken.get_encoding('gpt2')"])
    t = time.time()
    peak = peak_rss_mb([sys.executable, SCRIPT, "--train_file", big_text, "--out_dir",
                        tmp_path / "out", "--workers", workers, "--no_progress"])
    elapsed = time.time() - t
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["train_tokens"] + meta["val_tokens"] > 10_000_000
    print(f"workers={workers}: baseline {baseline:.0f} MB (with BPE loaded {with_bpe:.0f} MB), "
          f"peak {peak:.0f} MB, {elapsed:.1f} s")
    assert peak - baseline < 100, (peak, baseline)
    assert peak - with_bpe < 50, (peak, with_bpe)  # what the data costs: measured ~7 MB


# -----------------------------------------------------------------------------
# downloader against a local HTTP server


class MirrorHandler(http.server.BaseHTTPRequestHandler):
    """Serves server.files by name, with Range support, in one of several modes:
    ok, 404, 503 (always), drop (first response per file stops after drop_after bytes),
    ignore_range (always a full 200)."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        srv = self.server
        name, rng = self.path.lstrip("/"), self.headers.get("Range")
        with srv.lock:
            srv.log.append((name, rng))
            first = name not in srv.seen
            srv.seen.add(name)
        if srv.mode == "404" or name not in srv.files:
            return self.send_error(404)
        if srv.mode == "503":
            return self.send_error(503)
        data = srv.files[name]
        start = 0
        if rng and srv.mode != "ignore_range":
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if srv.mode == "drop" and first:
            body = body[:srv.drop_after]  # then the connection closes: a short read
        self.wfile.write(body)


@pytest.fixture
def mirror(stories):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), MirrorHandler)
    srv.files = {V2_TRAIN: Path(stories[0]).read_bytes(), V2_VAL: Path(stories[1]).read_bytes()}
    srv.mode, srv.drop_after, srv.log, srv.seen = "ok", 50_000, [], set()
    srv.lock = threading.Lock()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


def download_argv(mirror, out, *extra):
    return ["--base_url", mirror.url, "--out_dir", out, "--retry_wait", 0.001, "--workers", 1,
            "--no_progress", *extra]


def check_downloaded(mirror, out):
    raw = out / "raw"
    assert (raw / V2_TRAIN).read_bytes() == mirror.files[V2_TRAIN]
    assert (raw / V2_VAL).read_bytes() == mirror.files[V2_VAL]
    assert sorted(p.name for p in raw.iterdir()) == sorted([V2_TRAIN, V2_VAL])  # no .part left
    meta = json.loads((out / "meta.json").read_text())
    assert meta["sources"]["train"]["url"] == f"{mirror.url}/{V2_TRAIN}"
    assert meta["sources"]["train"]["sha256"] == hashlib.sha256(mirror.files[V2_TRAIN]).hexdigest()
    assert meta["train_stories"] == len(reference(mirror.files[V2_TRAIN].decode())[0])


def test_download_full_then_no_redownload(mirror, tmp_path):
    out = tmp_path / "out"
    assert run_main(download_argv(mirror, out)) == 0
    check_downloaded(mirror, out)
    assert sorted(mirror.log) == [(V2_TRAIN, None), (V2_VAL, None)]
    n = len(mirror.log)
    assert run_main(download_argv(mirror, out)) == 0  # complete files: not fetched again
    assert len(mirror.log) == n


def test_download_resumes_part_file(mirror, tmp_path):
    out = tmp_path / "out"
    (out / "raw").mkdir(parents=True)
    (out / "raw" / f"{V2_TRAIN}.part").write_bytes(mirror.files[V2_TRAIN][:100_000])
    assert run_main(download_argv(mirror, out)) == 0
    assert (V2_TRAIN, "bytes=100000-") in mirror.log
    assert [r for n, r in mirror.log if n == V2_TRAIN] == ["bytes=100000-"]  # only the rest
    check_downloaded(mirror, out)


def test_download_restarts_when_server_ignores_range(mirror, tmp_path):
    mirror.mode = "ignore_range"
    out = tmp_path / "out"
    (out / "raw").mkdir(parents=True)
    (out / "raw" / f"{V2_TRAIN}.part").write_bytes(b"garbage" * 1000)  # would corrupt if appended
    assert run_main(download_argv(mirror, out)) == 0
    assert (V2_TRAIN, "bytes=7000-") in mirror.log
    check_downloaded(mirror, out)


def test_download_complete_part_file_is_just_renamed(mirror, tmp_path):
    dest = tmp_path / V2_VAL
    Path(f"{dest}.part").write_bytes(mirror.files[V2_VAL])  # e.g. killed before the rename
    pt.download(f"{mirror.url}/{V2_VAL}", str(dest), retries=1, retry_wait=0.001, progress=False)
    assert dest.read_bytes() == mirror.files[V2_VAL]
    assert mirror.log == [(V2_VAL, f"bytes={len(mirror.files[V2_VAL])}-")]  # answered 416


def test_download_survives_dropped_connection(mirror, tmp_path, capsys):
    mirror.mode = "drop"
    out = tmp_path / "out"
    assert run_main(download_argv(mirror, out)) == 0
    assert mirror.log.count((V2_TRAIN, None)) == 1
    assert (V2_TRAIN, "bytes=50000-") in mirror.log  # retried, resuming after the drop
    check_downloaded(mirror, out)
    assert "connection closed after 50000 of" in capsys.readouterr().err


def test_local_val_file_downloads_only_train(mirror, stories, tmp_path):
    out = tmp_path / "out"
    assert run_main(download_argv(mirror, out, "--val_file", stories[1])) == 0
    assert mirror.log == [(V2_TRAIN, None)]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["sources"]["val"]["sha256"] == sha256(stories[1])
    assert "url" not in meta["sources"]["val"]


def test_download_404_fails_at_once(mirror, tmp_path, capsys):
    mirror.mode = "404"
    out = tmp_path / "out"
    assert run_main(download_argv(mirror, out, "--retries", 3)) == 1
    line = error_line(capsys)
    assert line.startswith("error: ") and "HTTP 404" in line and f"{mirror.url}/{V2_VAL}" in line
    assert len(mirror.log) == 1  # not retried
    assert_nothing_left(out)


def test_download_fails_after_retries(mirror, tmp_path, capsys):
    mirror.mode = "503"
    out = tmp_path / "out"
    t = time.time()
    assert run_main(download_argv(mirror, out, "--retries", 2)) == 1
    assert time.time() - t < 10
    line = error_line(capsys)
    assert line.startswith("error: download failed after 3 attempts")
    assert "HTTP 503" in line and f"{mirror.url}/{V2_VAL}" in line
    assert len(mirror.log) == 3
    assert_nothing_left(out)


def test_download_connection_refused_fails_after_retries(tmp_path, capsys):
    import socket
    with socket.socket() as s:  # a port on 127.0.0.1 that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    argv = ["--base_url", f"http://127.0.0.1:{port}", "--out_dir", out, "--retries", 1,
            "--retry_wait", 0.001, "--no_progress"]
    assert run_main(argv) == 1
    line = error_line(capsys)
    assert line.startswith("error: download failed after 2 attempts") and f":{port}/" in line
    assert_nothing_left(out)


# -----------------------------------------------------------------------------
# --sample: the CPU study's sample, cut from TinyStories-valid.txt


def core_story(n):
    """Story n as the sample keeps it: inner blank lines, trailing spaces and tabs stay."""
    return (f"Story {n}. Lily saw a “big” dog. \nShe smiled.",
            f"Story {n}.\n\n  Tom ran.\tHe was happy.",
            f"Story {n}. The end.")[n % 3]


def messy_valid_file(n_records):
    """A TinyStories-valid.txt in every form a real one might take: record 1 a fragment, then
    stories wrapped in newlines, spaces and blank lines, \r\n, a separator on the story's own line,
    and pieces of only whitespace between separators (which are no records)."""
    wraps = ("\n{}\n", "  \n\n{}  \n\n", "\r\n{}\r\n", " {}")
    text = "ment of a story, said Spot.\n" + SEP
    for n in range(2, n_records + 1):
        text += wraps[n % 4].format(core_story(n)) + SEP
        if n % 5 == 0:
            text += "\n \n\t" + SEP  # an empty piece
    return (text + "\n").encode("utf-8")


def sample_text(first, last):
    return "".join(f"{core_story(n)}\n{SEP}\n" for n in range(first, last + 1)).encode("utf-8")


def test_cut_records_keeps_exactly_the_records_asked_for(tmp_path):
    src = tmp_path / pt.SAMPLE_SOURCE
    src.write_bytes(messy_valid_file(12))
    dests = {"train": tmp_path / "t.txt", "val": tmp_path / "v.txt"}
    counts = pt.cut_records(src, dests, {"train": (2, 4), "val": (5, 7)})
    assert counts == {"train": 3, "val": 3}
    assert dests["train"].read_bytes() == sample_text(2, 4)
    assert dests["val"].read_bytes() == sample_text(5, 7)
    # spelled out: the ends stripped (\r\n, spaces, blank lines), the inside kept as it was
    assert dests["train"].read_text(encoding="utf-8") == (
        "Story 2. The end.\n<|endoftext|>\n"
        "Story 3. Lily saw a “big” dog. \nShe smiled.\n<|endoftext|>\n"
        "Story 4.\n\n  Tom ran.\tHe was happy.\n<|endoftext|>\n")
    assert dests["val"].read_bytes().startswith(b"Story 5. The end.\n<|endoftext|>\nStory 6. ")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([src.name, "t.txt", "v.txt"])


def test_cut_records_refuses_a_file_too_short(tmp_path):
    src = tmp_path / pt.SAMPLE_SOURCE
    src.write_bytes(messy_valid_file(6))
    dests = {"train": tmp_path / "t.txt", "val": tmp_path / "v.txt"}
    with pytest.raises(pt.PrepareError, match="only 6 records, the sample needs records up to 7"):
        pt.cut_records(src, dests, {"train": (2, 4), "val": (5, 7)})
    assert sorted(p.name for p in tmp_path.iterdir()) == [src.name]  # no output, no temporaries


def test_sample_downloads_cuts_and_tokenizes_into_data_sample(mirror, tmp_path, monkeypatch):
    (a, b), (c, d) = pt.SAMPLE_RECORDS["train"], pt.SAMPLE_RECORDS["val"]
    assert (a, b + 1, d) == (2, c, 1658)
    mirror.files = {pt.SAMPLE_SOURCE: messy_valid_file(d + 40)}
    monkeypatch.chdir(tmp_path)
    argv = ["--sample", "--base_url", mirror.url, "--retry_wait", 0.001, "--workers", 1,
            "--report_fraction", 0.5, "--no_progress"]
    assert run_main(argv) == 0
    out, raw = tmp_path / "data" / "sample", tmp_path / "data" / "sample" / "raw"
    assert (raw / pt.SAMPLE_SOURCE).read_bytes() == mirror.files[pt.SAMPLE_SOURCE]
    assert (raw / "tinystories-sample-train.txt").read_bytes() == sample_text(a, b)
    assert (raw / "tinystories-sample-val.txt").read_bytes() == sample_text(c, d)
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["train_stories"], meta["val_stories"] + meta["test_stories"]) == (1492, 165)
    for split, name, records in (("train", "tinystories-sample-train.txt", "2-1493"),
                                 ("val", "tinystories-sample-val.txt", "1494-1658")):
        src = meta["sources"][split]
        assert src["path"] == str(raw / name) and src["sha256"] == sha256(raw / name)
        assert src["url"] == f"{mirror.url}/{pt.SAMPLE_SOURCE}"
        assert src["records"] == f"{records} of {pt.SAMPLE_SOURCE}"
    _, ids, _ = reference(sample_text(a, b).decode("utf-8"))
    assert np.array_equal(np.memmap(out / "train.bin", dtype=np.uint16, mode="r"), ids)
    assert mirror.log == [(pt.SAMPLE_SOURCE, None)]
    assert run_main(argv) == 0  # the download is kept: not fetched again
    assert len(mirror.log) == 1


def test_sample_from_a_file_too_short_fails_in_one_line(mirror, tmp_path, capsys):
    mirror.files = {pt.SAMPLE_SOURCE: messy_valid_file(100)}
    out = tmp_path / "o"
    assert run_main(download_argv(mirror, out, "--sample")) == 1
    line = error_line(capsys)
    assert line.startswith("error: ") and "only 100 records" in line and "up to 1,658" in line
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert left == ["raw", f"raw/{pt.SAMPLE_SOURCE}"]  # the download only: it is kept


@pytest.mark.parametrize("extra", [["--train_file", "x.txt"], ["--val_file", "x.txt"],
                                   ["--version", "v1"]])
def test_sample_refuses_other_sources(extra, capsys):
    with pytest.raises(SystemExit) as e:
        pt.parse_args(["--sample", *extra])
    assert e.value.code == 2
    assert f"--sample makes its own train and val text from {pt.SAMPLE_SOURCE}: drop {extra[0]}" \
        in error_line(capsys)


def test_default_out_dir_depends_on_sample():
    assert pt.parse_args([]).out_dir == "data/tinystories"
    assert pt.parse_args(["--sample"]).out_dir == "data/sample"
    assert pt.parse_args(["--sample", "--out_dir", "elsewhere"]).out_dir == "elsewhere"


REFERENCE = {split: SHARED / "data" / name for split, name in pt.SAMPLE_FILES.items()}
MIRROR_TOOL = SHARED / "tools" / "tinystories-mirror"


def start_mirror_tool(tries=3):
    """The shared mirror tool on a free port: (process, base URL) once it answers."""
    import socket
    import urllib.request
    for _ in range(tries):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen([str(MIRROR_TOOL), str(port)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 20
        while time.time() < deadline and proc.poll() is None:
            try:
                urllib.request.urlopen(f"{url}/{pt.SAMPLE_SOURCE}", timeout=5).close()
                return proc, url
            except OSError:
                time.sleep(0.1)
        stop_mirror_tool(proc)  # the port was taken meanwhile, or it never answered: again
    pytest.fail("the mirror tool did not start")


def stop_mirror_tool(proc):
    proc.terminate()  # its trap stops the server it started
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the tool and its server only
        proc.wait()


QUICKSTART = ["--vocab_size", 4096, "--report_fraction", 0.5, "--workers", 1, "--no_progress"]


@pytest.fixture(scope="module")
def shared_sample(tmp_path_factory):
    """data/sample as the CPU quickstart makes it (--sample --vocab_size=4096
    --report_fraction=0.5), downloaded from the shared mirror tool."""
    if not (all(p.is_file() for p in REFERENCE.values()) and MIRROR_TOOL.is_file()):
        pytest.skip(f"this test checks --sample against the shared reference files and mirror "
                    f"tool, and {SHARED} does not hold them")
    proc, url = start_mirror_tool()
    try:
        out = tmp_path_factory.mktemp("sample") / "data" / "sample"
        assert run_main(["--sample", "--base_url", url, "--out_dir", out, *QUICKSTART]) == 0
    finally:
        stop_mirror_tool(proc)
    return out


def test_sample_reproduces_the_reference_files_byte_for_byte(shared_sample):
    for split, path in REFERENCE.items():
        assert (shared_sample / "raw" / path.name).read_bytes() == path.read_bytes(), split


def test_sample_tokenizes_as_the_reference_files_do(shared_sample, tmp_path):
    ref = tmp_path / "ref"
    assert run_main(["--train_file", REFERENCE["train"], "--val_file", REFERENCE["val"],
                     "--out_dir", ref, *QUICKSTART]) == 0
    assert sorted(p.name for p in ref.iterdir()) == sorted([*OUTPUTS, "test.bin"])
    for name in ("train.bin", "val.bin", "test.bin"):
        assert (shared_sample / name).read_bytes() == (ref / name).read_bytes(), name
    got, want = (json.loads((d / "meta.json").read_text()) for d in (shared_sample, ref))
    assert sorted(got["sources"]) == ["test", "train", "val"]  # test: the val file's share
    for split, src in got["sources"].items():
        name = REFERENCE["train" if split == "train" else "val"].name
        assert src.pop("path") == str(shared_sample / "raw" / name)
        assert src.pop("url").endswith(f"/{pt.SAMPLE_SOURCE}")
        assert src.pop("dataset") == "roneneldan/TinyStories v1"
        assert src.pop("records").endswith(f" of {pt.SAMPLE_SOURCE}")
        want["sources"][split].pop("path")
    assert got == want


# -----------------------------------------------------------------------------
# bad input


def test_missing_file(tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    assert run_main(["--train_file", missing, "--out_dir", tmp_path / "out"]) == 1
    line = error_line(capsys)
    assert line.startswith("error: ") and str(missing) in line and "no such file" in line
    assert_nothing_left(tmp_path / "out")


def test_empty_file(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    assert run_main(["--train_file", empty, "--out_dir", tmp_path / "out"]) == 1
    line = error_line(capsys)
    assert line.startswith("error: ") and str(empty) in line and "empty" in line
    assert_nothing_left(tmp_path / "out")


def test_file_without_stories(stories, tmp_path, capsys):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n<|endoftext|>\n   \n<|endoftext|>\n\n", encoding="utf-8")
    out = tmp_path / "out"
    assert run_main(["--train_file", stories[0], "--val_file", blank, "--out_dir", out,
                     "--no_progress"]) == 1
    line = error_line(capsys)
    assert line.startswith("error: ") and str(blank) in line and "no stories" in line
    assert_nothing_left(out)


def test_single_story_cannot_be_split(tmp_path, capsys):
    one = tmp_path / "one.txt"
    one.write_text("Once upon a time there was one story.\n<|endoftext|>\n", encoding="utf-8")
    assert run_main(["--train_file", one, "--out_dir", tmp_path / "out", "--no_progress"]) == 1
    assert "need at least 2" in error_line(capsys)
    assert_nothing_left(tmp_path / "out")


def test_not_utf8_says_where(stories, tmp_path, capsys):
    good = Path(stories[0]).read_bytes()  # > 1 MiB: the bad byte is in the second read
    bad = good + b"One more story with a bad \xff byte.\n<|endoftext|>\n"
    path = tmp_path / "latin.txt"
    path.write_bytes(bad)
    offset, line_no = bad.index(b"\xff"), bad[:bad.index(b"\xff")].count(b"\n") + 1
    out = tmp_path / "out"
    assert run_main(["--train_file", path, "--val_file", stories[1], "--out_dir", out,
                     "--workers", 1, "--no_progress"]) == 1
    line = error_line(capsys)
    assert line.startswith("error: ") and str(path) in line
    assert f"byte offset {offset}" in line and f"line {line_no}" in line
    assert_nothing_left(out)


@pytest.mark.parametrize("read_bytes", [1, 3, 1 << 20])
def test_not_utf8_offset_across_reads(tmp_path, read_bytes):
    data = "ä\nstory one ü\n<|endoftext|>\n€ two\n".encode("utf-8") + b"\xe2\x82" + b" x\n"
    path = tmp_path / "bad.txt"
    path.write_bytes(data)
    bad_at = data.index(b"\xe2\x82 ")
    with pytest.raises(pt.PrepareError, match=f"byte offset {bad_at} \\(line 5\\)"):
        list(pt.iter_stories(path, read_bytes=read_bytes))
    path.write_bytes(b"fine story\n\xc3")  # truncated at the end of the file
    with pytest.raises(pt.PrepareError, match="byte offset 11 \\(line 2\\)"):
        list(pt.iter_stories(path, read_bytes=read_bytes))


def test_missing_separator_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pt, "MAX_STORY_CHARS", 1000)
    path = tmp_path / "novel.txt"
    path.write_text("word " * 10_000, encoding="utf-8")
    assert run_main(["--train_file", path, "--out_dir", tmp_path / "out", "--no_progress"]) == 1
    assert "no <|endoftext|> separator" in error_line(capsys)
    assert_nothing_left(tmp_path / "out")


def test_ctrl_c_midway_cleans_up(stories, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.bin").write_bytes(b"from an earlier run")  # must survive untouched
    real, calls = pt.encode_batch, []

    def encode_then_interrupt(batch):
        calls.append(len(batch))
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(batch)

    monkeypatch.setattr(pt, "encode_batch", encode_then_interrupt)
    assert run_main(["--train_file", stories[0], "--val_file", stories[1], "--out_dir", out,
                     "--workers", 1, "--no_progress"]) == 130
    assert len(calls) == 2
    assert error_line(capsys).startswith("interrupted")
    assert sorted(p.name for p in out.iterdir()) == ["train.bin"]
    assert (out / "train.bin").read_bytes() == b"from an earlier run"


def test_sigint_with_worker_pool(big_text, tmp_path):
    """A real Ctrl-C (SIGINT) to the script while 2 worker processes encode. The child starts with
    SIGINT at its default action, as under a terminal: a shell without job control starts its
    background jobs with SIGINT ignored (POSIX), and an ignored SIGINT would be inherited through
    pytest, making the signal a no-op and the test fail for a reason that is not the script's."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, SCRIPT, "--train_file", big_text, "--out_dir", out,
                             "--workers", "2", "--no_progress"], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 30
        while time.time() < deadline and proc.poll() is None:  # wait until tokens are written
            tmps = list(out.glob(".train.bin.tmp-*")) if out.exists() else []
            if tmps and tmps[0].stat().st_size > 0:
                break
            time.sleep(0.005)
        assert proc.poll() is None, "finished before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("interrupted")
    assert "Traceback" not in err
    assert_nothing_left(out)


def test_a_failed_run_keeps_a_folder_that_was_there_before(stories, tmp_path, capsys):
    one = tmp_path / "one.txt"  # fails in the tokenizing, once the output folder is made
    one.write_text("Once upon a time there was one story.\n<|endoftext|>\n", encoding="utf-8")
    for existing, content in ((tmp_path / "was_empty", []), (tmp_path / "had_files", ["notes.txt"])):
        existing.mkdir()
        for name in content:
            (existing / name).write_text("keep me")
        assert run_main(["--train_file", one, "--out_dir", existing / "sub", "--no_progress"]) == 1
        assert "need at least 2" in error_line(capsys)
        assert sorted(p.name for p in existing.iterdir()) == content  # only sub/ went away
