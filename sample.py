"""
Sample stories from a trained checkpoint, streaming the text as the tokens come.

    python sample.py                                   # the checkpoint you trained last
    python sample.py --prompt="Lily had a red ball" --num_samples=1 --max_new_tokens=300
    python sample.py --ckpt=out/prism_50m --temperature=0.7 --top_p=0.9
    python sample.py --ckpt=out/cpu_small --prompt=FILE:prompt.txt --temperature=0   # greedy
    python sample.py --no_cache      # recompute the whole context per token (slower, same text)

The checkpoint: --ckpt=PATH (a ckpt.pt, or a folder holding one), or by default the newest
out/*/ckpt.pt. The first line on stderr says which one was
loaded. A checkpoint carries its vocabulary, so the text decodes without the data folder.

Each sample is the prompt followed by the generated text; it ends at the first end-of-text token
(not printed) unless --keep_going; samples are separated by a line of dashes. A mistake (no
checkpoint, an empty prompt, ...) is one line `error: ...` on stderr and exit status 2.
"""

import argparse
import codecs
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from model import CheckpointError, load_model

EOT_TEXT = "<|endoftext|>"
GPT2_VOCAB = 50257
UNKNOWN_TEXT = "\N{REPLACEMENT CHARACTER}"  # how the unknown token of a compact vocabulary prints


class UsageError(Exception):
    """A problem with the user's input, reported as one `error: ...` line (exit status 2)."""


# -----------------------------------------------------------------------------
# Finding and loading the checkpoint (analyze_heads.py uses these too).


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
    """(model, facts): model.load_model with its failures as one-line errors, and what the
    checkpoint says of its run (iter_num, best_val_loss, train_config; None where absent). Prints
    one line to stderr saying what was loaded (so that stdout holds the samples only)."""
    try:
        model = load_model(path, device)
    except CheckpointError as e:  # says what the file is, with its path
        raise UsageError(str(e)) from None
    except (FileNotFoundError, ValueError, RuntimeError, KeyError, TypeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"cannot load checkpoint {path}: {msg}") from None
    facts = model.training_run
    line = (f"loaded {path}: {model.arch}, "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
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


# -----------------------------------------------------------------------------
# Tokens <-> text, in one place.


@dataclass
class Tokenizer:
    encode: Callable[[str], list]          # text -> model token ids
    decode_bytes: Callable[[list], bytes]  # model token ids -> UTF-8 bytes (may split a character)
    eot: int                               # the end-of-text token id, in model ids


def load_tokenizer(vocabulary=None):
    """The tokenizer of a checkpoint's `vocabulary` (its data's meta.json fields, which train.py
    stores); None: plain GPT-2 BPE. A compact vocabulary (prepare_tinystories.py --vocab_size):
    compact id c is GPT-2 id gpt2_ids[c]; other GPT-2 tokens encode to unknown_token, which
    decodes to UNKNOWN_TEXT."""
    vocabulary = vocabulary or {}
    if vocabulary.get("tokenizer", "gpt2") != "gpt2":
        raise UsageError(f"unsupported tokenizer {vocabulary['tokenizer']!r} (only 'gpt2')")
    import tiktoken  # noqa: PLC0415 — imported late so --help works without its files

    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception as e:  # its BPE files are fetched on first use: network errors of all kinds
        raise UsageError(f"could not load GPT-2's tokenizer ({type(e).__name__}); tiktoken downloads "
                         "its files on first use: without internet, set TIKTOKEN_CACHE_DIR to a "
                         "folder holding them") from None
    eot = int(vocabulary.get("eot_token", enc.eot_token))
    compact = vocabulary.get("compact_vocab")
    if not compact:
        return Tokenizer(lambda s: enc.encode(s, allowed_special={EOT_TEXT}),
                         lambda ids: enc.decode_bytes([int(i) for i in ids]), eot)
    to_gpt2, unknown = [int(i) for i in compact["gpt2_ids"]], int(compact["unknown_token"])
    to_compact = {g: c for c, g in enumerate(to_gpt2)}

    def encode(s):
        return [to_compact.get(g, unknown) for g in enc.encode(s, allowed_special={EOT_TEXT})]

    def decode_bytes(ids):
        return b"".join(enc.decode_bytes([to_gpt2[int(i)]]) if 0 <= int(i) < len(to_gpt2)
                        else UNKNOWN_TEXT.encode("utf-8") for i in ids)

    return Tokenizer(encode, decode_bytes, eot)


# -----------------------------------------------------------------------------
# Sampling.


def read_prompt(prompt):
    """The prompt text; FILE:path reads it from a file (less the newline an editor adds at its
    end). Empty is an error."""
    path = prompt[len("FILE:"):] if prompt.startswith("FILE:") else None
    if path is not None:
        try:
            prompt = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UsageError(f"no prompt file at {path}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read prompt file {path} ({e})") from None
        if prompt.endswith("\n") and not prompt.endswith("\n\n"):
            prompt = prompt[:-1]
    if prompt.strip() == "":
        raise UsageError("the prompt is empty" + (f" (file {path})" if path else ""))
    return prompt


def stream_sample(model, prompt_ids, tokenizer, max_new_tokens, temperature=1.0, top_k=None,
                  top_p=None, keep_going=False, write=None, device="cpu", use_cache=True):
    """Generate one sample after `prompt_ids`, writing its text through `write` as the tokens
    come. Stops at the end-of-text token (not written) unless keep_going. Returns the new ids."""
    write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    # A BPE token can end in the middle of a UTF-8 character: decode the bytes incrementally.
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    new = []
    for token in model.generate_stream(idx, max_new_tokens, temperature=temperature,
                                       top_k=top_k, top_p=top_p, use_cache=use_cache):
        t = int(token[0, 0])
        if t == tokenizer.eot and not keep_going:
            break
        new.append(t)
        text = utf8.decode(tokenizer.decode_bytes([t]))
        if text:
            write(text)
    tail = utf8.decode(b"", final=True)
    if tail:
        write(tail)
    return new


def build_parser():
    p = argparse.ArgumentParser(
        description="Sample stories from a prism-nano checkpoint, streamed as they are generated.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default=None,
                   help="a checkpoint file, or a folder holding ckpt.pt; default: the newest "
                        "out/*/ckpt.pt")
    p.add_argument("--prompt", default="Once upon a time",
                   help="text to continue; FILE:path reads it from a file")
    p.add_argument("--num_samples", type=int, default=3, help="how many samples to draw")
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
                        "layer's keys and values (same tokens, slower; for comparison)")
    p.add_argument("--keep_going", action="store_true",
                   help="do not stop a sample at the end-of-text token")
    return p


