"""
The fair comparison (PRISM.md §7): PRISM against GPT-2 and Gemma 3 style models of the same
parameter count, and PRISM's ablations, on the same data, in the same order, with the same
optimizer, schedule and token budget; then the table, the loss curves and the head analysis.

    python compare.py --data_dir=data/sample4k --preset=cpu-small --tokens=2000000 --seeds=1,2,3
    python compare.py --data_dir=data/sample4k --preset=cpu-small --archs=prism,prism-pi-off --dry_run

Every run is train.py's train() and every head analysis is analyze_heads.py: nothing here trains
or evaluates on its own. For each variant (baselines.VARIANTS) it
  1. picks a learning rate: the best final val loss of a short sweep over --lrs at the first seed
     (--sweep_tokens each), or --lr for all;
  2. trains one run per seed with that rate; a seed fixes both the initialisation and the data
     order, so every variant sees the same batches;
  3. analyses the heads of PRISM and its π-off ablation (bimodality, signal vs noise distance).
Runs live under --out_dir/<preset>/...; a run with a summary.json is done and is not redone, one
with only a checkpoint resumes. The results go to --results (a section of its own, replaced when
compare.py runs again for the same preset) and the curves to docs/compare_<preset>.png.
"""

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

from baselines import PRESETS, VARIANTS, check_preset, count_params, variant_args

PAIRED_FOR_HEADS = ("prism", "prism-pi-off")  # the claim: regimes with π-RoPE, weaker without


class CompareError(Exception):
    """A plan that cannot run, reported as one `error: ...` line."""


def build_parser():
    p = argparse.ArgumentParser(
        description="Train every arch and ablation on the same data, seeds, optimizer and "
                    "schedule, then write the comparison table, loss curves and head analysis.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_dir", default="data/tinystories", help="prepared data (meta.json, *.bin)")
    p.add_argument("--preset", default="cpu-small", choices=sorted(PRESETS), help="model sizes")
    p.add_argument("--tokens", type=int, default=2_000_000, help="training tokens per run")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated seeds, one run each")
    p.add_argument("--archs", default=",".join(VARIANTS),
                   help="comma-separated variants of baselines.VARIANTS")
    p.add_argument("--batch_size", type=int, default=16, help="sequences per iteration")
    p.add_argument("--lr", type=float, default=None, help="one learning rate for all: no sweep")
    p.add_argument("--lrs", default="1e-3,3e-3,1e-2", help="learning rates the sweep tries")
    p.add_argument("--sweep_tokens", type=int, default=0,
                   help="tokens per sweep run; 0 = a quarter of --tokens")
    p.add_argument("--evals", type=int, default=10, help="evaluations along each run (the curve)")
    p.add_argument("--eval_iters", type=int, default=20, help="batches per evaluation")
    p.add_argument("--analysis_batches", type=int, default=8, help="batches analyze_heads reads")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... or auto")
    p.add_argument("--out_dir", default="runs/compare", help="where the runs go")
    p.add_argument("--results", default="docs/RESULTS.md", help="markdown file to write into")
    p.add_argument("--dry_run", action="store_true",
                   help="check the plan (data, sizes, budgets, paths) and print it; train nothing")
    return p


def _floats(text, name):
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CompareError(f"--{name} must be comma-separated numbers, got {text!r}") from None


