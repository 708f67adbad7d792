"""
Prepare the TinyStories dataset for training: download the text (or take local files),
tokenize every story with the GPT-2 BPE (tiktoken), and write the token files train.py reads.

Run it once. With no arguments it downloads TinyStoriesV2-GPT4-{train,valid}.txt (~2.2 GB)
from the Hugging Face dataset roneneldan/TinyStories into data/tinystories/raw/, then writes

    data/tinystories/train.bin   all training tokens, raw uint16 (little-endian), no header
    data/tinystories/val.bin     same for validation
    data/tinystories/meta.json   tokenizer, vocab_size, eot_token, token / story / byte counts,
                                 and the source files with their sha256

Read the token files with np.memmap(path, dtype=np.uint16, mode="r").

Stories in the text files are separated by <|endoftext|> lines. Each story is split off at the
separator, stripped of surrounding whitespace, dropped if empty, encoded with tiktoken "gpt2"
(encode_ordinary: the text is never parsed for special tokens), and followed by the end-of-text
token 50256. So a .bin file decodes to: story_1 <|endoftext|> story_2 <|endoftext|> ...

train_bytes / val_bytes in meta.json count the UTF-8 bytes of the stripped story text only:
len(story.strip().encode("utf-8")) summed over stories, without the separators or the whitespace
around them. Divide a split's summed loss in bits by that number to get bits per byte.

Downloads: a tqdm bar in bytes; the data goes to <name>.part, renamed to <name> once complete
(a complete file is never fetched again). A dropped connection, timeout or 5xx/429 is retried
(--retries times, waiting --retry_wait seconds, doubling each time), resuming the .part file with
an HTTP Range request; an interrupted run resumes the same way. A 404 (or other 4xx) fails at once.
--base_url points at a mirror: files are fetched from {base_url}/{file name}, so any folder holding
files of those names served by `python -m http.server --bind 127.0.0.1` works.

--report_fraction=F (default 0: none) moves the share F of the validation stories to a third
file, test.bin: validation story j (0-based, file order, after any split off the train file) goes
there iff floor((j + 1)·F) > floor(j·F), so whole stories, spread evenly (F = 0.5: every second
one). val.bin is then the selection split (learning rates, early stopping) and test.bin the
report split, scored once at the end; meta.json gains test_tokens / test_stories / test_bytes and
report_split (the rule).

--sample makes the small sample of the CPU quickstart and the lab instead (19 MB to download, not
2.2 GB): it downloads the original validation file TinyStories-valid.txt (v1) into the raw folder
and cuts it into tinystories-sample-train.txt (its records 2-1,493) and tinystories-sample-val.txt
(records 1,494-1,658; record 1 of the file is a fragment of a story) beside it, each story
stripped of the whitespace and blank lines around it and followed by a line <|endoftext|>; those
two files are then tokenized as local files are. A record is a story as the tokenizer reads it
(see cut_records). The default output folder is then data/sample.

Local text instead of a download: --train_file and/or --val_file (each replaces its download).
With only --train_file, every k-th story (k = round(1 / --val_fraction)) goes to val: story i
(0-based, file order) is a validation story iff i % k == 0, so val always has at least one story.

Everything streams: the text is read in 1 MiB pieces (hashed on the way), encoded in batches of
~256K characters over --workers processes with a bounded number of batches in flight, and the
tokens are appended to the output as they come. Memory stays in the tens of MB whatever the input
size (one story must fit in memory: a "story" over 1M characters is an error). Outputs are written
under temporary names in the output folder and renamed at the end, meta.json last, so a failed or
interrupted run (Ctrl-C: exit code 130) leaves no partial train.bin / val.bin / meta.json, and no
folder it created (unless a partial download is in it, to resume); a folder that was there stays.
Errors print one line starting with "error: " to stderr and exit with status 1.

At the end it prints the tokenization throughput (MB of input text per second).

Examples:
$ python prepare_tinystories.py                                   # download V2 (GPT-4), tokenize
$ python prepare_tinystories.py --version=v1                      # the original TinyStories files
$ python prepare_tinystories.py --train_file=my.txt --val_fraction=0.05 --out_dir=data/mine
$ python prepare_tinystories.py --base_url=http://127.0.0.1:8000  # a local mirror
$ python prepare_tinystories.py --sample --vocab_size=4096 --report_fraction=0.5  # -> data/sample

--vocab_size=K (small experiments): after tokenizing, the K most frequent tokens of train.bin keep
ids 0..K-1 (most frequent first) and every other token becomes the unknown token K; meta.json then
says vocab_size = K + 1, eot_token in the new ids, and compact_vocab (the GPT-2 id of each new id,
the unknown-token counts and coverage). Token counts do not change, so bits per byte compare across
vocabularies (the merged unknown tokens make it slightly optimistic; coverage says by how much).
"""
import argparse
import codecs
import collections
import functools
import hashlib
import http.client
import json
import math
import multiprocessing
import os
import signal
import ssl
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import tiktoken
from tqdm import tqdm

