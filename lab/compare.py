"""
The comparison (docs/PRISM.md §6): PRISM against GPT-2, Gemma 3 and plain RoPE attention of the
same parameter count, and PRISM's white-box variants, under a protocol whose answer can decide.

    python -m lab.data                                          # data/study (lab/data.py)
    python -m lab.compare --preset=cpu-small --dry_run          # the whole plan
    python -m lab.compare --preset=cpu-small                    # the study
    python -m lab.compare --preset=cpu-small --report_only      # the tables again, from records

The protocol. Every run is train.py's train() and every head analysis is analyze_heads.py.
  1. Arms: variants of lab.variants.VARIANTS, each within ±5% of PRISM's parameters (checked);
     the table gives each one's training FLOPs per token beside its parameters. A candidate of
     lab.variants.RETIRED (rejected by the screen, its code deleted) still reports from its
     records; to run it again, check out the commit RETIRED names.
  2. Splits: train.bin trains; val.bin is the selection split (it picks the learning rate and is
     the curve train.py logs); test.bin, the report split (python -m lab.data), is scored once
     per run, on all its windows (evaluate_split).
  3. Learning rate, per arm: a grid ×2 apart (--lrs), each rate trained at the first seed of
     --seeds (the grid seed) for the full budget and scored on the whole selection split. While
     the best rate is the grid's lowest or highest, the grid grows by ×2 on that side
     (--max_extensions at most; the table says so). The grid seed is not reported: its chosen
     run won a selection, and its report-split loss shares that run's luck (same weights), so
     reusing it would bias each arm by how flat its learning-rate curve is.
  4. Seeds: the other seeds of --seeds are the report seeds. A seed fixes the data order, so
     every arm sees the same batches, and arms are compared seed by seed; it also fixes each
     arm's initialisation, but arms differ in shape, so what the pairing shares is the data
     order, not the weights.
  5. Statistics (stats.py): per arm, the per-seed difference of its report-split loss from the
     reference arm's (--reference, PRISM by default); mean, Student-t 95% interval, exact
     sign-flip p, Holm-corrected over the arms. The sign-flip test cannot go below 2/2^n for n
     seeds: the dry run says what the seeds allow.
  6. Heads: prism and prism-pi-off are analysed after training and at their initialisation (the
     model train.py builds for that seed, saved by a run of 0 iterations); the per-layer
     signal-minus-noise contrasts of analyze_heads.py are tested across seeds (lab.heads). The
     other PRISM-family arms (the white-box candidates) get their trained heads analysed too,
     reported as exploratory.
  7. Records: each finished run leaves summary.json, log.jsonl (its curve) and, for
     PRISM-family arms, heads.json under --records/<preset>/<variant>/lr<lr>/seed<seed>/ (untrained:
     .../<variant>/init/seed<seed>/): small files meant to be committed. A record is a finished
     run (one made with another budget or data is refused); checkpoints stay in --out_dir, where
     an unfinished run resumes. A summary also says what made it ("code": the commit, with
     "-dirty" for uncommitted changes to tracked .py files, and torch's version); that is not
     matched. --report_only re-makes the tables and the figure from the records alone: it reads
     no data (the data's fingerprint comes from the records). Runs are independent: processes
     with disjoint --archs can share one records folder.
The report goes between the markers of its section (--section, the preset by default) in
--results, the curves to --figure.
--screen runs step 3 only, at the first seed, and writes one table of each arm's best
selection-split loss: which candidates deserve the full protocol, not a comparison.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import analyze_heads
import train
from checkpoint import CheckpointError, load_model, read_checkpoint
from lab import stats
from lab.heads import contrast_test
from lab.variants import PRESETS, RETIRED, VARIANTS, check_preset, model_size, variant_args
from model import build_model

STUDY_ARMS = ("prism", "gpt2", "gemma3", "rope-attention", "prism-white-sandwich-gated", "recon")
# (model, its π-RoPE-off control): the claim is head regimes with π-RoPE, weaker without. The
# author's PRISM, and our reconstruction for the records of the studies made with it.
HEAD_PAIRS = (("prism", "prism-pi-off"), ("recon", "recon-pi-off"))
HEAD_ARMS = tuple(v for pair in HEAD_PAIRS for v in pair)
# The archs analyze_heads.py reads (PRISM's subspaces): their runs record heads.json. Every
# retired candidate was a PRISM variant too.
PRISM_ARCHS = ("prism", "prism-ablation", "recon", "prism-white")
REFERENCE = "prism"                    # by default every arm's difference is taken from it
# What makes two runs the same run: a record whose values differ is another study's.
BUDGET_KEYS = ("iters", "batch_size", "block_size", "warmup_iters", "min_lr_ratio", "evals",
               "eval_iters", "analysis_batches")
DATA_KEYS = ("tokenizer", "vocab_size", "train_tokens", "val_tokens", "val_bytes", "test_tokens",
             "test_bytes")


class CompareError(Exception):
    """A plan that cannot run, reported as one `error: ...` line."""


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m lab.compare",
        description="Train every arm on the same data, seeds, optimizer and schedule under a "
                    "learning-rate grid chosen on a selection split, score each run on the whole "
                    "report split, and write the paired statistics, the grid, the head contrasts "
                    "and the curves (see the module docstring for the protocol).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_dir", default="data/study",
                   help="prepared data with test.bin (python -m lab.data makes the study's); "
                        "--report_only reads none")
    p.add_argument("--preset", default="cpu-small", choices=sorted(PRESETS), help="model sizes")
    p.add_argument("--archs", default=",".join(STUDY_ARMS),
                   help=f"comma-separated variants of lab.variants.VARIANTS "
                        f"({', '.join(VARIANTS)}); with --report_only also the retired "
                        f"{', '.join(RETIRED)}")
    p.add_argument("--seeds", default="1,2,3,4,5,6,7,8,9",
                   help="comma-separated seeds; the first one runs the learning-rate grid only, "
                        "the others are the paired report seeds")
    p.add_argument("--epochs", type=float, default=4.0,
                   help="training tokens per run, in passes over train.bin")
    p.add_argument("--batch_size", type=int, default=16, help="sequences per iteration")
    p.add_argument("--reference", default=None,
                   help=f"the arm every other one is compared with, seed by seed (one of --archs); "
                        f"default: {REFERENCE} where it is one of them, else no comparison")
    p.add_argument("--section", default=None,
                   help="name of the section of --results to write (its markers); default: the "
                        "preset, then ' screen' with --screen, then ' vs <reference>' with another "
                        "--reference")
    p.add_argument("--lrs", default="1e-3,2e-3,4e-3,8e-3,1.6e-2",
                   help="the learning-rate grid, rates x2 apart (one rate: no grid)")
    p.add_argument("--refine", action="store_true",
                   help="once the grid's best rate is inside it, also score the rates x√2 either "
                        "side of it and choose the best of all")
    p.add_argument("--speeds", default=None, metavar="PATH",
                   help="lab.bench's --json records: the equal-wall-clock table takes each arm's "
                        "training tokens/s at the preset's block size from them, measured side by "
                        "side on one machine, instead of the runs' own")
    p.add_argument("--every_record", action="store_true",
                   help="choose each arm's rate among every record it has at the grid seed, not "
                        "only the grid's rates (a rate recorded by an earlier study counts too)")
    p.add_argument("--max_extensions", type=int, default=3,
                   help="rates a grid may grow by while its best rate is at an edge")
    p.add_argument("--evals", type=int, default=8, help="evaluations along each run (the curve)")
    p.add_argument("--eval_iters", type=int, default=10, help="batches per curve evaluation")
    p.add_argument("--analysis_batches", type=int, default=8, help="batches analyze_heads reads")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... or auto")
    p.add_argument("--out_dir", default="runs/compare", help="checkpoints (not committed)")
    p.add_argument("--records", default="lab/results", help="the small records of finished runs "
                                                          "(committed)")
    p.add_argument("--results", default="lab/RESULTS.md", help="markdown file to write into")
    p.add_argument("--figure", default=None,
                   help="the curve figure; default: compare_<section>.png beside --results")
    p.add_argument("--time_steps", type=int, default=3,
                   help="training steps the dry run times per arm for its estimate (0: none)")
    p.add_argument("--screen", action="store_true",
                   help="screening: only each arm's learning-rate grid at the first "
                        "seed, and one table of the best selection-split losses; no report "
                        "seeds, no statistics")
    p.add_argument("--dry_run", action="store_true",
                   help="check the plan and print it (arms, sizes, grid, seeds, budget, runs, "
                        "time); train nothing")
    p.add_argument("--report_only", action="store_true",
                   help="re-make the tables and figure from --records; train nothing, and stop "
                        "at the first missing record")
    return p


# -----------------------------------------------------------------------------
# The plan


def _numbers(text, name, kind=float):
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CompareError(f"--{name} must be comma-separated numbers, got {text!r}") from None


def fingerprint(meta):
    """The data fields a record must agree on (its split sizes and tokenizer)."""
    return {k: meta.get(k) for k in DATA_KEYS} | {
        "compact_vocab": (meta.get("compact_vocab") or {}).get("size")}


def first_record(args, variants):
    """The first summary.json of these variants under --records (None if there is none)."""
    for v in variants:
        for path in sorted((Path(args.records) / args.preset / v).glob("*/seed*/summary.json")):
            return json.loads(path.read_text())
    return None


def load_data_fingerprint(args, variants):
    """The data's fingerprint: from meta.json, or with --report_only (which reads no data) from a
    record of the arms (every record read is then checked against it)."""
    if args.report_only:
        summary = first_record(args, variants)
        if summary is None:
            raise CompareError(f"no records of {', '.join(variants)} under "
                               f"{Path(args.records) / args.preset}")
        return summary["data"]
    meta_path = Path(args.data_dir) / "meta.json"
    if not meta_path.is_file():
        raise CompareError(f"no meta.json in {args.data_dir}: prepare the data first "
                           f"(python -m lab.data makes the study's data/study)")
    meta = json.loads(meta_path.read_text())
    if "test_tokens" not in meta:
        raise CompareError(f"{args.data_dir} has no report split (test.bin): the study's data "
                           f"comes from python -m lab.data")
    return fingerprint(meta)


def retired_size(args, variant):
    """(params, FLOPs/token) of a retired candidate: its records' parameter count and the FLOPs
    RETIRED keeps (its code is gone, so nothing can be rebuilt or counted)."""
    flops = RETIRED[variant]["flops_per_token"].get(args.preset)
    summary = first_record(args, [variant])
    if summary is None or flops is None:
        raise CompareError(f"{variant} is retired and has no records at preset {args.preset}")
    return summary["params"], flops


def make_plan(args):
    """Everything the study will do, checked before anything trains."""
    variants = [v for v in args.archs.split(",") if v]
    retired = [v for v in variants if v in RETIRED]
    if retired and not args.report_only:
        v = retired[0]
        raise CompareError(f"{v} is a retired candidate, its code deleted: to run it, git checkout "
                           f"{RETIRED[v]['commit']} (its records still report with --report_only)")
    data = load_data_fingerprint(args, variants)
    live = [v for v in variants if v not in RETIRED]
    try:
        for v in live:
            variant_args(args.preset, v, data["vocab_size"])
        check_preset(args.preset, data["vocab_size"], variants=live)
    except ValueError as e:
        raise CompareError(str(e)) from None
    seeds = _numbers(args.seeds, "seeds", int)
    grid = sorted(_numbers(args.lrs, "lrs"))
    if len(seeds) < (1 if args.screen else 2) or not grid or not variants:
        raise CompareError("need at least two seeds (the grid seed and a report seed; one with "
                           "--screen), one learning rate and one arch")
    if len(set(seeds)) != len(seeds) or len(set(variants)) != len(variants):
        raise CompareError("--seeds and --archs must not repeat an entry")
    if args.reference is not None and args.reference not in variants:
        raise CompareError(f"--reference={args.reference} is not one of --archs")
    if any(not math.isclose(b / a, 2, rel_tol=1e-6) for a, b in zip(grid, grid[1:])):
        raise CompareError(f"--lrs must be x2 apart (the grid grows by x2 at its edges), "
                           f"got {grid}")
    block_size = PRESETS[args.preset]["block_size"]
    tokens_per_iter = args.batch_size * block_size
    iters = round(args.epochs * data["train_tokens"] / tokens_per_iter)
    if iters < args.evals:
        raise CompareError(f"--epochs={args.epochs:g} is {iters} iterations of "
                           f"{tokens_per_iter:,} tokens: too few for {args.evals} evaluations")
    for split in ("train", "val", "test"):
        if data[f"{split}_tokens"] <= block_size + 1:
            raise CompareError(f"{split}.bin has {data[f'{split}_tokens']} tokens, too few for "
                               f"block_size {block_size}")
    budget = dict(iters=iters, batch_size=args.batch_size, block_size=block_size,
                  warmup_iters=max(1, iters // 20), min_lr_ratio=0.1, evals=args.evals,
                  eval_iters=args.eval_iters, analysis_batches=args.analysis_batches)
    sizes = {v: retired_size(args, v) if v in RETIRED else
             model_size(*variant_args(args.preset, v, data["vocab_size"])) for v in variants}
    speeds = bench_speeds(args.speeds, block_size, variants) if args.speeds else None
    return dict(preset=args.preset, data=data, variants=variants, code=code_version(), speeds=speeds,
                speeds_path=args.speeds,
                reference=args.reference or REFERENCE,
                grid_seed=seeds[0],
                seeds=seeds[1:], grid=grid, budget=budget,
                tokens_per_iter=tokens_per_iter,
                epochs=iters * tokens_per_iter / data["train_tokens"],
                records=Path(args.records) / args.preset, runs=Path(args.out_dir) / args.preset,
                params={v: n for v, (n, _) in sizes.items()},
                flops={v: f for v, (_, f) in sizes.items()})


def bench_speeds(path, block_size, variants):
    """{arm: training tokens/s} from lab.bench's JSON Lines at this block size (the median record
    of each arm), for every arm; CompareError where one is missing."""
    try:
        records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise CompareError(f"--speeds={path}: {e}") from None
    speeds = {}
    for v in variants:
        rates = [r["tokens_per_sec"] for r in records if r.get("kind") == "train_step"
                 and r.get("arch") == v and r.get("block_size") == block_size and not r.get("error")]
        if not rates:
            raise CompareError(f"--speeds={path} has no training step of {v} at T = {block_size}")
        speeds[v] = statistics.median(rates)
    return speeds


def compared_arms(plan):
    ref = plan["reference"]
    return [v for v in plan["variants"] if v != ref] if ref in plan["variants"] else []


def smallest_adjusted_p(n_seeds, n_arms):
    """The smallest Holm-adjusted p any arm can get: the exact test's floor 2/2^n, times the
    family size (Holm multiplies the smallest p by m)."""
    return min(1.0, max(1, n_arms) * stats.min_sign_flip_pvalue(n_seeds))


# -----------------------------------------------------------------------------
# The learning-rate grid


def choose_lr(grid, score, max_extensions, refine=False, recorded=(), canonical=lambda lr: lr):
    """(best rate, {rate: score}, rates added, still at an edge?) for a grid ×2 apart.

    `score(lr)` is the loss of a rate (lower is better; NaN counts as the worst). `recorded`
    rates (the arm's other records at the grid seed) are scored beside the grid, so the choice is
    among all of them. While the best rate is the lowest or highest scored, the rate ×2 beyond it
    is added and scored, at most max_extensions times; a one-rate grid is a fixed rate and never
    grows. With `refine`, an interior best then gets its two neighbours ×√2 away scored too (in
    the scores, not in `added`), and the best of all is chosen. `canonical` maps a computed rate
    to the recorded one of the same name (4e-3·√2 and 8e-3/√2 differ in the last bit); a rate
    within 1e-5 (relative) of one scored in this call is that one: a record's name keeps 6
    digits, off by at most 5e-6, so 0.00565685·√2 is the grid's 8e-3 (off by 8e-7)."""
    lrs = sorted({canonical(lr) for lr in (*grid, *recorded)})
    scores = {lr: score(lr) for lr in lrs}

    def known(lr):  # a computed rate as one already scored that it equals but for rounding
        lr = canonical(lr)
        return next((s for s in scores if math.isclose(s, lr, rel_tol=1e-5)), lr)

    def best():
        return min(scores, key=lambda lr: math.inf if math.isnan(scores[lr]) else scores[lr])

    added = []
    while len(grid) > 1 and best() in (lrs[0], lrs[-1]) and len(added) < max_extensions:
        lr = known(lrs[0] / 2 if best() == lrs[0] else lrs[-1] * 2)
        scores[lr] = score(lr)
        lrs = sorted(scores)
        added.append(lr)
    at_edge = len(lrs) > 1 and best() in (lrs[0], lrs[-1])
    if refine and len(grid) > 1 and not at_edge:
        centre = best()
        for lr in (centre / math.sqrt(2), centre * math.sqrt(2)):
            lr = known(lr)
            if lr not in scores:
                scores[lr] = score(lr)
    return best(), scores, added, at_edge


# -----------------------------------------------------------------------------
# Runs and their records


def record_dir(plan, variant, lr, seed):
    return plan["records"] / variant / f"lr{lr:g}" / f"seed{seed}"


def init_dir(plan, variant, seed):
    return plan["records"] / variant / "init" / f"seed{seed}"


def _write_json(path, obj, indent=1):
    """Written to a temporary name, then renamed: a record is whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=indent) + "\n")
    os.replace(tmp, path)


def read_record(plan, rec, variant, seed, lr=None):
    """A finished run's summary, checked to be this study's run; None where there is none. What
    made it ("code") is not matched, nor a retired candidate's model_args (no code to compare
    them with)."""
    path = rec / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    want = dict(variant=variant, seed=seed, preset=plan["preset"], data=plan["data"],
                budget=plan["budget"])
    if variant not in RETIRED:
        want["model_args"] = variant_args(plan["preset"], variant, plan["data"]["vocab_size"])[1]
    if lr is not None:
        want["lr"] = lr
    differ = [k for k, v in want.items() if summary.get(k) != v]
    if differ:
        raise CompareError(f"{path} is a record of another study (its {', '.join(differ)} "
                           f"differ{'s' if len(differ) == 1 else ''}): give this one another "
                           f"--records folder")
    return summary


def code_version(root=Path(__file__).resolve().parent.parent):
    """What made a record: the commit of the checkout at root (with "-dirty" where tracked .py
    files have uncommitted changes; "unknown" outside a git checkout) and torch's version. The
    plan takes it once, when the study starts: the code Python loaded then made every record of
    the process, whatever is committed while it runs."""

    def git(*argv):
        return subprocess.run(["git", *argv], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        if git("diff", "--name-only", "HEAD", "--", "*.py"):
            commit += "-dirty"
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return dict(commit=commit, torch=torch.__version__)


def _train_config(args, plan, variant, lr, seed, run_dir, iters):

    b = plan["budget"]
    arch, model_args = variant_args(args.preset, variant, plan["data"]["vocab_size"])
    model_args.pop("vocab_size")  # train.py takes it from meta.json
    cfg = train.TrainConfig(
        data_dir=args.data_dir, out_dir=str(run_dir), arch=arch, batch_size=b["batch_size"],
        max_iters=iters, learning_rate=lr, min_lr=lr * b["min_lr_ratio"],
        warmup_iters=min(b["warmup_iters"], iters), eval_interval=max(1, iters // b["evals"]),
        eval_iters=b["eval_iters"], log_interval=max(1, iters // b["evals"]), seed=seed,
        device=args.device, init_from="scratch")
    ckpt = run_dir / "ckpt.pt"
    if ckpt.is_file():  # an unfinished run of this study resumes; anything else is refused

        try:
            saved = read_checkpoint(ckpt).get("train_config") or {}
        except CheckpointError as e:
            raise CompareError(str(e)) from None
        differ = [k for k in ("max_iters", "learning_rate", "batch_size", "seed", "data_dir",
                              "arch", "warmup_iters", "eval_interval", "eval_iters")
                  if saved.get(k) != getattr(cfg, k)]
        if differ:
            raise CompareError(f"{ckpt} was written with other settings ({', '.join(differ)}): "
                               f"remove it or give this study another --out_dir")
        cfg.init_from = "resume"
    return cfg, model_args


def run_once(args, plan, variant, lr, seed):
    """The record of one run (train.train() unless it is recorded already)."""
    rec = record_dir(plan, variant, lr, seed)
    summary = read_record(plan, rec, variant, seed, lr)
    if summary is not None:
        return summary
    if args.report_only:
        raise CompareError(f"no record {rec / 'summary.json'}: the study is not finished "
                           f"(run it without --report_only)")


    run_dir = plan["runs"] / variant / f"lr{lr:g}" / f"seed{seed}"
    cfg, model_args = _train_config(args, plan, variant, lr, seed, run_dir, plan["budget"]["iters"])
    print(f"\n== {variant} | lr {lr:g} | seed {seed} | {cfg.max_iters} iters -> {run_dir}",
          flush=True)
    result = train.train(cfg, model_args)
    # The final scores: every window of the selection split (it chooses the rate) and of the
    # report split (it is reported), on the final weights.
    device = train.resolve_system(cfg).device
    model = load_model(run_dir / "ckpt.pt", device)
    scores = {}
    for split in ("val", "test"):
        data = np.memmap(Path(args.data_dir) / f"{split}.bin", dtype=np.uint16, mode="r")
        scores[split] = evaluate_split(model, data, plan["budget"]["block_size"],
                                       plan["budget"]["batch_size"], device)
    d = plan["data"]
    rec.mkdir(parents=True, exist_ok=True)
    (rec / "log.jsonl").write_text((run_dir / "log.jsonl").read_text())
    if records_heads(variant):
        _write_json(rec / "heads.json", analyze(args, run_dir / "ckpt.pt", run_dir / "analysis"),
                    indent=None)
    summary = dict(variant=variant, preset=args.preset, lr=lr, seed=seed, budget=plan["budget"],
                   data=d, model_args=variant_args(args.preset, variant, d["vocab_size"])[1],
                   params=result["params"], tokens=result["tokens"],
                   selection_loss=scores["val"], report_loss=scores["test"],
                   report_bpb=scores["test"] / math.log(2) * d["test_tokens"] / d["test_bytes"],
                   curve_val_loss=result["val_loss"], train_loss=result["train_loss"],
                   tokens_per_sec=result["tokens_per_sec"], code=plan["code"])
    _write_json(rec / "summary.json", summary)  # last: it marks the record finished
    return summary


@torch.no_grad()
def evaluate_split(model, data, block_size, batch_size, device):
    """Mean loss per token over ALL non-overlapping windows of `data` (window w covers tokens
    w·block_size … (w+1)·block_size, its targets shifted by one; the tail shorter than a window is
    left out): the whole split, no sampling noise, the same number at every call."""
    n_windows = (len(data) - 1) // block_size
    if n_windows < 1:
        raise CompareError(f"a split of {len(data)} tokens holds no window of {block_size + 1}")
    model.eval()
    total = 0.0
    for start in range(0, n_windows, batch_size):
        offsets = np.arange(start, min(start + batch_size, n_windows)) * block_size
        x, y = train.get_batch(data, offsets, block_size, device)
        total += model(x, y)[1].item() * len(offsets)  # every window has block_size targets
    return total / n_windows


def init_heads(args, plan, variant, seed):
    """heads.json of a variant's untrained model at a seed: train.py's initialisation, saved by a
    run of 0 iterations (same seed, same build: the weights the trained run started from)."""
    rec = init_dir(plan, variant, seed)
    if read_record(plan, rec, variant, seed) is not None:
        return json.loads((rec / "heads.json").read_text())
    if args.report_only:
        raise CompareError(f"no record {rec / 'summary.json'}: the study is not finished")

    run_dir = plan["runs"] / variant / "init" / f"seed{seed}"
    cfg, model_args = _train_config(args, plan, variant, plan["grid"][0], seed, run_dir, 0)
    cfg.init_from = "scratch"
    train.train(cfg, model_args)
    heads = analyze(args, run_dir / "ckpt.pt", run_dir / "analysis")
    _write_json(rec / "heads.json", heads, indent=None)
    _write_json(rec / "summary.json", dict(
        variant=variant, preset=args.preset, seed=seed, iters=0, data=plan["data"],
        budget=plan["budget"],
        model_args=variant_args(args.preset, variant, plan["data"]["vocab_size"])[1],
        code=plan["code"]))
    return heads


def analyze(args, ckpt, out):
    """analyze_heads.py on a checkpoint, on the report split; its heads.json (a record keeps no
    figure, so none is drawn)."""
    status = analyze_heads.main([f"--ckpt={ckpt}", f"--data_dir={args.data_dir}", "--split=test",
                                 f"--out_dir={out}", f"--num_batches={args.analysis_batches}",
                                 f"--device={args.device}", "--no_progress", "--no_figures"])
    if status:
        raise CompareError(f"analyze_heads.py failed on {ckpt} (see above)")
    return json.loads((out / "heads.json").read_text())


def records_heads(variant):
    """Whether a run of `variant` records heads.json: every PRISM-family arm (the head arms, and
    the others beside them)."""
    return variant in RETIRED or VARIANTS[variant][0] in PRISM_ARCHS


def read_curve(rec):
    """(iteration, selection-split loss) along a run, from its recorded log.jsonl."""
    points = []
    for line in (rec / "log.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("val_loss") is not None:
            points.append((r["iter"], r["val_loss"]))
    return points


# -----------------------------------------------------------------------------
# The study


def choose_arm_lr(args, plan, variant):
    """{lr, grid, added, at_edge, tokens_per_sec}: the arm's grid at the grid seed, grown at an
    edge; tokens_per_sec is the mean of train.py's measure over the grid's runs that have one (a
    run resumed at its last checkpoint trained nothing in its process and has none)."""
    speeds = []

    def score(lr):
        summary = run_once(args, plan, variant, lr, plan["grid_seed"])
        speeds.append(summary["tokens_per_sec"])
        return summary["selection_loss"]

    seed = plan["grid_seed"]
    recorded = {f"{s['lr']:g}": s["lr"] for s in
                (json.loads(p.read_text()) for p in sorted((plan["records"] / variant).glob(
                    f"lr*/seed{seed}/summary.json"))) if "lr" in s}
    lr, grid, added, at_edge = choose_lr(
        plan["grid"], score, args.max_extensions, args.refine,
        recorded=recorded.values() if args.every_record else (),
        canonical=lambda lr: recorded.get(f"{lr:g}", lr))
    measured = [s for s in speeds if s]
    named = {f"{lr:g}" for lr in (*plan["grid"], *added)}
    extra = [lr for lr in sorted(grid) if f"{lr:g}" not in named]
    # with --every_record the arm's other records join the grid; else extras are refinements
    others = [lr for lr in extra if args.every_record and f"{lr:g}" in recorded]
    return dict(lr=lr, grid=grid, added=added, at_edge=at_edge, records=others,
                refined=[lr for lr in extra if lr not in others],
                tokens_per_sec=statistics.fmean(measured) if measured else None)


def run_study(args, plan):
    """{variant: {lr, grid: {lr: loss}, added, at_edge, runs: [summary per seed], curves,
    heads, init_heads}}: trains what is not recorded (nothing with --report_only)."""
    out = {}
    for v in plan["variants"]:
        out[v] = choose_arm_lr(args, plan, v)
        lr = out[v]["lr"]
        runs = [run_once(args, plan, v, lr, s) for s in plan["seeds"]]
        recs = [record_dir(plan, v, lr, s) for s in plan["seeds"]]
        out[v].update(runs=runs, curves=[read_curve(r) for r in recs])
        # the head arms must have heads; another arm's are exploratory, where recorded
        if v in HEAD_ARMS or all((r / "heads.json").is_file() for r in recs):
            out[v]["heads"] = [json.loads((r / "heads.json").read_text()) for r in recs]
        if v in HEAD_ARMS:
            out[v]["init_heads"] = [init_heads(args, plan, v, s) for s in plan["seeds"]]
    return out


def curve_at(curve, it):
    """The curve's loss at the evaluation nearest iteration `it`, and that iteration."""
    i, loss = min(curve, key=lambda p: abs(p[0] - it))
    return loss, i


