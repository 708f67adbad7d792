"""
Prepare TinyStories for train.py: download the text (or take local files), encode every story with
GPT-2's BPE (tiktoken) and write train.bin and val.bin (uint16 token ids) and meta.json.

$ python prepare_tinystories.py --sample   # the quickstart's sample (1.3 MB) -> data/sample
$ python prepare_tinystories.py            # all of TinyStoriesV2-GPT4 (2.2 GB) -> data/tinystories
$ python prepare_tinystories.py --train_file=my.txt --val_fraction=0.05 --out_dir=data/mine

README.md's data section describes the files it writes.
"""
import argparse
import codecs
import collections
import contextlib
import http.client
import itertools
import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request

import numpy as np
import tiktoken
from tqdm import tqdm

SEPARATOR = "<|endoftext|>"  # the line between two stories in the text files
BASE_URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main"
FILES = {"train": "TinyStoriesV2-GPT4-train.txt", "val": "TinyStoriesV2-GPT4-valid.txt"}
# --sample: stories of the original validation file as iter_stories reads them (1: a fragment)
SAMPLE_SOURCE = "TinyStories-valid.txt"
SAMPLE_RECORDS = {"train": (2, 1493), "val": (1494, 1658)}
SAMPLE_FILES = {"train": "tinystories-sample-train.txt", "val": "tinystories-sample-val.txt"}
SAMPLE_VOCAB_SIZE = 4096
MIN_VOCAB_SIZE = 256  # the 256 most frequent tokens cover 76% of the sample's text, 128 only 66%
MAX_STORY_CHARS = 1_000_000  # a longer story means a missing separator
BATCH_CHARS = 1 << 18        # characters of stories encoded at a time
RETRIES, RETRY_WAIT, TIMEOUT = 5, 1.0, 60  # downloads: retries, first wait (doubles), seconds idle


class PrepareError(Exception):
    """Bad input, a failed download: main() prints it as one line."""


def get_encoder():
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken downloads its BPE files on first use: any network error
        raise PrepareError(f"could not load tiktoken's gpt2 encoding ({type(e).__name__}); "
                           "offline, set TIKTOKEN_CACHE_DIR to a folder with its files") from None


def check_vocab_size(size, n_vocab):
    if not MIN_VOCAB_SIZE <= size <= n_vocab:
        raise PrepareError(f"--vocab_size must be in [{MIN_VOCAB_SIZE}, {n_vocab}], got {size} "
                           f"(GPT-2 has {n_vocab} tokens; keeping fewer than {MIN_VOCAB_SIZE} "
                           "leaves much of the text to the unknown token)")


def check_file(path):
    if not os.path.isfile(path):
        raise PrepareError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise PrepareError(f"{path}: the file is empty")