def check_args(args):
    if args.num_samples < 1:
        raise UsageError(f"--num_samples must be >= 1 (got {args.num_samples})")
    if args.max_new_tokens < 0:
        raise UsageError(f"--max_new_tokens must be >= 0 (got {args.max_new_tokens})")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0 (got {args.temperature})")
    if args.top_k < 0:
        raise UsageError(f"--top_k must be >= 0 (got {args.top_k})")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top_p must be in (0, 1] (got {args.top_p})")


def run(args, out=None):
    out = out or sys.stdout
    check_args(args)
    prompt = read_prompt(args.prompt)
    path = find_checkpoint(args.ckpt)
    device = pick_device(args.device)
    model, _ = load_checkpoint_model(path, device)
    vocab = model.config.vocab_size
    if not model.vocabulary and vocab != GPT2_VOCAB:
        raise UsageError(f"{path} carries no vocabulary and its model has {vocab} tokens, not "
                         f"GPT-2's {GPT2_VOCAB}: it was not written by train.py")
    tokenizer = load_tokenizer(model.vocabulary)
    prompt_ids = tokenizer.encode(prompt)
    torch.manual_seed(args.seed)

    def write(s):
        out.write(s)
        out.flush()

    for _ in range(args.num_samples):
        write(prompt)
        stream_sample(model, prompt_ids, tokenizer, args.max_new_tokens,
                      temperature=args.temperature, top_k=args.top_k or None,
                      top_p=args.top_p if args.top_p < 1 else None, keep_going=args.keep_going,
                      write=write, device=device, use_cache=not args.no_cache)
        write("\n---------------\n")
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