def rankings(plan, study):
    """[(epoch, {arm: rank})]: the rank of each arm (1 = lowest mean selection-split loss of its
    recorded curves) at the evaluation nearest each whole epoch of the budget and at its end."""
    iters, per_epoch = plan["budget"]["iters"], plan["data"]["train_tokens"] / plan["tokens_per_iter"]
    points = [round(e * per_epoch) for e in range(1, math.floor(plan["epochs"] + 1e-9) + 1)]
    if points and iters - points[-1] < per_epoch / 4:
        points.pop()  # the end stands for the last whole epoch
    out = []
    for it in points + [iters]:
        means, at = {}, None
        for v, s in study.items():
            pts = [curve_at(c, it) for c in s["curves"]]
            means[v] = statistics.fmean(loss for loss, _ in pts)
            at = pts[0][1]
        order = sorted(means, key=means.get)
        out.append((at * plan["tokens_per_iter"] / plan["data"]["train_tokens"],
                    {v: order.index(v) + 1 for v in means}))
    return out


def curve_between(curve, it):
    """The curve's loss at iteration `it`, linear between its two nearest evaluations."""
    for (i0, l0), (i1, l1) in zip(curve, curve[1:]):
        if i0 <= it <= i1:
            return l0 + (l1 - l0) * (it - i0) / (i1 - i0) if i1 > i0 else l1
    return curve[-1][1]


