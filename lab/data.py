"""
The study's data: the quickstart's sample (prepare_tinystories.py --sample) with its validation
stories cut in two, whole stories, every second one from the second to the report split:

    data/study/train.bin   the sample's training stories
    data/study/val.bin     the selection split: learning rates, early stopping
    data/study/test.bin    the report split: scored once per run, the numbers reported

    python -m lab.data                                   # -> data/study
    python -m lab.compare --preset=cpu-small --dry_run   # the study on it

It reads the sample's text from data/sample/raw (where --sample leaves it), downloading it if it is
not there. Tokens and compact vocabulary are the tutorial's (prepare_tinystories.tokenize_files);
meta.json adds test_tokens, test_stories, test_bytes and report_split.
"""
import argparse
import os
import sys

import prepare_tinystories as prep

REPORT_SPLIT = {
    "rule": "validation story j (0-based, in file order) goes to test.bin iff j is odd (every "
            "second story, from the second); the others stay in val.bin",
    "use": "val.bin: the selection split (learning rates, early stopping); test.bin: the report "
           "split (the numbers reported)"}


def selection_or_report(j):
    """The split of validation story j (0-based): every second one, from the second, reports."""
    return "test" if j % 2 else "val"


def prepare_study(train_file, val_file, out_dir="data/study", vocab_size=prep.SAMPLE_VOCAB_SIZE,
                  progress=True):
    """The tutorial's tokenisation of the two text files into out_dir, with the validation stories
    split by selection_or_report; returns meta."""
    return prep.tokenize_files(train_file, val_file, out_dir, vocab_size=vocab_size,
                               threads=os.cpu_count(), progress=progress,
                               route_val=selection_or_report,
                               extra_meta={"report_split": REPORT_SPLIT})


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m lab.data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="data/study", help="default: %(default)s")
    p.add_argument("--raw_dir", default="data/sample/raw",
                   help="the sample's text files, downloaded and cut there if absent "
                        "(default: %(default)s)")
    p.add_argument("--base_url", default=prep.BASE_URL,
                   help=f"where to download {prep.SAMPLE_SOURCE} from if needed (default: "
                        "%(default)s)")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    progress = not args.no_progress
    train, val = (os.path.join(args.raw_dir, prep.SAMPLE_FILES[s]) for s in ("train", "val"))
    try:
        if not (os.path.isfile(train) and os.path.isfile(val)):
            train, val = prep.fetch_sample(args.raw_dir, args.base_url.rstrip("/"), progress)
        meta = prepare_study(train, val, args.out_dir, progress=progress)
    except (prep.PrepareError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: no output written", file=sys.stderr)
        sys.exit(130)
    print(f"{args.out_dir}: train.bin {meta['train_tokens']:,} tokens, val.bin (selection) "
          f"{meta['val_tokens']:,}, test.bin (report) {meta['test_tokens']:,}; vocab_size "
          f"{meta['vocab_size']:,}")


if __name__ == "__main__":
    main()
