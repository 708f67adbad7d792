"""
Sample stories from a trained checkpoint, streaming the text to stdout as the tokens come; one
line on stderr says which checkpoint was loaded.

    python sample.py                                   # the checkpoint you trained last
    python sample.py --prompt="Lily had a red ball" --num_samples=1 --max_new_tokens=300
    python sample.py --ckpt=out/prism_50m --temperature=0.7 --top_p=0.9
    python sample.py --ckpt=out/cpu_small/ckpt.pt --prompt=FILE:prompt.txt --temperature=0  # greedy
"""

import argparse
import codecs
import sys
from collections import namedtuple
from functools import partial
from pathlib import Path

import torch

from checkpoint import CheckpointError, load_model

EOT_TEXT = "<|endoftext|>"
GPT2_VOCAB = 50257
UNKNOWN_TEXT = "\N{REPLACEMENT CHARACTER}"  # how the unknown token of a compact vocabulary prints

# analyze_heads.py uses UsageError, find_checkpoint, load_checkpoint_model and pick_device too.


class UsageError(Exception):
    """A mistake in the user's input: one line `error: ...` on stderr, exit status 2."""


def find_checkpoint(ckpt=None):
    """A checkpoint file, or a folder holding ckpt.pt; None: the newest out/*/ckpt.pt (the run
    you trained last)."""
    hint = "train one with `python train.py`, or give --ckpt=PATH"
    if ckpt is None:
        newest = max(Path("out").glob("*/ckpt.pt"), key=lambda p: p.stat().st_mtime, default=None)
        if newest is None:
            raise UsageError(f"no checkpoint in out/*/ ({hint})")
        return newest
    path = Path(ckpt)
    if path.is_dir() or not path.suffix and not path.is_file():  # a folder, or meant as one
        path = path / "ckpt.pt"
    if not path.is_file():
        raise UsageError(f"no checkpoint at {path} ({hint})")
    return path


def load_checkpoint_model(path, device="cpu"):
    """(model, facts): the model, and what the checkpoint says of its run (iter_num, best_val_loss,
    train_config; None where absent). One line on stderr says what was loaded."""
    try:
        model = load_model(path, device)
    except CheckpointError as e:  # says what the file is, with its path
        raise UsageError(str(e)) from None
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:  # unreadable, or bad
        reason = (str(e) or type(e).__name__).splitlines()[0]
        raise UsageError(f"cannot load checkpoint {path}: {reason}") from None
    facts = model.training_run
    params = sum(p.numel() for p in model.parameters())
    line = f"loaded {path}: {model.arch}, {params / 1e6:.2f}M parameters"
    if facts["iter_num"] is not None:
        line += f", iteration {facts['iter_num']}"
    if facts["best_val_loss"] is not None:
        line += f", val loss {facts['best_val_loss']:.4f}"
    print(line, file=sys.stderr)
    return model, facts


def pick_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device={name} but this machine has no CUDA device")
    return name


Tokenizer = namedtuple("Tokenizer", ["encode", "decode_bytes", "eot"])  # text -> ids -> bytes


def load_tokenizer(vocabulary=None):
    """The tokenizer of a checkpoint's `vocabulary` (its data's meta.json fields, which train.py
    stores); None: plain GPT-2 BPE. In a compact vocabulary (prepare_tinystories.py --vocab_size)
    id c is GPT-2's gpt2_ids[c]; every other GPT-2 token is unknown_token (UNKNOWN_TEXT)."""
    vocabulary = vocabulary or {}
    if vocabulary.get("tokenizer", "gpt2") != "gpt2":
        raise UsageError(f"unsupported tokenizer {vocabulary['tokenizer']!r} (only 'gpt2')")
    import tiktoken  # noqa: PLC0415 — imported late so --help works without its files

    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception as e:  # its BPE files are fetched on first use: network errors of all kinds
        raise UsageError(f"could not load GPT-2's tokenizer ({type(e).__name__}); tiktoken "
                         "downloads its files on first use: without internet, set "
                         "TIKTOKEN_CACHE_DIR to a folder holding them") from None
    encode = partial(enc.encode, allowed_special={EOT_TEXT})
    eot = vocabulary.get("eot_token", enc.eot_token)
    compact = vocabulary.get("compact_vocab")
    if not compact:
        return Tokenizer(encode, enc.decode_bytes, eot)
    to_gpt2, unknown = compact["gpt2_ids"], compact["unknown_token"]
    to_compact = {g: c for c, g in enumerate(to_gpt2)}
    to_bytes = {c: enc.decode_bytes([g]) for c, g in enumerate(to_gpt2)}
    return Tokenizer(lambda s: [to_compact.get(g, unknown) for g in encode(s)],
                     lambda ids: b"".join(to_bytes.get(i, UNKNOWN_TEXT.encode()) for i in ids), eot)