def make_plan(args):
    """Everything the comparison will do, checked before anything trains."""
    meta_path = Path(args.data_dir) / "meta.json"
    if not meta_path.is_file():
        raise CompareError(f"no meta.json in {args.data_dir}: run prepare_tinystories.py first")
    meta = json.loads(meta_path.read_text())
    try:
        check_preset(args.preset, meta["vocab_size"])
        variants = [v for v in args.archs.split(",") if v]
        for v in variants:
            variant_args(args.preset, v, meta["vocab_size"])
    except ValueError as e:
        raise CompareError(str(e)) from None
    seeds = [int(s) for s in _floats(args.seeds, "seeds")]
    lrs = [args.lr] if args.lr else _floats(args.lrs, "lrs")
    if not seeds or not lrs or not variants:
        raise CompareError("need at least one seed, one learning rate and one arch")
    block_size = PRESETS[args.preset]["block_size"]
    tokens_per_iter = args.batch_size * block_size
    iters = args.tokens // tokens_per_iter
    sweep_iters = (args.sweep_tokens or args.tokens // 4) // tokens_per_iter
    if iters < args.evals or (len(lrs) > 1 and sweep_iters < 1):
        raise CompareError(f"--tokens={args.tokens:,} is {iters} iterations of {tokens_per_iter:,} "
                           f"tokens: too few for {args.evals} evaluations (and a sweep)")
    for split in ("train", "val"):
        n = meta[f"{split}_tokens"]
        if n <= block_size + 1:
            raise CompareError(f"{split}.bin has {n} tokens, too few for block_size {block_size}")
    root = Path(args.out_dir) / args.preset
    return dict(meta=meta, variants=variants, seeds=seeds, lrs=lrs, iters=iters,
                sweep_iters=sweep_iters, tokens_per_iter=tokens_per_iter, root=root,
                params={v: count_params(*variant_args(args.preset, v, meta["vocab_size"]))
                        for v in variants})


def run_once(args, plan, variant, lr, seed, iters, run_dir):
    """train.train() for one run, unless it is done already; returns its summary."""
    import train  # noqa: PLC0415 — torch and the training loop only when something trains

    done = run_dir / "summary.json"
    if done.is_file():
        summary = json.loads(done.read_text())
        if summary["iters"] != iters:
            raise CompareError(f"{run_dir} holds a finished run of {summary['iters']} iterations, "
                               f"not {iters}: give this budget another --out_dir")
        return summary
    arch, model_args = variant_args(args.preset, variant, plan["meta"]["vocab_size"])
    model_args.pop("vocab_size")  # train.py takes it from meta.json
    cfg = train.TrainConfig(
        data_dir=args.data_dir, out_dir=str(run_dir), arch=arch, batch_size=args.batch_size,
        max_iters=iters, learning_rate=lr, min_lr=lr / 10, warmup_iters=max(1, iters // 20),
        eval_interval=max(1, iters // args.evals), eval_iters=args.eval_iters,
        log_interval=max(1, iters // args.evals), seed=seed, device=args.device,
        init_from="resume" if (run_dir / "ckpt.pt").is_file() else "scratch")
    print(f"\n== {variant} | lr {lr:g} | seed {seed} | {iters} iters -> {run_dir}", flush=True)
    summary = dict(train.train(cfg, model_args), variant=variant, lr=lr, seed=seed)
    done.write_text(json.dumps(summary, indent=2))
    return summary


def pick_learning_rates(args, plan):
    """{variant: lr}: the sweep's best final val loss at the first seed (or the one given)."""
    if len(plan["lrs"]) == 1:
        return {v: plan["lrs"][0] for v in plan["variants"]}, {}
    sweep = {}
    for v in plan["variants"]:
        sweep[v] = {lr: run_once(args, plan, v, lr, plan["seeds"][0], plan["sweep_iters"],
                                 plan["root"] / "sweep" / v / f"lr{lr:g}")["val_loss"]
                    for lr in plan["lrs"]}
    return {v: min(losses, key=losses.get) for v, losses in sweep.items()}, sweep


def analyze(args, run_dir):
    """analyze_heads.py on a run's checkpoint; its heads.json."""
    import analyze_heads  # noqa: PLC0415

    out = run_dir / "analysis"
    if not (out / "heads.json").is_file():
        status = analyze_heads.main([f"--ckpt={run_dir / 'ckpt.pt'}", f"--data_dir={args.data_dir}",
                                     f"--out_dir={out}", f"--num_batches={args.analysis_batches}",
                                     f"--device={args.device}", "--no_progress"])
        if status:
            raise CompareError(f"analyze_heads.py failed on {run_dir / 'ckpt.pt'} (see above)")
    return json.loads((out / "heads.json").read_text())


def mean_spread(values):
    """'mean ± sample std' (just the mean for one value), and the mean."""
    values = [v for v in values if v is not None]
    if not values:
        return "n/a", None
    m = statistics.fmean(values)
    return (f"{m:.4g} ± {statistics.stdev(values):.2g}" if len(values) > 1 else f"{m:.4g}"), m


def read_curve(run_dir):
    """(tokens, val_loss) along a run, from its log.jsonl."""
    points = []
    for line in (run_dir / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("val_loss") is not None:
            points.append((rec["iter"], rec["val_loss"]))
    return points


def plot_curves(curves, tokens_per_iter, path, title):
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(8, 5))
    for variant, runs in curves.items():
        iters = sorted({it for run in runs for it, _ in run})
        per_iter = [[dict(run).get(it) for run in runs] for it in iters]
        keep = [(it, [v for v in vs if v is not None]) for it, vs in zip(iters, per_iter)]
        keep = [(it, vs) for it, vs in keep if vs]
        xs = [it * tokens_per_iter / 1e6 for it, _ in keep]
        line, = ax.plot(xs, [statistics.fmean(vs) for _, vs in keep], label=variant,
                        linestyle="-" if variant in ("prism", "gpt2", "gemma3") else "--")
        ax.fill_between(xs, [min(vs) for _, vs in keep], [max(vs) for _, vs in keep],
                        color=line.get_color(), alpha=0.15)
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    lows = [v for runs in curves.values() for run in runs for _, v in run[len(run) // 3:]]
    if lows:  # the early, steep part would squash the differences that matter
        ax.set_ylim(min(lows) - 0.05, max(lows) + 0.05)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_section(path, preset, body):
    """Put `body` between this preset's markers in the markdown file, replacing an older one."""
    start, end = f"<!-- compare.py {preset} -->", f"<!-- /compare.py {preset} -->"
    path = Path(path)
    text = path.read_text() if path.is_file() else "# Results\n"
    block = f"{start}\n{body.rstrip()}\n{end}\n"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) + 1:]
    else:
        text = text.rstrip() + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def report(args, plan, lrs, sweep, runs, heads, figure):
    meta = plan["meta"]
    lines = [
        f"## Comparison at preset `{args.preset}`",
        "",
        f"Command: `{args.command}`",
        "",
        f"Data: `{args.data_dir}` ({meta['train_tokens']:,} train / {meta['val_tokens']:,} val "
        f"tokens, vocabulary {meta['vocab_size']:,}). Every run: {plan['iters']} iterations of "
        f"{plan['tokens_per_iter']:,} tokens ({plan['iters'] * plan['tokens_per_iter']:,} tokens), "
        f"AdamW, warmup + cosine to lr/10, seeds {', '.join(map(str, plan['seeds']))} "
        f"(a seed fixes the initialisation and the data order). Values are mean ± sample standard "
        f"deviation over seeds; tokens/s is the training throughput on this machine.",
        "",
        "| variant | params | lr | val loss | perplexity | bits/byte | tokens/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for v in plan["variants"]:
        rs = runs[v]
        loss, _ = mean_spread([r["val_loss"] for r in rs])
        ppl, _ = mean_spread([math.exp(r["val_loss"]) for r in rs])
        bpb, _ = mean_spread([r["val_bpb"] for r in rs])
        _, tps = mean_spread([r.get("tokens_per_sec") for r in rs])
        lines.append(f"| {v} | {plan['params'][v]:,} | {lrs[v]:g} | {loss} | {ppl} | {bpb} | "
                     + (f"{tps:,.0f} |" if tps else "n/a |"))
    if sweep:
        lines += ["", f"Learning-rate sweep (final val loss at seed {plan['seeds'][0]}, "
                      f"{plan['sweep_iters']} iterations each):", "",
                  "| variant | " + " | ".join(f"lr {lr:g}" for lr in plan["lrs"]) + " |",
                  "|---|" + "---:|" * len(plan["lrs"])]
        for v, losses in sweep.items():
            lines.append(f"| {v} | " + " | ".join(f"{losses[lr]:.4f}" for lr in plan["lrs"]) + " |")
    if heads:
        lines += ["", "Head analysis (analyze_heads.py on each seed's final checkpoint; mean "
                      "attention distance in tokens by designed head group):", "",
                  "| variant | bimodality | signal-head distance | noise-head distance |",
                  "|---|---:|---:|---:|"]
        for v, results in heads.items():
            bim, _ = mean_spread([h.get("bimodality") for h in results])
            dist = {g: mean_spread([h["summary"].get(f"group={g}", {}).get("mean_distance")
                                    for h in results])[0] for g in ("signal", "noise")}
            lines.append(f"| {v} | {bim} | {dist['signal']} | {dist['noise']} |")
    lines += ["", f"![validation loss]({os.path.relpath(figure, Path(args.results).parent)})", ""]
    return "\n".join(lines)


def run(args):
    plan = make_plan(args)
    print(f"plan: preset {args.preset}, {len(plan['variants'])} variants x "
          f"{len(plan['seeds'])} seeds, {plan['iters']} iters x {plan['tokens_per_iter']:,} tokens"
          + (f", lr sweep over {plan['lrs']} ({plan['sweep_iters']} iters each)"
             if len(plan["lrs"]) > 1 else f", lr {plan['lrs'][0]:g}"))
    for v in plan["variants"]:
        print(f"  {v:16s} {plan['params'][v]:>12,} params -> {plan['root'] / v}")
    if args.dry_run:
        print("dry run: the plan checks out; nothing trained")
        return plan
    lrs, sweep = pick_learning_rates(args, plan)
    runs, curves, heads = {}, {}, {}
    for v in plan["variants"]:
        dirs = [plan["root"] / v / f"seed{s}" for s in plan["seeds"]]
        runs[v] = [run_once(args, plan, v, lrs[v], s, plan["iters"], d)
                   for s, d in zip(plan["seeds"], dirs)]
        curves[v] = [read_curve(d) for d in dirs]
        if v in PAIRED_FOR_HEADS:
            heads[v] = [analyze(args, d) for d in dirs]
    figure = Path(args.results).parent / f"compare_{args.preset}.png"
    plot_curves(curves, plan["tokens_per_iter"], figure,
                f"{args.preset}: validation loss, mean over seeds (band: min to max)")
    write_section(args.results, args.preset, report(args, plan, lrs, sweep, runs, heads, figure))
    print(f"wrote {args.results} and {figure}")
    return plan


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.command = " ".join(["python compare.py", *argv])
    try:
        run(args)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
