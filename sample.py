"""
Sample stories from a trained checkpoint, streaming the text as the tokens come.

Examples:
    python sample.py --prompt="Once upon a time" --num_samples=3 \\
        --max_new_tokens=200 --temperature=0.8 --top_k=200 --seed=1337
    python sample.py --ckpt=out/cpu_tiny/ckpt.pt --prompt=FILE:prompt.txt --top_p=0.9
    python sample.py --ckpt=out/prism_50m/ckpt.pt --prompt_file=prompt.txt --temperature=0   # greedy
    python sample.py --keep_going   # do not stop at <|endoftext|>
    python sample.py --no_cache     # recompute the context per token (slower, same tokens)
    python sample.py --ckpt=out/old/ckpt.pt --meta=data/sample4k/meta.json  # an id map by hand

--ckpt defaults to the checkpoint `python train.py` writes on this machine: out/prism_50m/ckpt.pt
where there is CUDA, else out/cpu_tiny/ckpt.pt (`--help` says which).

Each sample is printed as its prompt followed by the generated text, and ends at the first
end-of-text token (which is not printed) unless --keep_going is given; samples are separated by a
line of dashes. Errors (missing or corrupt checkpoint, empty prompt, ...) are one line
`error: ...` on stderr with exit status 1.

Tokens are turned into text and back in one place, `load_tokenizer` (analyze_heads.py uses it
too): GPT-2 BPE through tiktoken, or whatever a data folder's meta.json describes.
"""

import argparse
import codecs
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

EOT_TEXT = "<|endoftext|>"
GPT2_VOCAB = 50257
UNKNOWN_TEXT = "\N{REPLACEMENT CHARACTER}"  # how the unknown token of a compact vocabulary prints


class UsageError(Exception):
    """A problem with the user's input, reported as one `error: ...` line."""


# -----------------------------------------------------------------------------
# Tokens <-> text, in one place.


@dataclass
class Tokenizer:
    encode: Callable[[str], list]     # text -> model token ids
    decode_bytes: Callable[[list], bytes]  # model token ids -> UTF-8 bytes (may split a character)
    eot: int                          # the end-of-text token id, in model ids
    name: str

    def decode(self, ids):
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