# -----------------------------------------------------------------------------
# tokenizer: the one place that says which one (a later --vocab_size remaps these ids)
TOKENIZER = "gpt2"
SEPARATOR = "<|endoftext|>"          # story separator in the raw text files

DEFAULT_BASE_URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main"
FILES = {  # --version -> (train file, validation file) in the Hugging Face dataset
    "v2": ("TinyStoriesV2-GPT4-train.txt", "TinyStoriesV2-GPT4-valid.txt"),
    "v1": ("TinyStories-train.txt", "TinyStories-valid.txt"),
}

READ_BYTES = 1 << 20                 # bytes read from a text file at a time
BATCH_CHARS = 1 << 18                # characters of stories per encode task
MAX_STORY_CHARS = 1_000_000          # a longer "story" means a missing separator: refuse it
# The smallest --vocab_size: the K kept tokens must hold the end-of-text token and enough text
# that the unknown token stays a minority. On the TinyStories sample the 256 most frequent tokens
# cover 76% of the training tokens, 128 only 66%, 16 only 35%: below 256 a model learns mostly to
# predict "unknown", and its loss says little about the stories. (256 is also the size of the byte
# alphabet GPT-2's BPE is built on.)
MIN_VOCAB_SIZE = 256
DOWNLOAD_CHUNK = 1 << 20             # bytes per read from the HTTP response
TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}  # also any other 5xx


class PrepareError(Exception):
    """A problem with the input, the network or the output: main() prints it as one line."""


@functools.lru_cache(maxsize=None)
def get_encoder(name=TOKENIZER):
    """The tiktoken encoding (cached per process)."""
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # its BPE files are fetched on first use: network errors of all kinds
        raise PrepareError(f"could not load the tiktoken {name!r} encoding "
                           f"({type(e).__name__}: {e}); "
                           "tiktoken downloads its BPE files on first use: without internet, set "
                           "TIKTOKEN_CACHE_DIR to a folder holding them") from None


def tokenizer_info(enc=None):
    """The tokenizer fields of meta.json: tokenizer, vocab_size, eot_token, dtype."""
    enc = enc or get_encoder()
    return {"tokenizer": enc.name, "vocab_size": enc.n_vocab, "eot_token": enc.eot_token,
            "dtype": token_dtype(enc.n_vocab).name}


def token_dtype(vocab_size):
    """Smallest dtype that holds ids < vocab_size (uint16 for GPT-2's 50257), little-endian."""
    if vocab_size <= 1 << 16:
        return np.dtype("<u2")
    raise ValueError(f"vocab_size {vocab_size} does not fit in uint16")


# -----------------------------------------------------------------------------
# reading stories


def check_text_file(path, what):
    """Fail early with a clear message on a missing, unreadable or empty input file."""
    if not os.path.exists(path):
        raise PrepareError(f"{what} {path}: no such file")
    if not os.path.isfile(path):
        raise PrepareError(f"{what} {path}: not a regular file")
    if os.path.getsize(path) == 0:
        raise PrepareError(f"{what} {path}: file is empty")
    if not os.access(path, os.R_OK):
        raise PrepareError(f"{what} {path}: permission denied")


