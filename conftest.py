"""Test set-up shared by every test file.

The tests run offline: where the project sits beside a `shared/` folder (as in CI), tiktoken's
GPT-2 files come from its cache and the TinyStories sample from its data folder. Without it,
tiktoken downloads its files itself and the tests fall back to generated stories.
"""
import os
import random
import shlex
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED / "tiktoken").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken")


def _generated_stories(n, seed):
    rng = random.Random(seed)
    names, things = ["Lily", "Tom", "Ben", "Sue", "Max"], ["ball", "cat", "tree", "cake", "boat"]
    stories = []
    for _ in range(n):
        a, b = rng.choice(names), rng.choice(things)
        stories.append(f"Once upon a time, {a} found a {b}. {a} was very happy. "
                       f"The {b} was big and red. The end.")
    return "\n<|endoftext|>\n".join(stories) + "\n<|endoftext|>\n"


@pytest.fixture(scope="session")
def stories(tmp_path_factory):
    """(train_path, val_path) of TinyStories-format text: the real sample when ../shared has it."""
    data = SHARED / "data"
    train, val = data / "tinystories-sample-train.txt", data / "tinystories-sample-val.txt"
    if train.is_file() and val.is_file():
        return train, val
    out = tmp_path_factory.mktemp("stories")
    (out / "train.txt").write_text(_generated_stories(400, 0), encoding="utf-8")
    (out / "val.txt").write_text(_generated_stories(50, 1), encoding="utf-8")
    return out / "train.txt", out / "val.txt"


@pytest.fixture(scope="session")
def compact_data(stories, tmp_path_factory):
    """A data folder prepared from the stories fixture with a 512-token compact vocabulary."""
    import prepare_tinystories

    out = tmp_path_factory.mktemp("compact_data")
    prepare_tinystories.tokenize_files(*stories, out_dir=out, vocab_size=512, progress=False)
    return out


class _CreatesAFile:
    """Unpickling this runs a shell command, as a malicious checkpoint would: it creates a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


@pytest.fixture
def unsafe_ckpt(tmp_path):
    """(path, marker): a checkpoint-shaped torch.save file whose loading would create `marker`."""
    import torch  # noqa: PLC0415

    path, marker = tmp_path / "unsafe.pt", tmp_path / "code_ran"
    torch.save({"arch": "prism", "model_config": {}, "model": {}, "iter_num": 0,
                "vocabulary": _CreatesAFile(marker)}, path)
    return path, marker


def unsafe_message(path):
    return (f"error: {path} is not a safe checkpoint: it contains code/objects other than tensors "
            "and plain data; refusing to load")
