"""sample.py on tiny checkpoints: the samples, stopping at end-of-text, the text streamed as the
tokens come (characters split across tokens included), which checkpoint it finds and says it
loaded, compact vocabularies, and one `error: ...` line for each bad input."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sample
from checkpoint import checkpoint_payload, load_model
from conftest import unsafe_message
from model import build_model

REPO = Path(sample.__file__).resolve().parent
TINY = dict(vocab_size=50257, block_size=32, n_layer=1, n_embd=32, n_head=2)
EOT = 50256
SEPARATOR = "\n---------------\n"


@pytest.fixture(scope="module")
def tokenizer():
    return sample.load_tokenizer()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.pt"
    torch.save(checkpoint_payload(build_model("prism", **TINY)), path)
    return path


@pytest.fixture(scope="module")
def eot_ckpt(tmp_path_factory):
    """A model that always predicts end-of-text: the final norm outputs a constant vector (zero
    gain, a bias) that only the end-of-text embedding (tied to the output) points along."""
    torch.manual_seed(0)
    model = build_model("prism", **TINY, bias=True)
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.transformer.wte.weight[EOT, 0] = 100.0
    path = tmp_path_factory.mktemp("ckpt") / "eot.pt"
    torch.save(checkpoint_payload(model), path)
    return path


def count(path):
    """Parameters of the checkpoint's model (tied embedding and output weights counted once)."""
    return sum(p.numel() for p in load_model(path).parameters())