def equal_wall_clock(plan, study):
    """{arm: (tokens/s, iteration reached, loss)} at the wall-clock time the fastest arm takes for
    the whole budget: each arm's mean training tokens/s over its report runs (train.py's own
    measure) gives the iteration it reaches by then, and its curves (mean over seeds, linear
    between evaluations) the selection-split loss there. {} when a run has no tokens/s."""
    iters = plan["budget"]["iters"]
    speed = dict(plan.get("speeds") or {})
    for v, s in study.items():
        rates = [r.get("tokens_per_sec") for r in s["runs"]]
        if v not in speed and (not rates or not all(rates)):
            return {}
        speed.setdefault(v, statistics.fmean(rates or [0]))
    fastest = max(speed[v] for v in study)
    return {v: (speed[v], iters * speed[v] / fastest,
                statistics.fmean(curve_between(c, iters * speed[v] / fastest)
                                 for c in study[v]["curves"])) for v in study}


def paired_differences(plan, study):
    """{arm: paired_summary of its report loss minus the reference's, seed by seed, + Holm's p}."""
    arms = compared_arms(plan)
    ref = {r["seed"]: r["report_loss"] for r in study[plan["reference"]]["runs"]} if arms else {}
    out = {}
    for v in arms:
        pairs = [(r["report_loss"], ref[r["seed"]]) for r in study[v]["runs"] if r["seed"] in ref]
        out[v] = stats.paired_summary([a - b for a, b in pairs])
        out[v]["r"] = (float(np.corrcoef(np.array(pairs).T)[0, 1]) if len(pairs) > 2 else None)
    for v, p in zip(arms, stats.holm([out[v]["p"] for v in arms])):
        out[v]["p_holm"] = p
    return out


