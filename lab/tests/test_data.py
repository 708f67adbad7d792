"""lab/data.py: the study's data. Its validation stories are split whole, every second one to the
report split, with the tutorial's tokens and compact vocabulary (re-computed here from the text);
on the real sample it has the fingerprint of the committed study records."""
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import tiktoken

import prepare_tinystories
from conftest import SHARED
from lab import compare, data

REPO = Path(__file__).resolve().parents[2]
SEP = "<|endoftext|>"
ENC = tiktoken.get_encoding("gpt2")


def split_stories(path):
    return [s.strip() for s in Path(path).read_text(encoding="utf-8").split(SEP) if s.strip()]


def encode(stories):
    return np.array([t for s in stories for t in ENC.encode_ordinary(s) + [ENC.eot_token]],
                    dtype=np.uint16)


def test_every_second_validation_story_goes_to_the_report_split(stories, tmp_path):
    out, K = tmp_path / "study", 512
    meta = data.prepare_study(*stories, out_dir=out, vocab_size=K, progress=False)
    train, val = (split_stories(p) for p in stories)
    want = {"train": train, "val": val[0::2], "test": val[1::2]}
    counts = np.bincount(encode(train), minlength=ENC.n_vocab)
    keep = sorted(range(ENC.n_vocab), key=lambda t: (-counts[t], t))[:K]  # most frequent first
    if ENC.eot_token not in keep:
        keep[-1] = ENC.eot_token
    lookup = np.full(ENC.n_vocab, K, dtype="<u2")
    lookup[keep] = np.arange(K)
    for split, texts in want.items():
        ids = encode(texts)
        assert (out / f"{split}.bin").read_bytes() == lookup[ids].tobytes(), split
        assert (meta[f"{split}_stories"], meta[f"{split}_tokens"], meta[f"{split}_bytes"]) == \
            (len(texts), len(ids), sum(len(s.encode("utf-8")) for s in texts))
    assert meta["compact_vocab"]["gpt2_ids"] == keep and meta["vocab_size"] == K + 1
    assert "report_split" in meta and json.loads((out / "meta.json").read_text()) == meta
    assert sorted(os.listdir(out)) == ["meta.json", "test.bin", "train.bin", "val.bin"]


@pytest.mark.skipif(not (SHARED / "data" / "tinystories-sample-train.txt").is_file(),
                    reason=f"{SHARED / 'data'} does not hold the sample's text files")
def test_the_study_data_has_the_committed_fingerprint(tmp_path, capsys):
    out = tmp_path / "study"
    data.main([f"--raw_dir={SHARED / 'data'}", f"--out_dir={out}", "--no_progress"])
    fingerprint = compare.fingerprint(json.loads((out / "meta.json").read_text()))
    assert fingerprint == {"tokenizer": "gpt2", "vocab_size": 4097, "train_tokens": 278070,
                           "val_tokens": 20400, "val_bytes": 81931, "test_tokens": 19243,
                           "test_bytes": 78064, "compact_vocab": 4096}
    records = list((REPO / "lab" / "results" / "cpu-small").rglob("summary.json"))
    assert records and all(json.loads(p.read_text())["data"] == fingerprint for p in records)


def test_without_the_sample_text_it_downloads_it_and_says_why_it_cannot(tmp_path, capsys,
                                                                        monkeypatch):
    monkeypatch.setattr(prepare_tinystories, "RETRIES", 0)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(SystemExit) as e:
        data.main([f"--raw_dir={tmp_path / 'raw'}", f"--out_dir={tmp_path / 'study'}",
                   f"--base_url={url}", "--no_progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and err[-1].startswith(
        "error: download failed after 1 attempts: ") and f"{url}/TinyStories-valid.txt" in err[-1]
    with pytest.raises(SystemExit) as e:
        data.main(["--help"])
    assert e.value.code == 0 and "python -m lab.data" in capsys.readouterr().out