def iter_stories(path, hasher=None, on_bytes=None, read_bytes=READ_BYTES):
    """Yield the stripped, non-empty stories of a text file, reading it incrementally.

    hasher (e.g. hashlib.sha256()) is fed every byte of the file; on_bytes(n) is called after each
    read (progress). Raises PrepareError on text that is not UTF-8 (with byte offset and line),
    on an over-long story, and on a file that holds no story at all.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, newlines, pending, count = 0, 0, "", 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(read_bytes)
            final = not chunk
            if hasher is not None:
                hasher.update(chunk)
            buffered = decoder.getstate()[0]  # undecoded tail of the previous chunk (no newlines)
            try:
                text = decoder.decode(chunk, final=final)
            except UnicodeDecodeError as e:
                where = offset - len(buffered) + e.start
                line = 1 + newlines + (buffered + chunk)[:e.start].count(b"\n")
                raise PrepareError(f"{path}: not valid UTF-8 at byte offset {where} (line {line}): "
                                   f"{e.reason}") from None
            pending += text
            parts = pending.split(SEPARATOR)
            pending = parts.pop()  # may be an unfinished story (or half a separator): keep it
            for part in parts:
                story = part.strip()
                if story:
                    count += 1
                    yield story
            if len(pending) > MAX_STORY_CHARS:
                raise PrepareError(f"{path}: no {SEPARATOR} separator in over {MAX_STORY_CHARS:,} "
                                   f"characters (before byte offset {offset + len(chunk)}); "
                                   f"expected stories separated by {SEPARATOR} lines")
            if on_bytes is not None and chunk:
                on_bytes(len(chunk))
            if final:
                break
            offset += len(chunk)
            newlines += chunk.count(b"\n")
    story = pending.strip()
    if story:
        count += 1
        yield story
    if count == 0:
        raise PrepareError(f"{path}: no stories found (expected text with stories separated by "
                           f"{SEPARATOR} lines)")


def iter_batches(tagged_stories, batch_chars=BATCH_CHARS):
    """Group (split, story) pairs into (split, [stories]) batches of about batch_chars characters,
    keeping the order of stories within each split."""
    pending = {}
    for split, story in tagged_stories:
        batch, n = pending.get(split, ([], 0))
        batch.append(story)
        n += len(story)
        if n >= batch_chars:
            yield split, batch
            batch, n = [], 0
        pending[split] = (batch, n)
    for split, (batch, _) in pending.items():
        if batch:
            yield split, batch


# -----------------------------------------------------------------------------
# encoding


def encode_batch(stories):
    """Encode a list of stories: (uint16 token array with eot after each story, n_stories, n_bytes).

    n_bytes is the UTF-8 size of the stories as given (already stripped)."""
    enc = get_encoder()
    eot = enc.eot_token
    ids = []
    n_bytes = 0
    for story in stories:
        ids.extend(enc.encode_ordinary(story))
        ids.append(eot)
        n_bytes += len(story.encode("utf-8"))
    return np.array(ids, dtype=token_dtype(enc.n_vocab)), len(stories), n_bytes


def _worker_init():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    get_encoder()


def encode_batches(batches, workers=1, pool=None):
    """Yield (split, encode_batch(batch)) for (split, batch) pairs, in order.

    workers == 1 encodes in this process; otherwise a multiprocessing pool (given, or made here)
    works on at most 2 * workers batches at a time, so memory stays bounded (Pool.imap would
    read the whole input ahead)."""
    if workers <= 1 and pool is None:
        for split, batch in batches:
            yield split, encode_batch(batch)
        return
    own = pool is None
    if own:
        pool = multiprocessing.Pool(workers, initializer=_worker_init)
    try:
        inflight = collections.deque()
        for split, batch in batches:
            inflight.append((split, pool.apply_async(encode_batch, (batch,))))
            if len(inflight) >= 2 * workers:
                s, r = inflight.popleft()
                yield s, r.get()
        while inflight:
            s, r = inflight.popleft()
            yield s, r.get()
    finally:
        if own:
            pool.terminate()
            pool.join()


# -----------------------------------------------------------------------------
# writing


def _tmp_name(path):
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")


# -----------------------------------------------------------------------------
# compact vocabulary: the K most frequent training tokens, plus one unknown token


def count_tokens(path, n_vocab, chunk=1 << 24):
    """Occurrences of each token id in a .bin file, read in chunks (bounded memory)."""
    data = np.memmap(path, dtype=token_dtype(n_vocab), mode="r")
    counts = np.zeros(n_vocab, dtype=np.int64)
    for i in range(0, len(data), chunk):
        counts += np.bincount(data[i:i + chunk], minlength=n_vocab)
    return counts


def compact_vocabulary(counts, size, eot):
    """The GPT-2 ids of the `size` most frequent tokens, most frequent first (ties: lower id);
    the end-of-text token is always kept, since it delimits stories."""
    keep = np.argsort(-counts, kind="stable")[:size]
    if eot not in keep:
        keep[-1] = eot
    return keep


def remap_file(path, lookup, unknown_id, chunk=1 << 24):
    """Rewrite a .bin file in place through lookup[GPT-2 id] -> compact id, in chunks; returns
    how many tokens became the unknown token."""
    data = np.memmap(path, dtype=lookup.dtype, mode="r+")
    unknown = 0
    for i in range(0, len(data), chunk):
        mapped = lookup[data[i:i + chunk]]
        data[i:i + chunk] = mapped
        unknown += int(np.count_nonzero(mapped == unknown_id))
    data.flush()
    del data
    return unknown


def check_vocab_size(size, n_vocab):
    """A compact vocabulary keeps at least MIN_VOCAB_SIZE tokens and fewer than n_vocab."""
    if size < MIN_VOCAB_SIZE:
        raise PrepareError(f"--vocab_size must be at least {MIN_VOCAB_SIZE}, got {size}: the kept "
                           "tokens must hold the end-of-text token and enough text that the "
                           "unknown token stays a minority (on the TinyStories sample the 256 most "
                           "frequent tokens cover 76% of the text's tokens)")
    if size >= n_vocab:
        raise PrepareError(f"--vocab_size must be in [{MIN_VOCAB_SIZE}, {n_vocab - 1}], got "
                           f"{size}: the {TOKENIZER} tokenizer has {n_vocab} tokens (omit "
                           "--vocab_size to keep them all)")


def apply_compact_vocabulary(meta, bins, size):
    """Remap the written .bin files (GPT-2 ids) to the `size` most frequent training tokens plus
    an unknown token (id `size`), and update meta in place: vocab_size = size + 1, eot_token in
    compact ids, and `compact_vocab` with the mapping and the unknown-token counts. The token
    count per split does not change (one compact token per GPT-2 token), so bits per byte stay
    comparable; only the unknown tokens, merged into one, are easier to predict than they were."""
    n_vocab, eot = meta["vocab_size"], meta["eot_token"]
    check_vocab_size(size, n_vocab)
    keep = compact_vocabulary(count_tokens(bins["train"], n_vocab), size, eot)
    lookup = np.full(n_vocab, size, dtype=token_dtype(n_vocab))
    lookup[keep] = np.arange(size)
    unknown = {split: remap_file(path, lookup, size) for split, path in bins.items()}
    meta.update(vocab_size=size + 1, eot_token=int(lookup[eot]), dtype=token_dtype(size + 1).name)
    meta["compact_vocab"] = {
        "size": size, "unknown_token": size, "gpt2_ids": keep.tolist(),
        "note": "compact id c < size is GPT-2 id gpt2_ids[c]; every other GPT-2 token became "
                "unknown_token; chosen by frequency in train.bin",
        **{f"{split}_unknown": n for split, n in unknown.items()},
        **{f"{split}_coverage": round(1 - n / max(meta[f"{split}_tokens"], 1), 6)
           for split, n in unknown.items()},
    }


def is_report_story(j, report_fraction):
    """Whether validation story j (0-based, file order) goes to the report split: the j for which
    floor((j + 1)·f) steps up, so every prefix of the stories holds floor(n·f) report stories,
    spread evenly (f = 0.5: every second story, starting with the second)."""
    return math.floor((j + 1) * report_fraction) > math.floor(j * report_fraction)


def tokenize_files(train_file, val_file=None, out_dir="data/tinystories", val_fraction=0.01,
                   workers=1, batch_chars=BATCH_CHARS, progress=True, sources_extra=None,
                   vocab_size=None, report_fraction=0.0):
    """Tokenize the text files into out_dir/{train,val}.bin and write out_dir/meta.json.

    vocab_size K (optional) keeps the K most frequent training tokens and maps the rest to one
    unknown token (apply_compact_vocabulary). With val_file None, whole stories are split off
    train_file (story i goes to val iff i % k == 0, k = round(1 / val_fraction)). report_fraction
    f > 0 moves that share of the validation stories, whole and by is_report_story, to test.bin:
    val.bin is then the selection split (learning rates, early stopping), test.bin the report
    split (the numbers one reports). Returns the meta
    dict written to meta.json, plus input_bytes (text bytes read, for throughput; not in the file). Raises PrepareError on bad
    input; on any failure (KeyboardInterrupt included) no temporary file is left and the outputs
    of an earlier run are untouched."""
    check_text_file(train_file, "train file")
    if val_file is not None:
        check_text_file(val_file, "val file")
    elif not 0 < val_fraction <= 0.5:
        raise PrepareError(f"--val_fraction must be in (0, 0.5], got {val_fraction}")
    if not 0 <= report_fraction < 1:
        raise PrepareError(f"--report_fraction must be in [0, 1), got {report_fraction}")
    splits = ("train", "val", "test") if report_fraction else ("train", "val")
    info = tokenizer_info()
    os.makedirs(out_dir, exist_ok=True)
    final = {name: os.path.join(out_dir, name)
             for name in (*(f"{s}.bin" for s in splits), "meta.json")}
    tmp = {name: _tmp_name(path) for name, path in final.items()}
    hashers = {"train": hashlib.sha256(), "val": hashlib.sha256()}
    stats = {s: {"tokens": 0, "stories": 0, "bytes": 0} for s in splits}
    in_files = [train_file] if val_file is None else [val_file, train_file]
    in_bytes = sum(os.path.getsize(p) for p in in_files)
    k = None

    def tagged():
        j = 0
        for split, story in tagged_train_val():
            if split == "val" and report_fraction:
                split = "test" if is_report_story(j, report_fraction) else "val"
                j += 1
            yield split, story

    def tagged_train_val():  # (split, story) in file order; val first when it is its own file
        nonlocal k
        if val_file is not None:
            yield from (("val", s) for s in iter_stories(val_file, hashers["val"], bar.update))
            yield from (("train", s)
                        for s in iter_stories(train_file, hashers["train"], bar.update))
        else:
            k = max(2, round(1 / val_fraction))
            for i, s in enumerate(iter_stories(train_file, hashers["train"], bar.update)):
                yield ("val" if i % k == 0 else "train"), s

    outs = {}
    pool = None
    try:
        if workers > 1:  # before any progress bar starts its monitor thread
            pool = multiprocessing.Pool(workers, initializer=_worker_init)
        outs = {s: open(tmp[f"{s}.bin"], "wb") for s in splits}
        with tqdm(total=in_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                  desc="tokenizing", disable=not progress) as bar:
            for split, (ids, n_stories, n_bytes) in encode_batches(
                    iter_batches(tagged(), batch_chars), workers, pool):
                outs[split].write(ids.data)
                stats[split]["tokens"] += len(ids)
                stats[split]["stories"] += n_stories
                stats[split]["bytes"] += n_bytes
        for f in outs.values():
            f.close()
        if val_file is None and stats["train"]["stories"] == 0:
            raise PrepareError(f"{train_file}: only {stats['val']['stories']} story, need at "
                               "least 2 to split off a validation set (or pass --val_file)")
        if report_fraction and not (stats["val"]["stories"] and stats["test"]["stories"]):
            raise PrepareError(f"{stats['val']['stories'] + stats['test']['stories']} validation "
                               f"stories cannot be split {1 - report_fraction:g} : "
                               f"{report_fraction:g} into a selection and a report split "
                               "with a story in each")

        def source(path, split):
            src = {"path": os.path.abspath(path), "bytes": os.path.getsize(path),
                   "sha256": hashers[split].hexdigest()}
            src.update((sources_extra or {}).get(split, {}))
            return src

        meta = dict(info)
        for split in splits:
            for key in ("tokens", "stories", "bytes"):
                meta[f"{split}_{key}"] = stats[split][key]
        meta["bytes_definition"] = ("train_bytes/val_bytes/test_bytes: UTF-8 bytes of each story after "
                                    "str.strip(), summed; separators and surrounding whitespace "
                                    "excluded")
        meta["format"] = (f"{'/'.join(f'{s}.bin' for s in splits)}: raw little-endian {info['dtype']} token ids, "
                          f"no header; each story encoded with tiktoken {info['tokenizer']!r} "
                          f"encode_ordinary and followed by eot_token")
        meta["sources"] = {"train": source(train_file, "train"),
                           "val": source(val_file if val_file is not None else train_file,
                                         "val" if val_file is not None else "train")}
        if report_fraction:
            meta["sources"]["test"] = meta["sources"]["val"]
            meta["report_split"] = {
                "report_fraction": report_fraction,
                "rule": "validation story j (0-based, file order) goes to test.bin iff "
                        "floor((j + 1) * report_fraction) > floor(j * report_fraction); the rest "
                        "stay in val.bin",
                "use": "val.bin = selection split (learning rates, early stopping); "
                       "test.bin = report split (the numbers reported)"}
        meta["split"] = None if val_file is not None else {
            "from": "train", "val_fraction": val_fraction, "k": k,
            "rule": "story i (0-based, file order) goes to val iff i % k == 0"}
        if vocab_size:
            apply_compact_vocabulary(meta, {s: tmp[f"{s}.bin"] for s in splits}, vocab_size)
        with open(tmp["meta.json"], "w") as f:
            json.dump(meta, f, indent=2)
            f.write("\n")
        # commit: drop a stale meta.json first; meta.json, renamed last, vouches for the .bins
        if os.path.exists(final["meta.json"]):
            os.remove(final["meta.json"])
        stale_test = os.path.join(out_dir, "test.bin")
        if "test.bin" not in final and os.path.exists(stale_test):  # from an earlier split
            os.remove(stale_test)
        for name in final:  # meta.json is the last key
            os.replace(tmp[name], final[name])
        meta["input_bytes"] = in_bytes
        return meta
    finally:
        for f in outs.values():
            f.close()
        if pool is not None:
            pool.terminate()
            pool.join()
        for path in tmp.values():
            if os.path.exists(path):
                os.remove(path)


# -----------------------------------------------------------------------------
# downloading


class _Transient(Exception):
    """A download attempt failed in a way worth retrying."""


def _describe(e):
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return f"{e.reason}"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _content_range(value):
    """'bytes 100-199/1000' -> (100, 1000); 'bytes */1000' -> (None, 1000); total may be None."""
    try:
        unit, spec = value.strip().split(" ", 1)
        rng, total = spec.split("/")
        start = None if rng == "*" else int(rng.split("-")[0])
        return start, (None if total == "*" else int(total))
    except (AttributeError, ValueError):
        return None, None


def _download_attempt(url, part, timeout, progress):
    """One GET of url into part (resuming it if it exists). Returns when part is complete."""
    offset = os.path.getsize(part) if os.path.exists(part) else 0
    req = urllib.request.Request(url, headers={"User-Agent": "prism-nano prepare_tinystories.py"})
    if offset:
        req.add_header("Range", f"bytes={offset}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # nothing left to send: is the .part already complete?
            _, total = _content_range(e.headers.get("Content-Range"))
            e.close()
            if total == offset:
                return
            os.remove(part)
            raise _Transient(f"server refused the range {offset}- (file size {total}); "
                             "starting over") from None
        if e.code in TRANSIENT_HTTP or e.code >= 500:
            raise _Transient(_describe(e)) from None
        raise PrepareError(f"download failed: {_describe(e)}: {url}") from None
    except ValueError as e:  # malformed URL
        raise PrepareError(f"download failed: bad URL {url}: {e}") from None
    with resp:
        if resp.status == 206:
            start, total = _content_range(resp.headers.get("Content-Range"))
            if start != offset:
                os.remove(part)
                raise _Transient(f"server resumed at byte {start}, not {offset}; starting over")
            mode = "ab"
        elif resp.status == 200:  # a fresh download, or the server ignored the Range header
            offset, mode = 0, "wb"
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        else:
            raise _Transient(f"unexpected HTTP {resp.status} {resp.reason}")
        got = 0
        with open(part, mode) as f, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                         unit_divisor=1024, desc=os.path.basename(part)[:-5],
                                         disable=not progress) as bar:
            while True:
                chunk = resp.read(DOWNLOAD_CHUNK)
                if not chunk:
                    break
                f.write(chunk)
                got += len(chunk)
                bar.update(len(chunk))
    size = offset + got
    if total is not None and size < total:
        raise _Transient(f"connection closed after {size} of {total} bytes")
    if total is not None and size > total:
        os.remove(part)
        raise _Transient(f"got {size} bytes, more than the {total} announced; starting over")


def download(url, dest, retries=5, retry_wait=1.0, timeout=60.0, progress=True):
    """Download url to dest (via dest + ".part"), resuming and retrying transient failures.

    A dest that exists is taken as complete (it only appears by renaming a finished .part).
    Waits retry_wait * 2**i seconds before retry i+1; an attempt that extends the .part beyond
    anything seen before resets the count. Raises PrepareError with the reason and the URL."""
    if os.path.isfile(dest):
        return dest
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    part = dest + ".part"
    failures, best = 0, 0
    while True:
        try:
            _download_attempt(url, part, timeout, progress)
            break
        except (_Transient, urllib.error.URLError, http.client.HTTPException, ConnectionError,
                TimeoutError, ssl.SSLError) as e:
            reason = str(e) if isinstance(e, _Transient) else _describe(e)
            if isinstance(getattr(e, "reason", e), ssl.SSLCertVerificationError):
                raise PrepareError(f"download failed: {reason}: {url}") from None  # won't heal
            size = os.path.getsize(part) if os.path.exists(part) else 0
            if size > best:  # progress: this was a dropped connection, not a dead server
                failures, best = 0, size
            failures += 1
            if failures > retries:
                raise PrepareError(f"download failed after {failures} attempts: {reason}: {url}") \
                    from None
            wait = retry_wait * 2 ** (failures - 1)
            print(f"warning: {reason}: {url}; retry {failures}/{retries} in {wait:g}s",
                  file=sys.stderr)
            time.sleep(wait)
    os.replace(part, dest)
    return dest


def fetch(version="v2", raw_dir="data/tinystories/raw", base_url=DEFAULT_BASE_URL,
          which=("train", "val"), retries=5, retry_wait=1.0, timeout=60.0, progress=True):
    """Download the dataset's files (those named in which) into raw_dir: {split: (path, url)}."""
    names = dict(zip(("train", "val"), FILES[version]))
    out = {}
    for split in sorted(which, key=lambda s: s != "val"):  # val first: small, fails fast
        url = f"{base_url.rstrip('/')}/{names[split]}"
        dest = os.path.join(raw_dir, names[split])
        if os.path.isfile(dest):
            print(f"{dest} exists, not downloading it again")
        else:
            print(f"downloading {url} -> {dest}")
            download(url, dest, retries, retry_wait, timeout, progress)
        out[split] = (dest, url)
    return out