def pairing_lines(diffs, ref_arm, n):
    """What the pairing by seed shares, and the measured correlation of each arm's per-seed report
    losses with the reference's (none with fewer than 3 seeds)."""
    rs = {v: d["r"] for v, d in diffs.items() if d.get("r") is not None}
    if not rs:
        return []
    return [f"Pairing: a seed fixes the data order, which every arm shares, and each arm's "
            f"initialisation, which arms of different shapes cannot share. Pearson r of each "
            f"arm's per-seed report loss with {ref_arm}'s: "
            + ", ".join(f"{v} {r:+.2f}" for v, r in rs.items())
            + f"; with {n} independent seeds and no relation, |r| exceeds "
            f"{stats.correlation_bound(n):.2f} 5% of the time. The sign-flip test needs "
            f"independent seeds, not correlated arms: pairing that shares little costs power, "
            f"not validity.", ""]


def head_contrasts(study):
    """[(title, contrast_test rows)]: PRISM and its π-off ablation, each against its untrained
    self and against 0, and against each other; paired by seed."""

    tests = []
    for v in HEAD_ARMS:
        if v in study:
            tests.append((f"{v} trained (against 0)", study[v]["heads"], None))
            tests.append((f"{v} trained − {v} untrained", study[v]["heads"],
                          study[v]["init_heads"]))
    for a, b in HEAD_PAIRS:
        if a in study and b in study:
            tests.append((f"{a} − {b}, both trained", study[a]["heads"], study[b]["heads"]))
    pair = head_pair(study)
    for v, s in study.items():  # the other PRISM-family arms (the candidates): exploratory
        if v not in HEAD_ARMS and "heads" in s:
            tests.append((f"{v} trained (against 0)", s["heads"], None))
            if pair is not None:
                tests.append((f"{v} − {pair[0]}, both trained", s["heads"],
                              study[pair[0]]["heads"]))
    rows = [(title, contrast_test(t, c)) for title, t, c in tests]
    return [(title, r) for title, r in rows if r]