def iter_stories(path, on_read=None, read_bytes=1 << 20):
    """The stories of a text file, in order: the text between separators, stripped, empty ones
    dropped. Reads in pieces (bounded memory), calling on_read(n) after each read of n bytes."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    pending, offset, count = "", 0, 0
    with open(path, "rb") as f:
        while True:
            data = f.read(read_bytes)
            held = decoder.getstate()[0]  # the start of a character cut by the last read
            try:
                pending += decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                raise PrepareError(f"{path}: not UTF-8 at byte offset "
                                   f"{offset - len(held) + e.start}: {e.reason}") from None
            *stories, pending = pending.split(SEPARATOR)
            if not data:
                stories.append(pending)
            for story in filter(None, map(str.strip, stories)):
                count += 1
                yield story
            if len(pending) > MAX_STORY_CHARS:
                raise PrepareError(f"{path}: no {SEPARATOR} line in over {MAX_STORY_CHARS:,} "
                                   f"characters (before byte {offset + len(data)})")
            if on_read:
                on_read(len(data))
            if not data:
                break
            offset += len(data)
    if count == 0:
        raise PrepareError(f"{path}: no stories (stories must be separated by {SEPARATOR} lines)")


def batches(tagged_stories, batch_chars=BATCH_CHARS):
    """(split, [stories]) of about batch_chars characters from (split, story) pairs, in order."""
    pending, chars = collections.defaultdict(list), collections.Counter()
    for split, story in tagged_stories:
        pending[split].append(story)
        chars[split] += len(story)
        if chars[split] >= batch_chars:
            yield split, pending.pop(split)
            chars[split] = 0
    yield from pending.items()


def encode_batch(stories, threads=1):
    """(token ids: each story followed by the end-of-text token, UTF-8 bytes of the stories)."""
    enc = get_encoder()
    ids = []
    for story_ids in enc.encode_ordinary_batch(stories, num_threads=threads):  # no special tokens
        ids += story_ids
        ids.append(enc.eot_token)
    return np.array(ids, dtype="<u2"), sum(len(s.encode("utf-8")) for s in stories)


def compact_vocabulary(meta, bins, size, chunk=1 << 24):
    """Rewrite the .bin files in place: the `size` most frequent tokens of train.bin become ids
    0..size-1, most frequent first (ties: lower GPT-2 id; end-of-text always kept), every other
    token the unknown token `size`. Updates meta."""
    n_vocab, eot = meta["vocab_size"], meta["eot_token"]
    train = np.memmap(bins["train"], dtype="<u2", mode="r")
    counts = sum(np.bincount(train[i:i + chunk], minlength=n_vocab)
                 for i in range(0, len(train), chunk))
    keep = np.argsort(-counts, kind="stable")[:size]
    if eot not in keep:
        keep[-1] = eot
    lookup = np.full(n_vocab, size, dtype="<u2")
    lookup[keep] = np.arange(size)
    coverage = {}
    for split, path in bins.items():
        data, unknown = np.memmap(path, dtype="<u2", mode="r+"), 0
        for i in range(0, len(data), chunk):
            data[i:i + chunk] = lookup[data[i:i + chunk]]
            unknown += int(np.count_nonzero(data[i:i + chunk] == size))
        data.flush()
        coverage[f"{split}_coverage"] = round(1 - unknown / len(data), 6)
    meta.update(vocab_size=size + 1, eot_token=int(lookup[eot]))
    meta["compact_vocab"] = {"size": size, "unknown_token": size, "gpt2_ids": keep.tolist(),
                             **coverage}


def tokenize_files(train_file, val_file=None, out_dir="data/tinystories", val_fraction=0.01,
                   vocab_size=None, threads=1, progress=True, route_val=None, extra_meta=None):
    """Encode the stories into out_dir/{train,val}.bin, write out_dir/meta.json, return meta.
    Without val_file, story i of train_file goes to val iff i % k == 0, k = round(1/val_fraction).
    route_val(j) names the split (<name>.bin) of validation story j (0-based) instead of "val";
    extra_meta adds fields to meta.json. Outputs are written under temporary names, renamed at the
    end, meta.json last: a failed or interrupted run leaves none."""
    enc = get_encoder()
    for path in filter(None, (train_file, val_file)):
        check_file(path)
    if vocab_size is not None:
        check_vocab_size(vocab_size, enc.n_vocab)
    k = max(2, round(1 / val_fraction))
    val_index = itertools.count()

    def val_split():
        return route_val(next(val_index)) if route_val else "val"

    def tagged():  # (split, story) in file order, the validation file first
        if val_file is not None:
            yield from ((val_split(), s) for s in iter_stories(val_file, bar.update))
            yield from (("train", s) for s in iter_stories(train_file, bar.update))
        else:
            yield from ((("train" if i % k else val_split()), s)
                        for i, s in enumerate(iter_stories(train_file, bar.update)))

    os.makedirs(out_dir, exist_ok=True)
    stats = collections.defaultdict(collections.Counter)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tmp-") as tmp:
        in_bytes = sum(os.path.getsize(p) for p in {train_file, val_file or train_file})
        bins = {}  # split -> its .bin file, opened with the split's first story
        with contextlib.ExitStack() as files, tqdm(total=in_bytes, unit="B", unit_scale=True,
                                                   desc="tokenizing", disable=not progress) as bar:
            for split, stories in batches(tagged()):
                ids, n_bytes = encode_batch(stories, threads)
                if split not in bins:
                    bins[split] = files.enter_context(open(f"{tmp}/{split}.bin", "wb"))
                bins[split].write(ids.tobytes())
                stats[split].update(tokens=len(ids), stories=len(stories), bytes=n_bytes)
        if "train" not in bins:
            raise PrepareError(f"{train_file}: a single story; splitting off a validation set "
                               "needs 2 (or pass --val_file)")
        meta = {"tokenizer": enc.name, "vocab_size": enc.n_vocab, "eot_token": enc.eot_token,
                **{f"{s}_{key}": n for s in stats for key, n in stats[s].items()},
                "sources": {"train": os.path.abspath(train_file),
                            "val": os.path.abspath(val_file or train_file)},
                "val_split": None if val_file else f"story i of train to val iff i % {k} == 0",
                **(extra_meta or {})}
        if vocab_size is not None and vocab_size < enc.n_vocab:
            compact_vocabulary(meta, {s: f.name for s, f in bins.items()}, vocab_size)
        with open(f"{tmp}/meta.json", "w") as f:
            json.dump(meta, f, indent=2)
        if os.path.exists(f"{out_dir}/meta.json"):  # it would vouch for the new .bin files
            os.remove(f"{out_dir}/meta.json")
        for name in [*(f"{s}.bin" for s in bins), "meta.json"]:  # meta.json last
            os.replace(f"{tmp}/{name}", f"{out_dir}/{name}")
    return meta


def download(url, dest, progress=True):
    """url -> dest through dest.part, renamed once complete; a .part resumes with an HTTP Range
    request. Connection errors, timeouts, 429 and 5xx are retried, other HTTP errors are not."""
    if os.path.exists(dest):
        return dest
    print(f"downloading {url} -> {dest}")
    part = dest + ".part"
    for attempt in range(RETRIES + 1):
        have = os.path.getsize(part) if os.path.exists(part) else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as r:
                have = have if r.status == 206 else 0  # 200: the whole file
                length = r.headers.get("Content-Length")
                total = have + int(length) if length else None
                os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
                with open(part, "ab" if have else "wb") as f, tqdm(
                        total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                        desc=os.path.basename(dest), disable=not progress) as bar:
                    while data := r.read(1 << 20):
                        f.write(data)
                        bar.update(len(data))
                    size = f.tell()
            if total is not None and size < total:
                raise ConnectionError(f"connection closed after {size} of {total} bytes")
            os.replace(part, dest)
            return dest
        except urllib.error.HTTPError as e:
            if e.code == 416:  # the .part is no start of the file: start over
                os.remove(part)
            elif e.code < 500 and e.code != 429:
                raise PrepareError(f"download failed: HTTP {e.code} {e.reason}: {url}") from None
            reason = f"HTTP {e.code} {e.reason}"
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError,
                TimeoutError) as e:
            reason = str(getattr(e, "reason", e)) or type(e).__name__
        if attempt == RETRIES:
            raise PrepareError(f"download failed after {attempt + 1} attempts: {reason}: {url}")
        wait = RETRY_WAIT * 2 ** attempt
        print(f"warning: {reason}: {url}; retry {attempt + 1} of {RETRIES} in {wait:g} s",
              file=sys.stderr)
        time.sleep(wait)


def fetch_sample(raw_dir, base_url=BASE_URL, progress=True):
    """Download SAMPLE_SOURCE into raw_dir and write SAMPLE_RECORDS beside it, each story
    (stripped) followed by a line <|endoftext|>: returns (train file, val file)."""
    source = download(f"{base_url}/{SAMPLE_SOURCE}", os.path.join(raw_dir, SAMPLE_SOURCE), progress)
    last = max(b for _, b in SAMPLE_RECORDS.values())
    texts, n = collections.defaultdict(str), 0
    for n, story in enumerate(iter_stories(source), 1):
        for split, (a, b) in SAMPLE_RECORDS.items():
            if a <= n <= b:
                texts[split] += f"{story}\n{SEPARATOR}\n"
        if n == last:
            break
    if n < last:
        raise PrepareError(f"{source}: {n:,} records, the sample needs {last:,}")
    paths = {split: os.path.join(raw_dir, name) for split, name in SAMPLE_FILES.items()}
    for split, path in paths.items():
        with open(f"{path}.tmp", "wb") as f:
            f.write(texts[split].encode("utf-8"))
        os.replace(f"{path}.tmp", path)
    return paths["train"], paths["val"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sample", action="store_true",
                   help=f"the quickstart's sample: download {SAMPLE_SOURCE} (19 MB), take its "
                        f"stories 2-1,493 as train, 1,494-1,658 as val; default --out_dir "
                        f"data/sample, --vocab_size {SAMPLE_VOCAB_SIZE}")
    p.add_argument("--out_dir", help="train.bin, val.bin, meta.json go there "
                                     "(default: data/tinystories, with --sample data/sample)")
    p.add_argument("--raw_dir", help="where downloads go (default: OUT_DIR/raw)")
    p.add_argument("--base_url", default=BASE_URL,
                   help="download from BASE_URL/<file name>, e.g. a mirror (default: %(default)s)")
    p.add_argument("--train_file", help="local training text instead of the download: stories "
                                        "separated by <|endoftext|> lines")
    p.add_argument("--val_file", help="local validation text instead of the download")
    p.add_argument("--val_fraction", type=float, default=0.01,
                   help="with --train_file alone: story i goes to val iff i %% k == 0, "
                        "k = round(1 / VAL_FRACTION) (default: %(default)s)")
    p.add_argument("--vocab_size", type=int,
                   help="K: the K most frequent training tokens keep ids 0..K-1, every other one "
                        f"becomes the unknown token K; {MIN_VOCAB_SIZE} to 50257 (GPT-2's "
                        "whole vocabulary, the default without --sample)")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="threads that encode (default: %(default)s)")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.sample and (args.train_file or args.val_file):
        p.error("--sample makes its own text: drop --train_file and --val_file")
    if not 0 < args.val_fraction <= 0.5:
        p.error("--val_fraction must be in (0, 0.5]")
    if args.threads < 1:
        p.error("--threads must be at least 1")
    args.out_dir = args.out_dir or ("data/sample" if args.sample else "data/tinystories")
    args.raw_dir = args.raw_dir or os.path.join(args.out_dir, "raw")
    if args.sample and args.vocab_size is None:
        args.vocab_size = SAMPLE_VOCAB_SIZE
    return args


def main(argv=None):
    args = parse_args(argv)
    progress, base = not args.no_progress, args.base_url.rstrip("/")
    try:
        if args.vocab_size is not None:  # checked, as the files are, before any download
            check_vocab_size(args.vocab_size, get_encoder().n_vocab)
        for path in filter(None, (args.train_file, args.val_file)):
            check_file(path)
        if args.sample:
            train_file, val_file = fetch_sample(args.raw_dir, base, progress)
        else:
            get = lambda split: download(f"{base}/{FILES[split]}",  # noqa: E731
                                         os.path.join(args.raw_dir, FILES[split]), progress)
            val_file = args.val_file or (None if args.train_file else get("val"))
            train_file = args.train_file or get("train")
        t0 = time.time()
        meta = tokenize_files(train_file, val_file, args.out_dir, args.val_fraction,
                              args.vocab_size, args.threads, progress)
    except (PrepareError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: no output written (a partial download is kept as .part and resumes)",
              file=sys.stderr)
        sys.exit(130)
    coverage = meta.get("compact_vocab", {}).get("train_coverage", 1)
    print(f"{time.time() - t0:.1f} s, {args.threads} threads -> {args.out_dir}: train.bin "
          f"{meta['train_tokens']:,} tokens, val.bin {meta['val_tokens']:,}; vocab_size "
          f"{meta['vocab_size']:,}, covering {coverage:.2%} of train's tokens")


if __name__ == "__main__":
    main()