def run_main(capsys, *argv):
    rc = sample.main(["--device=cpu", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_end_to_end(ckpt, capsys):
    args = [f"--ckpt={ckpt}", "--prompt=Once upon a time", "--num_samples=2",
            "--max_new_tokens=8", "--temperature=0.8", "--top_k=200", "--top_p=0.95", "--seed=7"]
    rc, out, err = run_main(capsys, *args)
    assert rc == 0, err
    samples = out.split(SEPARATOR)
    assert len(samples) == 3 and samples[-1] == ""
    assert all(s.startswith("Once upon a time") and len(s) > len("Once upon a time")
               for s in samples[:2])
    assert err == f"loaded {ckpt}: prism, {count(ckpt) / 1e6:.2f}M parameters\n"  # stderr: 1 line
    assert run_main(capsys, *args)[1] == out   # same seed, same samples
    assert run_main(capsys, *args[:-1], "--seed=8")[1] != out


def test_greedy_is_deterministic(ckpt, capsys):
    out = run_main(capsys, f"--ckpt={ckpt}", "--temperature=0", "--num_samples=2",
                   "--max_new_tokens=5")[1]
    samples = out.split(SEPARATOR)
    assert samples[0] == samples[1]


def test_no_cache_gives_the_same_samples(ckpt, capsys):
    args = [f"--ckpt={ckpt}", "--num_samples=2", "--max_new_tokens=40", "--seed=3",
            "--keep_going"]  # 40 new tokens: past block_size = 32
    cached = run_main(capsys, *args)
    assert cached[0] == 0
    assert run_main(capsys, *args, "--no_cache") == cached


def test_options_reach_generate_stream(ckpt, monkeypatch, capsys):
    """top_k 0 and top_p 1 mean no limit (None); --no_cache turns the cache off."""
    cls, calls = type(load_model(ckpt)), []
    real = cls.generate_stream

    def spy(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True):
        calls.append((max_new_tokens, temperature, top_k, top_p, use_cache))
        return real(self, idx, max_new_tokens, temperature, top_k, top_p, use_cache)

    monkeypatch.setattr(cls, "generate_stream", spy)
    run_main(capsys, f"--ckpt={ckpt}", "--num_samples=1", "--max_new_tokens=2")
    run_main(capsys, f"--ckpt={ckpt}", "--num_samples=1", "--max_new_tokens=3", "--top_k=0",
             "--top_p=0.9", "--temperature=0.5", "--no_cache")
    assert calls == [(2, 0.8, 200, None, True), (3, 0.5, None, 0.9, False)]


def test_stops_at_end_of_text_unless_keep_going(eot_ckpt, capsys):
    rc, out, _ = run_main(capsys, f"--ckpt={eot_ckpt}", "--prompt=Hi", "--num_samples=1",
                          "--max_new_tokens=5")
    assert rc == 0 and out == "Hi" + SEPARATOR
    rc, out, _ = run_main(capsys, f"--ckpt={eot_ckpt}", "--prompt=Hi", "--num_samples=1",
                          "--max_new_tokens=3", "--keep_going")
    assert rc == 0 and out == "Hi" + "<|endoftext|>" * 3 + SEPARATOR


def test_text_streams_as_the_tokens_come(tokenizer):
    a, b = tokenizer.encode(" the cat")
    tokens = iter([a, b])
    pieces = sample.stream_text(tokens, tokenizer)
    assert next(pieces) == " the" and next(tokens) == b   # out before the next token is drawn


def test_multibyte_characters_split_across_tokens(tokenizer):
    ids = tokenizer.encode(" 🦖é")
    with pytest.raises(UnicodeDecodeError):   # some token holds part of a character
        [tokenizer.decode_bytes([t]).decode("utf-8") for t in ids]
    assert "".join(sample.stream_text(ids, tokenizer)) == " 🦖é"


def test_prompt_from_file(ckpt, tmp_path, capsys):
    f = tmp_path / "prompt.txt"
    f.write_text("Lily and Tom\n", encoding="utf-8")
    rc, out, _ = run_main(capsys, f"--ckpt={ckpt}", f"--prompt=FILE:{f}", "--num_samples=1",
                          "--max_new_tokens=2")
    assert rc == 0 and out.startswith("Lily and Tom") and not out.startswith("Lily and Tom\n")


@pytest.mark.parametrize("case", ["num_samples", "top_p", "not_an_int", "out_dir", "blank_prompt",
                                  "empty_prompt_file", "missing_prompt_file", "foreign_file",
                                  "weights_not_its_config", "no_cuda"])
def test_a_bad_input_is_one_error_line(case, ckpt, tmp_path, monkeypatch, capsys):
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "notes.pt").write_text("garbage")
    payload = torch.load(ckpt, weights_only=True)
    payload["model_config"]["n_embd"] = 64
    torch.save(payload, tmp_path / "mismatch.pt")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv, message = {
        "num_samples": (["--num_samples=0"], "--num_samples must be >= 1 (got 0)"),
        "top_p": (["--top_p=0"], "--top_p must be in (0, 1] (got 0.0)"),
        "not_an_int": (["--top_k=many"], "argument --top_k: invalid int value: 'many'"),
        "out_dir": (["--out_dir=out"], "unrecognized arguments: --out_dir=out"),
        "blank_prompt": (["--prompt=  \n "], "the prompt is empty"),
        "empty_prompt_file": ([f"--prompt=FILE:{tmp_path / 'empty.txt'}"],
                              f"the prompt is empty (file {tmp_path / 'empty.txt'})"),
        "missing_prompt_file": ([f"--prompt=FILE:{tmp_path / 'no.txt'}"],
                                f"cannot read prompt file {tmp_path / 'no.txt'} (No such file"),
        "foreign_file": ([f"--ckpt={tmp_path / 'notes.pt'}"],
                         f"{tmp_path / 'notes.pt'} is not a PyTorch checkpoint file"),
        "weights_not_its_config": ([f"--ckpt={tmp_path / 'mismatch.pt'}"],
                                   f"cannot load checkpoint {tmp_path / 'mismatch.pt'}: "),
        "no_cuda": (["--device=cuda"], "--device=cuda but this machine has no CUDA device"),
    }[case]
    rc, out, err = run_main(capsys, f"--ckpt={ckpt}", "--max_new_tokens=2", *argv)
    assert rc == 2 and out == "" and err.startswith("error: " + message) and err.count("\n") == 1


def test_a_checkpoint_carrying_code_is_refused_before_it_runs(unsafe_ckpt, capsys):
    path, marker = unsafe_ckpt
    rc, out, err = run_main(capsys, f"--ckpt={path}", "--max_new_tokens=2")
    assert rc == 2 and out == "" and err == unsafe_message(path) + "\n"
    assert not marker.exists()


@pytest.fixture(scope="module")
def compact(tmp_path_factory, tokenizer):
    """A compact vocabulary as prepare_tinystories.py --vocab_size writes it, and a model on it
    whose checkpoint carries it (as train.py's do) or not."""
    words = tokenizer.encode("Once upon a time, there was a cat.")
    gpt2_ids = list(dict.fromkeys(words)) + [EOT]
    size = len(gpt2_ids)
    d = tmp_path_factory.mktemp("compact")
    vocabulary = {"tokenizer": "gpt2", "vocab_size": size + 1, "eot_token": size - 1,
                  "compact_vocab": {"size": size, "unknown_token": size, "gpt2_ids": gpt2_ids}}
    torch.manual_seed(0)
    model = build_model("prism", **{**TINY, "vocab_size": size + 1})
    torch.save(checkpoint_payload(model), d / "bare.pt")
    model.vocabulary = vocabulary
    torch.save(checkpoint_payload(model), d / "ckpt.pt")
    return d, vocabulary


def test_compact_vocabulary(compact, capsys):
    d, vocabulary = compact
    size = vocabulary["compact_vocab"]["size"]
    tok = sample.load_tokenizer(vocabulary)
    ids = tok.encode("Once upon a dog")
    assert max(ids) == size and all(0 <= i <= size for i in ids)   # " dog" is unknown
    assert tok.decode_bytes(ids).decode() == "Once upon a" + sample.UNKNOWN_TEXT
    assert tok.eot == size - 1 and tok.decode_bytes([tok.eot]) == b"<|endoftext|>"
    rc, out, err = run_main(capsys, f"--ckpt={d / 'ckpt.pt'}", "--num_samples=1",
                            "--max_new_tokens=4")
    assert rc == 0 and out.startswith("Once upon a time"), err
    # without its vocabulary the ids cannot be decoded: one line saying so
    rc, out, err = run_main(capsys, f"--ckpt={d / 'bare.pt'}", "--max_new_tokens=4")
    last = err.splitlines()[-1]
    assert rc == 2 and out == "" and last.startswith("error: ") and "no vocabulary" in last


def test_checkpoint_from_train_py_carries_its_compact_vocabulary(compact_data, tmp_path, capsys):
    import train

    cfg = train.TrainConfig(data_dir=str(compact_data), out_dir=str(tmp_path), max_iters=2,
                            eval_interval=2, eval_iters=1, batch_size=2, warmup_iters=1)
    train.train(cfg, dict(n_layer=1, n_embd=32, n_head=2, block_size=32))
    path = tmp_path / "ckpt.pt"
    meta = json.loads((compact_data / "meta.json").read_text())
    saved = torch.load(path, weights_only=True)
    assert saved["vocabulary"]["compact_vocab"] == meta["compact_vocab"]
    capsys.readouterr()
    rc, out, err = run_main(capsys, f"--ckpt={path}", "--prompt=Once upon a time",
                            "--num_samples=1", "--max_new_tokens=5", "--keep_going")
    assert rc == 0 and out.startswith("Once upon a time"), err
    # the line says what was loaded, with the run's iteration and best val loss
    assert err == (f"loaded {path}: prism, {count(path) / 1e6:.2f}M parameters, iteration 2, "
                   f"val loss {saved['best_val_loss']:.4f}\n")


def test_which_checkpoint(ckpt, tmp_path, monkeypatch, capsys):
    """Default: the newest out/*/ckpt.pt; --ckpt takes a file or a folder holding ckpt.pt."""
    monkeypatch.chdir(tmp_path)
    hint = "(train one with `python train.py`, or give --ckpt=PATH)"
    rc, out, err = run_main(capsys, "--max_new_tokens=1")
    assert rc == 2 and err == f"error: no checkpoint in out/*/ {hint}\n"
    for i, name in enumerate(["old", "new"]):
        (tmp_path / "out" / name).mkdir(parents=True)
        (tmp_path / "out" / name / "ckpt.pt").write_bytes(ckpt.read_bytes())
        os.utime(tmp_path / "out" / name / "ckpt.pt", (time.time() + i, time.time() + i))
    (tmp_path / "out" / "old" / "model").write_bytes(ckpt.read_bytes())  # a file, no suffix
    (tmp_path / "out" / "empty").mkdir()
    for argv, path in [([], os.path.join("out", "new", "ckpt.pt")),
                       (["--ckpt=out/old"], os.path.join("out", "old", "ckpt.pt")),
                       (["--ckpt=out/old/ckpt.pt"], os.path.join("out", "old", "ckpt.pt")),
                       (["--ckpt=out/old/model"], os.path.join("out", "old", "model"))]:
        rc, out, err = run_main(capsys, *argv, "--max_new_tokens=1", "--num_samples=1")
        assert rc == 0 and err.startswith(f"loaded {path}: prism, "), (argv, err)
    for argv, missing in [(["--ckpt=out/empty"], os.path.join("out", "empty", "ckpt.pt")),
                          (["--ckpt=out/cpu_small"], os.path.join("out", "cpu_small", "ckpt.pt")),
                          (["--ckpt=out/x.pt"], os.path.join("out", "x.pt"))]:
        rc, out, err = run_main(capsys, *argv, "--max_new_tokens=1")
        assert rc == 2 and out == "" and err == f"error: no checkpoint at {missing} {hint}\n", argv


def test_command_line(ckpt):
    """The script as a user runs it: the samples on stdout, exit status 0."""
    ok = subprocess.run([sys.executable, "sample.py", f"--ckpt={ckpt}", "--num_samples=1",
                         "--max_new_tokens=3", "--device=cpu"], cwd=REPO, capture_output=True,
                        text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("Once upon a time") and ok.stdout.endswith(SEPARATOR)


def test_a_tokenizer_that_cannot_load_is_one_line(monkeypatch):
    """Offline without tiktoken's cached files, get_encoding raises a network error: one line."""
    import tiktoken

    def offline(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(sample.UsageError, match="could not load GPT-2's tokenizer "
                                                "\\(ConnectionError\\).*TIKTOKEN_CACHE_DIR"):
        sample.load_tokenizer(None)