# -----------------------------------------------------------------------------
# the CPU study's sample: the start of the original validation file (v1, ~19 MB)

SAMPLE_SOURCE = FILES["v1"][1]       # TinyStories-valid.txt; its record 1 is a fragment
SAMPLE_RECORDS = {"train": (2, 1493), "val": (1494, 1658)}  # 1-based, inclusive
SAMPLE_FILES = {"train": "tinystories-sample-train.txt", "val": "tinystories-sample-val.txt"}


def cut_records(source, dests, records=SAMPLE_RECORDS):
    """Write records first..last (1-based, inclusive) of source to dests[split] for each
    (first, last) = records[split], each story followed by a line <|endoftext|>; returns
    {split: number of stories}.

    A record is a story as iter_stories reads it: the text between <|endoftext|> separators,
    stripped of surrounding whitespace (blank lines included; \n or \r\n); a piece holding only
    whitespace is no record. Inside a story nothing changes (inner blank lines, trailing spaces).
    Reading stops after the last record wanted. Each file is written under a temporary name and
    renamed once complete."""
    last = max(b for _, b in records.values())
    tmp = {split: _tmp_name(path) for split, path in dests.items()}
    counts = {split: 0 for split in records}
    n = 0
    try:
        outs = {split: open(path, "wb") for split, path in tmp.items()}
        try:
            for n, story in enumerate(iter_stories(source), 1):
                for split, (a, b) in records.items():
                    if a <= n <= b:
                        outs[split].write(f"{story}\n{SEPARATOR}\n".encode("utf-8"))
                        counts[split] += 1
                if n == last:
                    break
        finally:
            for f in outs.values():
                f.close()
        if n < last:
            raise PrepareError(f"{source}: only {n:,} records, the sample needs records up to "
                               f"{last:,} (is it the original {SAMPLE_SOURCE}?)")
        for split in dests:
            os.replace(tmp[split], dests[split])
    finally:
        for path in tmp.values():
            if os.path.exists(path):
                os.remove(path)
    return counts