def head_pair(variants):
    """The first (model, π-off control) of HEAD_PAIRS whose model is among the arms, or None."""
    return next((pair for pair in HEAD_PAIRS if pair[0] in variants), None)


# The claim, fixed before the numbers (docs/PRISM.md §5): signal heads look further back and sit lower
# in their band than noise heads, in the trained PRISM more than at its initialisation and more
# than without π-RoPE. Six tests, Holm-corrected together; every other contrast is exploratory.
CLAIM_CONTRASTS = ("log_distance", "log_distance_no_self", "log_centroid_in_band")


def claim_tests(contrasts, pair):
    """The pre-registered family of a (model, π-off) pair: [(comparison, contrast row,
    Holm-adjusted p)] at layer "all"."""
    a, b = pair
    by_title = dict(contrasts)
    comparisons = (f"{a} trained − {a} untrained", f"{a} − {b}, both trained")
    family = [(title, r) for title in comparisons for r in by_title.get(title, [])
              if r["layer"] == "all" and r["contrast"] in CLAIM_CONTRASTS]
    adjusted = stats.holm([r["p"] for _, r in family])
    return [(title, r, p) for (title, r), p in zip(family, adjusted)]


# -----------------------------------------------------------------------------
# Report


def _fmt(x, spec=".4f"):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    m = statistics.fmean(values)
    return f"{m:.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 else f"{m:.4f}"