def load_tokenizer(meta_path=None, meta=None):
    """The tokenizer a model was trained with. `meta_path` is a data folder's meta.json, or `meta`
    its content (a checkpoint's `vocabulary`); neither: plain GPT-2 BPE. Every conversion between
    text and model token ids goes through here.
    A compact vocabulary (meta.json's compact_vocab, from prepare_tinystories.py --vocab_size):
    compact id c < size is GPT-2 id gpt2_ids[c]; other GPT-2 tokens encode to unknown_token,
    which decodes to UNKNOWN_TEXT."""
    meta = meta or {}
    if meta_path is not None:
        try:
            meta = json.loads(Path(meta_path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UsageError(f"no meta.json at {meta_path}") from None
        except (OSError, ValueError) as e:
            raise UsageError(f"{meta_path} is not readable JSON ({e})") from None
    name = meta.get("tokenizer", "gpt2")
    if name != "gpt2":
        raise UsageError(f"{meta_path}: unsupported tokenizer {name!r} (only 'gpt2')")
    import tiktoken  # noqa: PLC0415 — imported late so --help works without its files

    enc = tiktoken.get_encoding("gpt2")

    def encode(s):
        return enc.encode(s, allowed_special={EOT_TEXT})

    def decode_bytes(ids):
        return enc.decode_bytes([int(i) for i in ids])

    name = "gpt2"
    compact = meta.get("compact_vocab")
    if compact:
        try:
            to_gpt2 = [int(i) for i in compact["gpt2_ids"]]
            unknown = int(compact["unknown_token"])
        except (KeyError, TypeError, ValueError) as e:
            raise UsageError(f"{meta_path}: malformed compact_vocab ({e})") from None
        to_compact = {g: c for c, g in enumerate(to_gpt2)}
        gpt2_encode, gpt2_decode = encode, decode_bytes

        def encode(s):
            return [to_compact.get(g, unknown) for g in gpt2_encode(s)]

        def decode_bytes(ids):
            out = bytearray()
            for i in ids:
                i = int(i)
                out += (gpt2_decode([to_gpt2[i]]) if 0 <= i < len(to_gpt2)
                        else UNKNOWN_TEXT.encode("utf-8"))
            return bytes(out)

        name = f"gpt2, compact vocabulary of {len(to_gpt2)} + unknown"
    eot = int(meta.get("eot_token", enc.eot_token))
    return Tokenizer(encode=encode, decode_bytes=decode_bytes, eot=eot, name=name)


# -----------------------------------------------------------------------------
# Sampling.


def read_prompt(prompt, prompt_file=None):
    """The prompt text: --prompt_file, or --prompt (FILE:path reads a file). Empty is an error."""
    if prompt_file is not None and prompt.startswith("FILE:"):
        raise UsageError("give either --prompt=FILE:... or --prompt_file, not both")
    path = prompt_file if prompt_file is not None else (
        prompt[len("FILE:"):] if prompt.startswith("FILE:") else None)
    if path is not None:
        try:
            prompt = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UsageError(f"no prompt file at {path}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read prompt file {path} ({e})") from None
        if prompt.endswith("\n") and not prompt.endswith("\n\n"):
            prompt = prompt[:-1]  # the newline an editor adds at the end of a file
    if prompt.strip() == "":
        raise UsageError("the prompt is empty" + (f" (file {path})" if path else ""))
    return prompt


def stream_sample(model, prompt_ids, tokenizer, max_new_tokens, temperature=1.0, top_k=None,
                  top_p=None, keep_going=False, write=None, device="cpu", use_cache=True):
    """Generate one sample after `prompt_ids`, writing its text through `write` as the tokens
    come. Stops at the end-of-text token (not written) unless keep_going. Returns the new ids."""
    write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    # BPE tokens can end in the middle of a UTF-8 character: decode bytes incrementally.
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


def pick_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device={name} but this machine has no CUDA device")
    return name


def build_parser():
    p = argparse.ArgumentParser(
        description="Sample text from a prism-nano checkpoint, streamed as it is generated.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    from train import default_checkpoint  # noqa: PLC0415

    p.add_argument("--ckpt", default=default_checkpoint(), help=default_checkpoint_help())
    p.add_argument("--prompt", default="Once upon a time",
                   help="text to continue; FILE:path reads it from a file (one trailing newline "
                        "of a file is dropped)")
    p.add_argument("--prompt_file", default=None,
                   help="read the prompt from this file instead (same as --prompt=FILE:path)")
    p.add_argument("--num_samples", type=int, default=3, help="how many samples to draw")
    p.add_argument("--max_new_tokens", type=int, default=200, help="tokens to generate per sample")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="softmax temperature; 0 picks the most likely token (greedy)")
    p.add_argument("--top_k", type=int, default=200,
                   help="sample among the k most likely tokens only; 0 = no limit")
    p.add_argument("--top_p", type=float, default=1.0,
                   help="nucleus sampling: the smallest set of tokens whose probability reaches p; "
                        "1.0 = off")
    p.add_argument("--seed", type=int, default=1337, help="random seed (same seed, same samples)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... or auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute precision on CUDA (autocast); auto = bfloat16 where supported. "
                        "CPU always runs float32")
    p.add_argument("--no_cache", action="store_true",
                   help="recompute the whole context for every token instead of keeping each "
                        "layer's keys and values (same tokens, slower; for comparison)")
    p.add_argument("--keep_going", action="store_true",
                   help="do not stop a sample at the end-of-text token")
    p.add_argument("--meta", default=None,
                   help="the meta.json of the model's data folder, for a checkpoint that does not "
                        "carry its vocabulary (train.py stores it); none: the checkpoint's, else "
                        "plain GPT-2 BPE")
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


def _default_config_name():
    from train import default_config  # noqa: PLC0415

    return os.path.join("config", os.path.basename(default_config()))


def default_checkpoint_help():
    return ("checkpoint written by train.py; the default is where `python train.py` writes on "
            f"this machine (with {_default_config_name()})")


def require_checkpoint(path):
    """A UsageError unless `path` is a file; for the default path, it says where that comes from."""
    from train import default_checkpoint  # noqa: PLC0415

    if Path(path).is_file():
        return
    if str(path) == default_checkpoint():
        raise UsageError(f"no checkpoint at {path}, where `python train.py` writes on this machine "
                         f"(with {_default_config_name()}): train first, or pass --ckpt=PATH")
    raise UsageError(f"no checkpoint at {path}")


def load_checkpoint_model(path, device):
    """baselines.load_model with its failures turned into one-line errors; the model's parameter
    report goes to stderr, so that stdout holds the samples only."""
    from model import CheckpointError, load_model  # noqa: PLC0415

    require_checkpoint(path)
    try:
        model = load_model(path, device)
    except CheckpointError as e:  # says what the file is, with its path
        raise UsageError(str(e)) from None
    except (FileNotFoundError, ValueError, RuntimeError, KeyError, TypeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"cannot load checkpoint {path}: {msg}") from None
    print(model.describe_parameters(), file=sys.stderr)
    return model


def run(args, out=None):
    out = out or sys.stdout
    check_args(args)
    prompt = read_prompt(args.prompt, args.prompt_file)
    require_checkpoint(args.ckpt)
    device = pick_device(args.device)
    model = load_checkpoint_model(args.ckpt, device)
    tokenizer = load_tokenizer(args.meta, model.vocabulary)  # --meta, or what train.py stored
    prompt_ids = tokenizer.encode(prompt)
    vocab = model.config.vocab_size
    if args.meta is None and not model.vocabulary and vocab != GPT2_VOCAB:
        raise UsageError(f"the model has a vocabulary of {vocab} tokens, not GPT-2's {GPT2_VOCAB}: "
                         "pass the meta.json of its data with --meta")
    bad = [t for t in prompt_ids if t >= vocab]
    if bad:
        raise UsageError(f"the prompt has token {bad[0]} outside the model's vocabulary of {vocab} "
                         "(a different tokenizer? pass its --meta)")
    torch.manual_seed(args.seed)
    if device.startswith("cuda"):
        torch.cuda.manual_seed(args.seed)
        dtype = args.dtype
        if dtype == "auto":
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        ctx = torch.autocast("cuda", dtype=getattr(torch, dtype), enabled=dtype != "float32")
    else:
        ctx = torch.autocast("cpu", enabled=False)

    def write(s):
        out.write(s)
        out.flush()

    with ctx:
        for i in range(args.num_samples):
            write(prompt)
            stream_sample(model, prompt_ids, tokenizer, args.max_new_tokens,
                          temperature=args.temperature, top_k=args.top_k or None,
                          top_p=args.top_p if args.top_p < 1 else None,
                          keep_going=args.keep_going, write=write, device=device,
                          use_cache=not args.no_cache)
            write("\n---------------\n")
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nerror: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