def fetch_sample(raw_dir, base_url=DEFAULT_BASE_URL, retries=5, retry_wait=1.0, timeout=60.0,
                 progress=True):
    """Download TinyStories-valid.txt into raw_dir and cut the sample's train and val text out of
    it (cut_records, SAMPLE_RECORDS) into raw_dir: {split: (path, sources_extra for meta.json)}."""
    records = SAMPLE_RECORDS
    source, url = fetch("v1", raw_dir, base_url, ["val"], retries, retry_wait, timeout,
                        progress)["val"]
    dests = {split: os.path.join(raw_dir, SAMPLE_FILES[split]) for split in records}
    counts = cut_records(source, dests, records)
    out = {}
    for split, (a, b) in records.items():
        print(f"sample {split}: records {a:,}-{b:,} of {SAMPLE_SOURCE} -> {dests[split]} "
              f"({counts[split]:,} stories)")
        out[split] = (dests[split], {"url": url, "dataset": "roneneldan/TinyStories v1",
                                     "records": f"{a}-{b} of {SAMPLE_SOURCE}"})
    return out


# -----------------------------------------------------------------------------


def default_workers():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def parse_args(argv=None):
    sample_train, sample_val = (f"{a:,}-{b:,}" for a, b in SAMPLE_RECORDS.values())
    p = argparse.ArgumentParser(
        description="Download TinyStories (or take local text files), tokenize it with GPT-2 BPE "
                    "and write train.bin / val.bin (uint16 token ids) and meta.json.",
        epilog="Example: python prepare_tinystories.py --workers=4 (see the module docstring).")
    p.add_argument("--out_dir", default=None,
                   help="where train.bin, val.bin and meta.json go (default: data/tinystories, "
                        "with --sample data/sample)")
    p.add_argument("--raw_dir", default=None,
                   help="where downloaded text files go (default: OUT_DIR/raw)")
    p.add_argument("--version", choices=sorted(FILES), default=None,
                   help="dataset files to download: v2 = TinyStoriesV2-GPT4-{train,valid}.txt, "
                        "v1 = TinyStories-{train,valid}.txt (default: v2)")
    p.add_argument("--sample", action="store_true",
                   help="the small sample of the CPU quickstart and the lab instead of the full "
                        f"data: download {SAMPLE_SOURCE} (v1, ~19 MB), take its records "
                        f"{sample_train} as train and {sample_val} as val (text files "
                        "in RAW_DIR), tokenize those")
    p.add_argument("--base_url", default=DEFAULT_BASE_URL,
                   help="files are fetched from BASE_URL/<file name>; point it at a mirror "
                        "(default: %(default)s)")
    p.add_argument("--train_file", default=None,
                   help="local training text instead of downloading it (stories separated by "
                        "<|endoftext|> lines)")
    p.add_argument("--val_file", default=None,
                   help="local validation text instead of downloading it; without it and with "
                        "--train_file, validation stories are split off the train file")
    p.add_argument("--val_fraction", type=float, default=0.01,
                   help="with --train_file only: every k-th story, k = round(1/VAL_FRACTION), "
                        "starting with the first, goes to val (default: %(default)s)")
    p.add_argument("--report_fraction", type=float, default=0.0,
                   help="move this share of the validation stories (whole stories, spread "
                        "evenly, deterministic) to test.bin, the report split; val.bin keeps the "
                        "rest as the selection split. the lab's comparison (python -m lab.compare) needs it (0.5 there). "
                        "Default: no report split")
    p.add_argument("--vocab_size", type=int, default=None,
                   help="a compact vocabulary for small experiments: keep the K most frequent "
                        "training tokens, map every other one to a single unknown token (ids "
                        f"0..K; meta.json holds the mapping); K >= {MIN_VOCAB_SIZE}. Default: "
                        "the full GPT-2 vocabulary")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="processes that encode (default: all usable cores, here %(default)s)")
    p.add_argument("--retries", type=int, default=5,
                   help="retries of a download after a transient failure (default: %(default)s)")
    p.add_argument("--retry_wait", type=float, default=1.0,
                   help="seconds before the first retry, doubled for each next one "
                        "(default: %(default)s)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds without data before a download attempt is given up "
                        "(default: %(default)s)")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.sample:
        given = [f"--{k}" for k in ("train_file", "val_file", "version")
                 if getattr(args, k) is not None]
        if given:
            p.error(f"--sample makes its own train and val text from {SAMPLE_SOURCE}: drop "
                    f"{' and '.join(given)}")
    args.version = args.version or "v2"
    args.out_dir = args.out_dir or ("data/sample" if args.sample else "data/tinystories")
    if args.workers < 1:
        p.error("--workers must be at least 1")
    if args.retries < 0 or args.retry_wait < 0 or args.timeout <= 0:
        p.error("--retries and --retry_wait must be >= 0, --timeout > 0")
    if not 0 < args.val_fraction <= 0.5:
        p.error("--val_fraction must be in (0, 0.5]")
    if not 0 <= args.report_fraction < 1:
        p.error("--report_fraction must be in [0, 1)")
    return args