def study_command(args):
    """The command that runs (or resumes) this study, without the machine's own paths: the data
    folder is DATA (data/study for the study's), which --report_only does not read."""
    keys = ("preset", "archs", "seeds", "epochs", "batch_size", "lrs", "max_extensions", "evals",
            "eval_iters", "analysis_batches", "records")
    optional = [f"--{k}={getattr(args, k)!r}" if " " in str(getattr(args, k)) else
                f"--{k}={getattr(args, k)}" for k in ("reference", "section") if getattr(args, k)]
    optional += ["--refine"] if args.refine else []
    optional += ["--every_record"] if args.every_record else []
    optional += [f"--speeds={args.speeds}"] if args.speeds else []
    return " ".join(["python -m lab.compare --data_dir=DATA",
                     *(f"--{k}={getattr(args, k)}" for k in keys), *optional])


def lr_note(s):
    refined = s.get("refined", [])
    if not s["added"] and not s["at_edge"] and not refined and not s.get("records"):
        return f"{s['lr']:.3g}"
    note = f"extended by {', '.join(f'{x:g}' for x in s['added'])}" if s["added"] else ""
    if refined:
        note += ("; " if note else "") + f"refined by {', '.join(f'{x:.3g}' for x in refined)}"
    if s.get("records"):
        note += (("; " if note else "") + "and the records at "
                 + ", ".join(f"{x:.3g}" for x in s["records"]))
    if s["at_edge"]:
        note += ("; " if note else "") + "still at the grid's edge"
    return f"{s['lr']:.3g} ({note})"


def grid_table(args, plan, study):
    """The learning-rate grid of every arm: selection-split loss per rate, the chosen one bold."""
    # one column per record name (lr{lr:g}): ×√2 from below and ÷√2 from above can differ in the
    # last bit and still name the same run
    all_lrs = sorted({float(f"{lr:g}") for s in study.values() for lr in s["grid"]})
    lines = [f"Learning-rate grid: loss on the whole selection split at seed "
             f"{plan['grid_seed']}, full budget; **bold** = chosen; rates beyond --lrs were "
             f"added because the best was at an edge (at most {args.max_extensions})"
             + (", and ×√2 either side of an interior best (--refine)" if args.refine else "")
             + ("; the choice is among these and every other record of the arm at that seed "
                "(--every_record)" if args.every_record else "")
             + ".", "",
             "| variant | " + " | ".join(f"{lr:.3g}" for lr in all_lrs) + " | note |",
             "|---|" + "---:|" * len(all_lrs) + "---|"]
    for v, s in study.items():
        grid = {float(f"{lr:g}"): (loss, lr == s["lr"]) for lr, loss in s["grid"].items()}
        cells = [("**{:.4f}**" if grid[lr][1] else "{:.4f}").format(grid[lr][0])
                 if lr in grid else "" for lr in all_lrs]
        note = lr_note(s).partition(" (")[2].rstrip(")") or "interior"
        lines.append(f"| {v} | " + " | ".join(cells) + f" | {note} |")
    return lines


def against(ref_arm):
    """A section heading's tail: which arm the others are compared with, unless the default."""
    return "" if ref_arm in (None, REFERENCE) else f", against {ref_arm}"


def named(args):
    """A section heading's last tail: the name given by --section, so two sections of one preset
    and reference (another budget, another pair of arms) have headings of their own."""
    return f" — {args.section}" if args.section else ""