def read_prompt(prompt):
    """The prompt; FILE:path reads it from a file (less the newline an editor ends it with)."""
    path = prompt.removeprefix("FILE:") if prompt.startswith("FILE:") else None
    if path is not None:
        try:
            prompt = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            reason = getattr(e, "strerror", None) or e  # "No such file or directory", ...
            raise UsageError(f"cannot read prompt file {path} ({reason})") from None
        if prompt.endswith("\n") and not prompt.endswith("\n\n"):
            prompt = prompt[:-1]
    if not prompt.strip():
        raise UsageError("the prompt is empty" + (f" (file {path})" if path else ""))
    return prompt


def stream_text(tokens, tokenizer, keep_going=False):
    """The text of `tokens` (as model.generate_stream yields them), piece by piece as they come,
    up to the first end-of-text token (not included) unless keep_going."""
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a token may split a character
    for t in map(int, tokens):
        if t == tokenizer.eot and not keep_going:
            break
        yield utf8.decode(tokenizer.decode_bytes([t]))
    yield utf8.decode(b"", final=True)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # a bad option or value is one `error: ...` line, as every mistake
        raise UsageError(message)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help: the docstring as written, then each option with its default."""


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--ckpt", metavar="PATH",
                   help="a ckpt.pt, or a folder holding one; None: the newest out/*/ckpt.pt")
    p.add_argument("--prompt", default="Once upon a time",
                   help="text to continue; FILE:path reads it from a file")
    p.add_argument("--num_samples", type=int, default=3,
                   help="samples to draw, each the prompt and its continuation, separated by a "
                        "line of dashes")
    p.add_argument("--max_new_tokens", type=int, default=200, help="tokens to generate per sample")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="softmax temperature; 0 picks the most likely token (greedy)")
    p.add_argument("--top_k", type=int, default=200,
                   help="sample among the k most likely tokens only; 0 = no limit")
    p.add_argument("--top_p", type=float, default=1.0,
                   help="nucleus sampling: the fewest tokens whose probability reaches p; 1 = off")
    p.add_argument("--seed", type=int, default=1337, help="random seed (same seed, same samples)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... or auto")
    p.add_argument("--no_cache", action="store_true",
                   help="recompute the whole context for every token instead of keeping each "
                        "layer's keys and values (same samples, slower; for comparison)")
    p.add_argument("--keep_going", action="store_true",
                   help="go on past the end-of-text token (printed as <|endoftext|>) instead of "
                        "ending the sample there")
    args = p.parse_args(argv)
    for name, ok, rule in [("num_samples", args.num_samples >= 1, ">= 1"),
                           ("max_new_tokens", args.max_new_tokens >= 0, ">= 0"),
                           ("temperature", args.temperature >= 0, ">= 0"),
                           ("top_k", args.top_k >= 0, ">= 0"),
                           ("top_p", 0 < args.top_p <= 1, "in (0, 1]")]:
        if not ok:
            p.error(f"--{name} must be {rule} (got {getattr(args, name)})")
    return args


def run(args):
    prompt = read_prompt(args.prompt)
    path = find_checkpoint(args.ckpt)
    device = pick_device(args.device)
    model, _ = load_checkpoint_model(path, device)
    vocab = model.config.vocab_size
    if not model.vocabulary and vocab != GPT2_VOCAB:
        raise UsageError(f"{path} carries no vocabulary and its model has {vocab} tokens, not "
                         f"GPT-2's {GPT2_VOCAB}: it was not written by train.py")
    tokenizer = load_tokenizer(model.vocabulary)
    idx = torch.tensor([tokenizer.encode(prompt)], device=device)
    top_k, top_p = args.top_k or None, (args.top_p if args.top_p < 1 else None)
    torch.manual_seed(args.seed)
    for _ in range(args.num_samples):
        tokens = model.generate_stream(idx, args.max_new_tokens, args.temperature, top_k, top_p,
                                       use_cache=not args.no_cache)
        print(prompt, end="", flush=True)
        for text in stream_text(tokens, tokenizer, args.keep_going):
            print(text, end="", flush=True)
        print("\n---------------")


def main(argv=None):
    try:
        run(parse_args(argv))
        return 0
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