def run(args):
    """The work behind main(): download what is missing, tokenize, report. Returns meta."""
    progress = not args.no_progress
    for path, what in ((args.train_file, "train file"), (args.val_file, "val file")):
        if path is not None:
            check_text_file(path, what)
    n_vocab = get_encoder().n_vocab  # fail before a 2 GB download if the tokenizer cannot load
    if args.vocab_size is not None:
        check_vocab_size(args.vocab_size, n_vocab)
    train_file, val_file, extra = args.train_file, args.val_file, {}
    raw_dir = args.raw_dir or os.path.join(args.out_dir, "raw")
    missing = [] if train_file is not None else ["train", "val"] if val_file is None else ["train"]
    if args.sample:
        got = fetch_sample(raw_dir, args.base_url, args.retries, args.retry_wait, args.timeout,
                           progress)
        (train_file, extra["train"]), (val_file, extra["val"]) = got["train"], got["val"]
    elif missing:
        got = fetch(args.version, raw_dir, args.base_url, missing, args.retries, args.retry_wait,
                    args.timeout, progress)
        for split, (path, url) in got.items():
            extra[split] = {"url": url, "dataset": f"roneneldan/TinyStories {args.version}"}
        train_file = got["train"][0]
        val_file = got["val"][0] if "val" in got else val_file
    t0, c0 = time.time(), os.times()
    meta = tokenize_files(train_file, val_file, args.out_dir, args.val_fraction, args.workers,
                          progress=progress, sources_extra=extra, vocab_size=args.vocab_size,
                          report_fraction=args.report_fraction)
    t1, c1 = time.time(), os.times()  # worker processes are joined by now: their CPU counts
    cpu = sum(c1[i] - c0[i] for i in range(4))  # user + system, self + children
    mb, dt = meta["input_bytes"] / 1e6, max(t1 - t0, 1e-9)
    print(f"train: {meta['train_stories']:,} stories, {meta['train_tokens']:,} tokens; "
          f"val: {meta['val_stories']:,} stories, {meta['val_tokens']:,} tokens"
          + (f"; test (report split): {meta['test_stories']:,} stories, "
             f"{meta['test_tokens']:,} tokens" if "test_tokens" in meta else "")
          + f" -> {args.out_dir}")
    if "compact_vocab" in meta:
        cv = meta["compact_vocab"]
        print(f"compact vocabulary of {cv['size']:,} tokens + unknown: covers "
              f"{100 * cv['train_coverage']:.2f}% of train, {100 * cv['val_coverage']:.2f}% of val")
    print(f"tokenized {mb:.1f} MB of text in {dt:.1f} s: {mb / dt:.2f} MB/s "
          f"(workers={args.workers}; {cpu:.1f} CPU-s, {mb / max(cpu, 1e-9):.2f} MB per CPU-s)")
    return meta


def missing_dirs(*paths):
    """The folders among `paths` and their parents that do not exist yet, deepest first."""
    missing = []
    for path in paths:
        path = os.path.abspath(path)
        while not os.path.exists(path) and path not in missing:
            missing.append(path)
            path = os.path.dirname(path)
    return sorted(missing, key=len, reverse=True)


def remove_if_empty(dirs):
    """Remove the folders this run created that hold nothing (deepest first). A folder with any
    content stays: a partial download (.part) resumes next time, and what was there before the
    run was never in the list."""
    for path in dirs:
        try:
            os.rmdir(path)
        except OSError:  # not empty, or already gone
            pass


def main(argv=None):
    args = parse_args(argv)
    created = missing_dirs(args.out_dir, args.raw_dir or os.path.join(args.out_dir, "raw"))
    try:
        run(args)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1)
    except OSError as e:  # disk full, permissions, ...: still one line
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1)
    except KeyboardInterrupt:
        print("interrupted: temporary files removed, no output written (a partial download is "
              "kept as .part and resumes next time)", file=sys.stderr)
        raise SystemExit(130)
    finally:  # after success the output folder holds the outputs, so it stays
        remove_if_empty(created)


if __name__ == "__main__":
    main()