def screen_report(args, plan, study):
    """Issue 12's screening: each arm's best selection-split loss over its grid at one seed. A
    lead for which arms to take to the full protocol, not a comparison (one seed, and the
    selection split both picks the rate and scores it)."""
    b = plan["budget"]
    best = {v: s["grid"][s["lr"]] for v, s in study.items()}
    ref_arm = plan["reference"]
    ref = best.get(ref_arm)
    lines = [f"## Screening at preset `{args.preset}`{against(ref_arm)}{named(args)}", "",
             f"Screen: `{study_command(args)} --screen` (records in `{plan['records']}`). One "
             f"seed ({plan['grid_seed']}), {b['iters']} iterations of {plan['tokens_per_iter']:,} "
             f"tokens per run ({plan['epochs']:.2f} epochs); the loss is the best of each arm's "
             f"grid on the whole selection split. One seed and a selected score: a lead for the "
             f"full protocol, not a result. Training tokens/s: the mean over the arm's grid "
             f"runs of train.py's own measure, on whatever machine and load ran them (here: "
             f"two one-thread processes side by side), a rough speed beside bench.py's.", "",
             f"| variant | params | FLOPs/token | training tokens/s | best lr | "
             f"best selection loss | Δ vs {ref_arm} |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for v, s in sorted(study.items(), key=lambda kv: best[kv[0]]):
        delta = f"{best[v] - ref:+.4f}" if ref is not None else "n/a"
        lines.append(f"| {v} | {plan['params'][v]:,} | {plan['flops'][v] / 1e6:.2f}M | "
                     f"{_fmt(s['tokens_per_sec'], ',.0f')} | {lr_note(s)} | {best[v]:.4f} | {delta} |")
    return "\n".join(lines + [""] + grid_table(args, plan, study) + [""])


def equal_wall_clock_lines(plan, study):
    """The loss of each arm at the fastest arm's wall-clock time for the budget (equal_wall_clock)."""
    at = equal_wall_clock(plan, study)
    if not at:
        return []
    iters = plan["budget"]["iters"]
    order = sorted(at, key=lambda v: at[v][2])
    source = ("lab.bench's training tokens/s, every arm measured side by side on one machine "
              f"(--speeds={Path(plan['speeds_path']).name})" if plan.get("speeds") else
              "this machine, the runs' own training tokens/s, mean over the report seeds")
    lines = ["", f"At equal wall-clock ({source}): where each arm's curves are when the fastest arm has "
                 "trained its whole budget. A slower arm is stopped early on a schedule made for "
                 "the whole budget (its rate not yet decayed), which handicaps it beyond the "
                 "tokens; read it as a bound, not a run at that budget.", "",
             "| variant | training tokens/s | share of the budget | curve loss there | rank |",
             "|---|---:|---:|---:|---:|"]
    for v in plan["variants"]:
        speed, it, loss = at[v]
        lines.append(f"| {v} | {speed:,.0f} | {it / iters:.0%} | {loss:.4f} | "
                     f"{order.index(v) + 1} |")
    return lines


def report(args, plan, study, figure):
    d, b = plan["data"], plan["budget"]
    n, arms = len(plan["seeds"]), compared_arms(plan)
    ref_arm = plan["reference"]
    diffs = paired_differences(plan, study)
    ranks = rankings(plan, study)
    same = all(r == ranks[-1][1] for _, r in ranks)
    lines = [
        f"## Comparison at preset `{args.preset}`{against(ref_arm)}{named(args)}", "",
        f"Study: `{study_command(args)}` (records in `{plan['records']}`; `--report_only` "
        f"re-makes this section from them).", "",
        f"Data: {d['train_tokens']:,} train tokens; selection split (val.bin) "
        f"{d['val_tokens']:,} tokens, report split (test.bin) {d['test_tokens']:,} tokens; "
        f"vocabulary {d['vocab_size']:,}. Every run: {b['iters']} iterations of "
        f"{plan['tokens_per_iter']:,} tokens ({b['iters'] * plan['tokens_per_iter']:,} tokens, "
        f"{plan['epochs']:.2f} epochs), AdamW, linear warmup over {b['warmup_iters']} "
        f"iterations, cosine to lr/10; report seeds {', '.join(map(str, plan['seeds']))}. The "
        f"learning rate of each arm is the grid's best on the whole selection split at seed "
        f"{plan['grid_seed']}, a seed that is not reported; the losses below are on every "
        f"window of the report split, mean ± sample sd over the report seeds.", "",
        f"Δ vs {ref_arm}: the mean over seeds of (arm − {ref_arm}) report loss, paired by "
        f"seed, with its Student-t 95% interval; p: exact two-sided sign-flip test over the "
        f"{n} seeds, Holm-corrected over the {len(arms)} arm{'s' * (len(arms) > 1)}. "
        f"With {n} seeds no p can be below "
        f"{stats.min_sign_flip_pvalue(n):.4g} and no Holm-adjusted p below "
        f"{smallest_adjusted_p(n, len(arms)):.4g}. FLOPs/token: training FLOPs per token, 6 per "
        f"weight use plus the attention scores and mixing (12·L·H·p·T); in brackets what goes "
        f"beyond 6 per weight: the attention matmuls, and a tied matrix's second use.", "",
        *pairing_lines(diffs, ref_arm, n),
        f"| variant | params | FLOPs/token (beyond 6/weight) | lr | report loss | bits/byte | "
        f"Δ vs {ref_arm} [95% CI] | p (Holm) | rank at epoch "
        f"{' / '.join(f'{e:.2f}' for e, _ in ranks)} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v in plan["variants"]:
        s, rs = study[v], study[v]["runs"]
        f = plan["flops"][v]
        attn = f - 6 * plan["params"][v]
        if v in diffs:
            ds = diffs[v]
            delta = (f"{ds['mean']:+.4f} [{_fmt(ds['lo'], '+.4f')}, {_fmt(ds['hi'], '+.4f')}]")
            p = f"{ds['p_holm']:.3g}"
        else:
            delta, p = ("—", "—") if v == ref_arm else ("n/a", "n/a")
        lines.append(
            f"| {v} | {plan['params'][v]:,} | {f / 1e6:.2f}M ({attn / 1e6:.2f}M) | {lr_note(s)} | "
            f"{_mean_sd([r['report_loss'] for r in rs])} | "
            f"{_mean_sd([r['report_bpb'] for r in rs])} | {delta} | {p} | "
            f"{' / '.join(str(r[v]) for _, r in ranks)} |")
    lines += ["", f"Rank: by the mean selection-split loss of the curves (train.py's periodic "
                  f"evaluation) at the evaluation nearest each epoch; the ranking "
                  f"{'is the same at every one' if same else 'changes between them'}."]
    lines += equal_wall_clock_lines(plan, study)
    lines += [""] + grid_table(args, plan, study)
    contrasts = head_contrasts(study) if any("heads" in s for s in study.values()) else []
    # the pre-registered family needs both of its arms; without them every contrast is exploratory
    pair = head_pair(study)
    claim = claim_tests(contrasts, pair) if pair and all(v in study for v in pair) else []
    if claim:
        lines += ["", f"Head specialisation, the claim (docs/PRISM.md §5; analyze_heads.py on the "
                      f"report split): the signal-heads mean minus the noise-heads mean, averaged "
                      f"over layers, paired by seed; mean over the {n} report seeds with its 95% "
                      f"interval, exact sign-flip p, and p Holm-corrected over these "
                      f"{len(claim)} tests fixed in advance (the claim: log distances > 0, log "
                      f"centroid in band < 0).", "",
                  "| comparison | contrast | mean [95% CI] | p | p (Holm) |",
                  "|---|---|---:|---:|---:|"]
        for title, r, p in claim:
            lines.append(f"| {title} | {r['contrast']} | {r['mean']:+.3g} "
                         f"[{_fmt(r.get('lo'), '+.3g')}, {_fmt(r.get('hi'), '+.3g')}] | "
                         f"{_fmt(r['p'], '.3g')} | {_fmt(p, '.3g')} |")
    if contrasts:
        unrecorded = [v for v in plan["variants"]
                      if records_heads(v) and "heads" not in study[v]]
        lines += ["", f"Head specialisation, exploratory (every layer and measure; the mean over "
                      f"seeds of the contrast, or of its paired difference, with its 95% interval "
                      f"and exact sign-flip p over the {n} seeds, uncorrected)"
                  + (f"; {', '.join(unrecorded)} left out: their records have no heads.json"
                     if unrecorded else "") + ":"]
        for title, rows in contrasts:
            names = list(dict.fromkeys(r["contrast"] for r in rows))
            layers = list(dict.fromkeys(r["layer"] for r in rows))
            cell = {(r["layer"], r["contrast"]): r for r in rows}
            lines += ["", f"*{title}*", "", "| layer | " + " | ".join(names) + " |",
                      "|---|" + "---:|" * len(names)]
            for layer in layers:
                row = []
                for c in names:
                    r = cell.get((layer, c))
                    row.append("n/a" if r is None or r.get("mean") is None else
                               f"{r['mean']:+.3g} [{_fmt(r.get('lo'), '+.3g')}, "
                               f"{_fmt(r.get('hi'), '+.3g')}], p {_fmt(r.get('p'), '.3g')}")
                lines.append(f"| {layer} | " + " | ".join(row) + " |")
    lines += ["", f"![selection-split loss]({os.path.relpath(figure, Path(args.results).parent)})",
              ""]
    return "\n".join(lines)


def plot_curves(plan, study, path, title):
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    per_epoch = plan["tokens_per_iter"] / plan["data"]["train_tokens"]
    fig, ax = plt.subplots(figsize=(8, 5))
    lows = []
    for v, s in study.items():
        iters = sorted({it for c in s["curves"] for it, _ in c})
        vals = [[dict(c)[it] for c in s["curves"] if it in dict(c)] for it in iters]
        xs = [it * per_epoch for it in iters]
        line, = ax.plot(xs, [statistics.fmean(x) for x in vals], label=f"{v} (lr {s['lr']:g})",
                        linestyle="--" if records_heads(v) and v not in HEAD_ARMS else "-")
        ax.fill_between(xs, [min(x) for x in vals], [max(x) for x in vals],
                        color=line.get_color(), alpha=0.15)
        lows += [x for vs in vals[len(vals) // 3:] for x in vs]
    ax.set_xlabel("epochs of train.bin")
    ax.set_ylabel("selection-split loss (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if lows:  # the early, steep part would squash the differences that matter
        ax.set_ylim(min(lows) - 0.05, max(lows) + 0.05)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_section(path, section, body):
    """Put `body` between this section's markers in the markdown file, replacing an older one."""
    start, end = f"<!-- compare.py {section} -->", f"<!-- /compare.py {section} -->"
    path = Path(path)
    text = path.read_text() if path.is_file() else "# Results\n"
    block = f"{start}\n{body.rstrip()}\n{end}\n"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) + 1:]
    else:
        text = text.rstrip() + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# -----------------------------------------------------------------------------
# The dry run


def time_step(args, plan, variant, steps):
    """Seconds per training step and per evaluation batch of a variant, timed here on random
    tokens (after one untimed step): AdamW, the real model, batch size and block size."""


    arch, model_args = variant_args(args.preset, variant, plan["data"]["vocab_size"])
    torch.manual_seed(0)
    model = build_model(arch, **model_args)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    x = torch.randint(0, plan["data"]["vocab_size"],
                      (plan["budget"]["batch_size"], plan["budget"]["block_size"] + 1))

    def step():
        loss = model(x[:, :-1], x[:, 1:])[1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    train_s = (time.perf_counter() - t0) / steps
    t0 = time.perf_counter()
    with torch.no_grad():
        model(x[:, :-1], x[:, 1:])
    return train_s, time.perf_counter() - t0


def dry_run(args, plan):
    b, d, n = plan["budget"], plan["data"], len(plan["seeds"])
    arms = compared_arms(plan)
    grid = plan["grid"]
    grid_runs = len(grid) * len(plan["variants"])
    seed_runs = 0 if args.screen else n * len(plan["variants"])
    init_runs = n * len([v for v in plan["variants"] if v in HEAD_ARMS])
    print(f"arms ({len(plan['variants'])}; every one within ±5% of prism's parameters, "
          f"checked):")
    w = max(map(len, ["variant", *plan["variants"]]))
    print(f"  {'variant':{w}s} {'params':>11s} {'FLOPs/token':>12s} "
          f"(beyond 6/weight: attention, tied reuse)")
    for v in plan["variants"]:
        f = plan["flops"][v]
        print(f"  {v:{w}s} {plan['params'][v]:>11,} {f / 1e6:>11.2f}M "
              f"{(f - 6 * plan['params'][v]) / 1e6:>11.2f}M")
    print(f"learning-rate grid: {', '.join(f'{lr:g}' for lr in grid)} (x2 apart"
          + (", grows by x2 while the best is at an edge, by at most "
             f"{args.max_extensions} more rates" if len(grid) > 1 else ", one rate: no grid")
          + (", then x√2 either side of an interior best" if args.refine and len(grid) > 1
             else "")
          + f"), each at seed {plan['grid_seed']} for the full budget, scored on the whole "
          f"selection split (val.bin, {d['val_tokens']:,} tokens)"
          + ("" if len(grid) >= 5 else "; fewer than 5 rates: not the study's protocol"))
    if args.screen:
        n = 0
        print(f"screen: the grid at seed {plan['grid_seed']} only, one table of each arm's best "
              f"selection-split loss (no report seeds, no statistics)")
    else:
        print(f"report seeds: {', '.join(map(str, plan['seeds']))} ({n}), paired; the grid seed "
              f"{plan['grid_seed']} only picks the rate (its chosen run won a selection: not "
              f"reported)")
    print(f"per run: {b['iters']} iterations x {plan['tokens_per_iter']:,} tokens = "
          f"{b['iters'] * plan['tokens_per_iter']:,} tokens ({plan['epochs']:.2f} epochs of "
          f"{d['train_tokens']:,}), {b['evals']} curve evaluations of {b['eval_iters']} batches, "
          f"final score on every window of the report split (test.bin, {d['test_tokens']:,} "
          f"tokens)")
    init_runs = 0 if args.screen else init_runs
    print(f"runs: {grid_runs} grid + {seed_runs} report seeds = {grid_runs + seed_runs} trainings "
          f"(+ any grid extensions), and {init_runs} untrained checkpoints for the head analysis "
          f"of {', '.join(v for v in plan['variants'] if v in HEAD_ARMS) or 'none'}")
    if not args.screen:
        min_p = smallest_adjusted_p(n, len(arms))
        print(f"statistics: {len(arms)} arms against {plan['reference']}; with {n} seeds the exact "
              f"sign-flip p is at least {stats.min_sign_flip_pvalue(n):.4g} and the Holm-adjusted "
              f"p at least {min_p:.4g}" + (" — below 0.05: the study can decide" if min_p < 0.05
                                           else " — NOT below 0.05: add seeds, or no arm can be "
                                                "called different"))
    print(f"records: {plan['records']}/<variant>/lr<lr>/seed<seed>/ (summary.json, log.jsonl, "
          f"heads.json); checkpoints: {plan['runs']}/")
    if args.time_steps > 0:
        total = 0.0
        for v in plan["variants"]:
            train_s, eval_s = time_step(args, plan, v, args.time_steps)
            final_batches = sum(math.ceil((d[f"{s}_tokens"] - 1) // b["block_size"]
                                          / b["batch_size"]) for s in ("val", "test"))
            run_s = (b["iters"] * train_s
                     + eval_s * ((b["evals"] + 1) * 2 * b["eval_iters"] + final_batches))
            total += run_s * (len(grid) + n)
            print(f"  {v:{w}s} {train_s * 1000:7.0f} ms/step -> {run_s / 60:6.1f} min per run")
        done = sum(1 for v in plan["variants"] for p in (plan["records"] / v).glob(
            "lr*/seed*/summary.json"))
        print(f"estimated time: {total / 3600:.1f} h in one process (timed {args.time_steps} "
              f"steps of each arm here, {os.environ.get('OMP_NUM_THREADS', 'default')} "
              f"OMP threads: steps x iterations + evaluation batches at one forward each; head "
              f"analyses and grid extensions not counted; {done} runs already recorded). Runs are "
              f"independent: k processes with disjoint --archs take about 1/k of it.")
    print("dry run: the plan checks out; nothing trained")


# -----------------------------------------------------------------------------


def run(args):
    plan = make_plan(args)
    if args.dry_run:
        dry_run(args, plan)
        return plan
    print(f"{'report from the records of' if args.report_only else 'study'}: preset "
          f"{args.preset}, {len(plan['variants'])} arms x {len(plan['seeds'])} "
          f"seeds, {plan['budget']['iters']} iters x {plan['tokens_per_iter']:,} tokens, grid "
          f"{', '.join(f'{lr:g}' for lr in plan['grid'])} -> {plan['records']}", flush=True)
    section = args.section or (args.preset + (" screen" if args.screen else "")
                               + ("" if args.reference in (None, REFERENCE)
                                  else f" vs {args.reference}"))
    if args.screen:
        study = {v: choose_arm_lr(args, plan, v) for v in plan["variants"]}
        write_section(args.results, section, screen_report(args, plan, study))
        print(f"wrote {args.results}")
        return plan
    study = run_study(args, plan)
    slug = "".join(c if c.isalnum() or c in "-." else "_" for c in section)
    figure = Path(args.figure or Path(args.results).parent / f"compare_{slug}.png")
    plot_curves(plan, study, figure, f"{args.preset}: selection-split loss at each arm's chosen "
                                     f"rate, mean over seeds (band: min to max)")
    write_section(args.results, section, report(args, plan, study, figure))
    print(f"wrote {args.results} and {figure}")
    return plan


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.dry_run and args.report_only:
        print("error: --dry_run and --report_only exclude each other", file=sys.stderr)
        raise SystemExit(1)
    try:
        run(args)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
