"""
Speed and memory of every arch, side by side, and how they grow with context.

For each arch (any name in lab.variants.VARIANTS, white-box variants included) and each context
length T it builds the model at a size preset (lab.variants.PRESETS) with block_size = T, and
times one training
step on random tokens:

    step = forward + backward of the mean cross-entropy on a (batch_size, T) batch of random token
           ids (gradients set to None before each step, so nothing accumulates);
           with --optimizer also an AdamW step (model.configure_optimizers).

The first --warmup steps (compilation included, with --compile) are not timed; step_ms is the
median of the --steps timed ones (and of all --repeats). tokens_per_sec = batch_size·T / step.
The table also shows "cpu ms", the median CPU time (time.process_time) per step: on a CPU shared
with other jobs and --threads=1 it is the steadier number, since time spent waiting for a core is
not counted. Before the sweep an unrecorded run of the first configuration primes the machine
(--no_prime skips it). --repeats=N measures every configuration in N fresh processes, round-robin,
so that a busy spell on the machine is spread over all the archs instead of hitting one.

CPU threads: with --threads=0 torch uses all cores. On a machine whose cores are busy with other
work, OpenMP threads wait on each other at every operator (a 14 ms step measured 1.2 s with two
threads on two busy cores); there, --threads=1 is the meaningful setting.

Peak memory. CUDA: torch.cuda.max_memory_allocated over the timed steps. CPU: the max RSS of the
process (getrusage ru_maxrss). Max RSS only ever grows within a process, so every configuration is
measured in a fresh Python subprocess (`python -c "from lab import bench; bench.worker(...)"`):
its peak is its own. The CPU peak includes Python, torch and the interpreter (base_mem_mb, the RSS just before
the model is built, says how much); the table shows both.

MFU (GPU only): model.estimate_mfu(batch_size, step) against the GPU's own dense peak for the
compute dtype (train.GPU_PEAK_TFLOPS; float32 counts as TF32, which bench.py enables), or
--peak_tflops; a GPU that the table does not know gets no MFU ("-"). The record
keeps the peak used (peak_tflops) and the GPU's name (gpu). On every device the table also shows
the achieved model FLOP rate, flops_per_token() · tokens / step (6 FLOPs per weight plus the
attention matmuls), and each arch's step time and FLOPs relative to --ref (gpt2 by default) at the
same T: a time ratio above the FLOP ratio is implementation overhead, the FLOP ratio itself is the
architecture.

The prepare step's throughput is its own line: prepare_tinystories.tokenize_files (one thread,
into a temporary folder) on --prepare_file, in MB of text per second (tiktoken must find its GPT-2
files: on an offline machine set TIKTOKEN_CACHE_DIR), median of three runs. --prepare_file=''
skips the line.

Output: one table on stdout; with --json=PATH one JSON object per line (JSON Lines): a record per
measurement ("kind": "train_step"; keys arch, block_size, params, step_ms, tokens_per_sec,
peak_mem_mb, mfu, ...) and one for the prepare step ("kind": "prepare"). A configuration that fails
or runs past --timeout is reported as such (an "error" key) and the others still run.

Examples, from the repository's root (the first two made the tables in lab/RESULTS.md):
$ python -m lab.bench --vocab_size=4097 --threads=1 --steps=5 --warmup=1 --repeats=3 \
      --json=cpu.jsonl
$ python -m lab.bench --preset=paper-50m --block_sizes=128,256,512 --batch_size=2 --threads=1 \
      --steps=3 --warmup=1 --repeats=2
$ python -m lab.bench                     # cpu-small, prism,gpt2,gemma3, T 128…2048
$ python -m lab.bench --archs=prism,prism-white-ista,rope-attention --block_sizes=512
$ python -m lab.bench --archs=prism,gpt2 --block_sizes=512 --profile  # torch.profiler tables
$ python -m lab.bench --preset=paper-50m --block_sizes=512 --device=cuda --compile --batch_size=16
"""
import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import prepare_tinystories as prep

REPO = Path(__file__).resolve().parent.parent
# Text for the prepare line when --prepare_file is not given: the first of these that exists.
PREPARE_CANDIDATES = (REPO / "data" / "sample" / "raw" / "tinystories-sample-train.txt",
                      REPO / "data" / "tinystories" / "raw" / "TinyStoriesV2-GPT4-valid.txt")

REQUIRED_KEYS = ("arch", "block_size", "params", "step_ms", "tokens_per_sec", "peak_mem_mb")


class BenchError(Exception):
    """A bad argument: main() prints it as one line."""


# -----------------------------------------------------------------------------
# arguments


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_list(text, what):
    items = [s.strip() for s in text.split(",")]
    if not text.strip() or any(not s for s in items):
        raise BenchError(f"--{what}: expected a comma-separated list, got {text!r}")
    return list(dict.fromkeys(items))  # drop repeats, keep the order


def parse_block_sizes(text):
    sizes = []
    for s in parse_list(text, "block_sizes"):
        try:
            n = int(s)
        except ValueError:
            n = 0
        if n <= 0:
            raise BenchError(f"--block_sizes: {s!r} is not a positive integer "
                             f"(expected e.g. 128,256,512)")
        sizes.append(n)
    return sizes


def build_parser():
    from lab import variants  # torch loads only once the arguments are parsed

    p = _OneLineParser(
        prog="python -m lab.bench",
        description="Forward+backward step time, tokens/s, peak memory, parameters and MFU of "
                    "each arch at each context length, side by side (one fresh process per "
                    "configuration), plus the prepare step's tokenisation throughput.",
        epilog="Examples are in the module docstring (python -c 'from lab import bench; "
               "help(bench)').")
    p.add_argument("--preset", default="cpu-small", choices=sorted(variants.PRESETS),
                   help="size preset of lab.variants.PRESETS (default: %(default)s)")
    p.add_argument("--archs", default="prism,gpt2,gemma3",
                   help="comma-separated names from lab.variants.VARIANTS: "
                        f"{', '.join(variants.VARIANTS)} (default: %(default)s)")
    p.add_argument("--block_sizes", default="128,256,512,1024,2048",
                   help="comma-separated context lengths; each model is built with block_size = "
                        "T (default: %(default)s)")
    p.add_argument("--vocab_size", type=int, default=50257,
                   help="vocabulary size (default: %(default)s, GPT-2 BPE; 4097 is the compact "
                        "vocabulary of the CPU experiments)")
    p.add_argument("--batch_size", type=int, default=8,
                   help="sequences per step (default: %(default)s)")
    p.add_argument("--steps", type=int, default=10,
                   help="timed steps per configuration (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps before them (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=1,
                   help="measure each configuration in this many fresh processes, round-robin "
                        "over the configurations, and take the median over all their steps "
                        "(tames a busy machine; default: %(default)s)")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:N, ... (default: auto = cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype; bfloat16/float16 run under torch.autocast with float32 "
                        "weights (default: auto = bfloat16 on CUDA when supported, else float32)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (compilation happens in the warm-up steps)")
    p.add_argument("--optimizer", action="store_true",
                   help="include an AdamW step in the timed step "
                        "(default: forward + backward only)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads per measurement (default: 0 = torch's default)")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="device peak for MFU in TFLOP/s (default: the GPU's dense peak for the "
                        "dtype, from train.GPU_PEAK_TFLOPS); MFU is reported on CUDA only")
    p.add_argument("--ref", default=None,
                   help="arch the others are compared against at each T "
                        "(default: gpt2 if benchmarked, else the first arch)")
    p.add_argument("--no_prime", action="store_true",
                   help="skip the unrecorded priming run of the first configuration (on a VM the "
                        "first process after a pause pays for faulting memory in)")
    p.add_argument("--timeout", type=float, default=0,
                   help="seconds one configuration may take before it is given up "
                        "(default: 0 = no limit)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="write one JSON record per measurement (JSON Lines) to PATH")
    p.add_argument("--prepare_file", default=None,
                   help="text file whose tokenisation throughput is measured; '' skips it "
                        "(default: the first that exists of data/sample/raw/tinystories-sample-"
                        "train.txt, from prepare_tinystories.py --sample, and data/tinystories/"
                        "raw/TinyStoriesV2-GPT4-valid.txt, both in the repository's root)")
    p.add_argument("--profile", action="store_true",
                   help="after timing, run torch.profiler over 2 steps of each configuration and "
                        "print its top operators")
    p.add_argument("--profile_rows", type=int, default=15,
                   help="operators listed per profile (default: %(default)s)")
    return p


def parse_args(argv=None):
    from lab import variants

    p = build_parser()
    args = p.parse_args(argv)
    try:
        args.archs = parse_list(args.archs, "archs")
        for name in args.archs:
            if name not in variants.VARIANTS:
                raise BenchError(f"--archs: unknown arch {name!r}; choose from "
                                 f"{', '.join(variants.VARIANTS)}")
        args.block_sizes = parse_block_sizes(args.block_sizes)
        for name in ("vocab_size", "batch_size", "steps", "repeats"):
            if getattr(args, name) < 1:
                raise BenchError(f"--{name} must be at least 1, got {getattr(args, name)}")
        if args.warmup < 0 or args.threads < 0 or args.timeout < 0 or args.profile_rows < 1:
            raise BenchError("--warmup, --threads and --timeout must be >= 0, --profile_rows >= 1")
        if args.ref is None:
            args.ref = "gpt2" if "gpt2" in args.archs else args.archs[0]
        elif args.ref not in args.archs:
            raise BenchError(f"--ref {args.ref!r} is not among --archs ({', '.join(args.archs)})")
    except BenchError as e:
        p.error(str(e))
    return args


# -----------------------------------------------------------------------------
# one measurement (runs in its own process)


def _resolve_device_dtype(device, dtype):
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    if dtype == "auto":
        dtype = ("bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported()
                 else "float32")
    return device, device_type, dtype


def _max_rss_mb():
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def measure(cfg):
    """Time one configuration in this process; returns its record (see the module docstring).
    cfg: preset, arch, block_size, vocab_size, batch_size, steps, warmup, device, dtype, compile,
    optimizer, threads, peak_tflops, profile, profile_rows."""
    import torch

    from lab import variants
    from model import build_model
    from train import gpu_peak_flops

    device, device_type, dtype = _resolve_device_dtype(cfg["device"], cfg["dtype"])
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    T, B = cfg["block_size"], cfg["batch_size"]
    arch, model_args = variants.variant_args(cfg["preset"], cfg["arch"], cfg["vocab_size"])
    model_args["block_size"] = T
    base_mem = _max_rss_mb() if device_type != "cuda" else 0.0

    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):  # the parameter report
        model = build_model(arch, **model_args)
    model.to(device).train()
    params, flops_per_token = model.get_num_params(), model.flops_per_token()
    step_model = torch.compile(model) if cfg.get("compile") else model
    optimizer = (model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), device_type)
                 if cfg.get("optimizer") else None)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, cfg["vocab_size"], (B, T), generator=g).to(device)
    targets = torch.randint(0, cfg["vocab_size"], (B, T), generator=g).to(device)
    autocast = (torch.autocast(device_type, dtype=getattr(torch, dtype)) if dtype != "float32"
                else contextlib.nullcontext())
    sync = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)

    def step():
        for p in model.parameters():
            p.grad = None
        with autocast:
            _, loss = step_model(idx, targets)
        loss.backward()
        if optimizer is not None:
            optimizer.step()

    for _ in range(cfg["warmup"]):
        step()
    sync()
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    wall, cpu = [], []
    for _ in range(cfg["steps"]):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        sync()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    if device_type == "cuda":
        peak_mem = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mem = _max_rss_mb()
    dt = statistics.median(wall)
    peak_flops = None
    if device_type == "cuda":
        peak_flops = (cfg["peak_tflops"] * 1e12 if cfg.get("peak_tflops")
                      else gpu_peak_flops(torch.cuda.get_device_name(device), dtype))
    record = {
        "kind": "train_step", "arch": cfg["arch"], "model_arch": arch, "preset": cfg["preset"],
        "block_size": T, "batch_size": B, "vocab_size": cfg["vocab_size"], "params": params,
        "step_ms": 1000 * dt, "tokens_per_sec": B * T / dt, "peak_mem_mb": peak_mem,
        "base_mem_mb": base_mem,
        "mfu": model.estimate_mfu(B, dt, peak_flops=peak_flops) if peak_flops else None,
        "flops_per_token": flops_per_token,
        "peak_tflops": peak_flops / 1e12 if peak_flops else None,
        "gpu": torch.cuda.get_device_name(device) if device_type == "cuda" else None,
        "achieved_tflops": flops_per_token * B * T / dt / 1e12,
        "step_ms_all": [1000 * t for t in wall], "cpu_ms_median": 1000 * statistics.median(cpu),
        "device": device, "dtype": dtype, "compile": bool(cfg.get("compile")),
        "optimizer": bool(cfg.get("optimizer")), "threads": torch.get_num_threads(),
        "steps": cfg["steps"], "warmup": cfg["warmup"], "torch": torch.__version__,
    }
    if cfg.get("profile"):
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == "cuda"
                                               else [])
        with profile(activities=activities) as prof:
            for _ in range(2):
                step()
            sync()
        sort = "self_cuda_time_total" if device_type == "cuda" else "self_cpu_time_total"
        record["profile"] = prof.key_averages().table(sort_by=sort, row_limit=cfg["profile_rows"])
    return record


def worker(cfg_json, out_path):
    """Entry point of the measuring subprocess: measure(cfg) written to out_path as JSON."""
    record = measure(json.loads(cfg_json))
    with open(out_path, "w") as f:
        json.dump(record, f)


def run_isolated(cfg, timeout=0):
    """measure(cfg) in a fresh Python process; a failure or timeout becomes an "error" record."""
    fd, out_path = tempfile.mkstemp(prefix="bench-", suffix=".json")
    os.close(fd)
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from lab import bench; "
            "bench.worker(sys.argv[1], sys.argv[2])")
    try:
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(cfg), out_path],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              check=False, timeout=timeout or None)
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            why = lines[-1] if lines else f"exit status {proc.returncode}"
            if proc.returncode < 0:
                why = f"killed by signal {-proc.returncode} (out of memory?)"
            return {"error": why}
        with open(out_path) as f:
            return json.load(f)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:g} s"}
    finally:
        os.remove(out_path)


def combine(runs):
    """One record from the repeats of a configuration: the median over all their timed steps."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[-1]
    rec = dict(ok[0])
    rec.pop("profile", None)
    walls = [t for r in ok for t in r["step_ms_all"]]
    dt = statistics.median(walls) / 1000
    B, T = rec["batch_size"], rec["block_size"]
    rec.update(step_ms=1000 * dt, tokens_per_sec=B * T / dt, step_ms_all=walls,
               achieved_tflops=rec["flops_per_token"] * B * T / dt / 1e12,
               peak_mem_mb=max(r["peak_mem_mb"] for r in ok),
               base_mem_mb=statistics.median(r["base_mem_mb"] for r in ok),
               cpu_ms_median=statistics.median(r["cpu_ms_median"] for r in ok),
               step_ms_runs=[statistics.median(r["step_ms_all"]) for r in ok],
               repeats=len(ok))
    if rec["mfu"] is not None:  # what model.estimate_mfu gives for the combined step time
        rec["mfu"] = rec["flops_per_token"] * B * T / dt / (rec["peak_tflops"] * 1e12)
    return rec


# -----------------------------------------------------------------------------
# the prepare step


def prepare_throughput(path):
    """Tokenisation throughput on the text file at path: a "prepare" record."""
    prep.get_encoder()  # loading the BPE files is not tokenising: as in its own timing
    times = []
    with tempfile.TemporaryDirectory() as out_dir:
        for _ in range(3):  # a small file takes a fraction of a second: median of three
            t0 = time.perf_counter()
            meta = prep.tokenize_files(str(path), None, out_dir, threads=1, progress=False)
            times.append(time.perf_counter() - t0)
    seconds, size = statistics.median(times), os.path.getsize(path)
    return {"kind": "prepare", "file": str(path), "bytes": size, "seconds": seconds,
            "tokens": meta["train_tokens"] + meta["val_tokens"],
            "mb_per_sec": size / 1e6 / max(seconds, 1e-9),
            "source": ("prepare_tinystories.tokenize_files (threads=1; reads, splits, encodes with "
                       "tiktoken gpt2 and writes train.bin / val.bin)")}


# -----------------------------------------------------------------------------
# report


def _fmt(x, spec, missing="-"):
    return missing if x is None else format(x, spec)


def format_table(records, ref):
    """The results as a fixed-width text table; ratios are against `ref` at the same T."""
    by_key = {(r["arch"], r["block_size"]): r for r in records}
    head = ("arch", "T", "params", "step ms", "cpu ms", f"x{ref}", "tok/s", "peak MB",
            "base MB", "GFLOP/s", f"FLOPs x{ref}", "MFU")
    rows = []
    for r in records:
        if "error" in r:
            rows.append((r["arch"], str(r["block_size"]), f"error: {r['error']}"))
            continue
        other = by_key.get((ref, r["block_size"]))
        ok = other is not None and "error" not in other
        rows.append((
            r["arch"], str(r["block_size"]), f"{r['params'] / 1e6:.2f}M", f"{r['step_ms']:.1f}",
            f"{r['cpu_ms_median']:.1f}", f"{r['step_ms'] / other['step_ms']:.2f}" if ok else "-",
            f"{r['tokens_per_sec']:,.0f}", f"{r['peak_mem_mb']:,.0f}",
            f"{r['base_mem_mb']:,.0f}" if r["base_mem_mb"] else "-",
            f"{1000 * r['achieved_tflops']:.1f}",
            f"{r['flops_per_token'] / other['flops_per_token']:.2f}" if ok else "-",
            _fmt(r["mfu"] and 100 * r["mfu"], ".1f") + ("%" if r["mfu"] is not None else ""),
        ))
    widths = [max(len(head[i]), *(len(row[i]) for row in rows if len(row) == len(head)))
              for i in range(len(head))]
    lines = ["  ".join(h.rjust(w) if i else h.ljust(w)
                       for i, (h, w) in enumerate(zip(head, widths)))]
    for row in rows:
        if len(row) != len(head):
            lines.append(f"{row[0].ljust(widths[0])}  {row[1].rjust(widths[1])}  {row[2]}")
        else:
            lines.append("  ".join(c.rjust(w) if i else c.ljust(w)
                                   for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    device, _, dtype = _resolve_device_dtype(args.device, args.dtype)
    configs = [dict(preset=args.preset, arch=arch, block_size=T, vocab_size=args.vocab_size,
                    batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
                    device=device, dtype=dtype, compile=args.compile, optimizer=args.optimizer,
                    threads=args.threads, peak_tflops=args.peak_tflops, profile=args.profile,
                    profile_rows=args.profile_rows)
               for T in args.block_sizes for arch in args.archs]
    print(f"bench: preset {args.preset}, vocab {args.vocab_size}, batch {args.batch_size}, "
          f"{args.warmup} warm-up + {args.steps} timed steps x {args.repeats} repeat(s), "
          f"{device} {dtype}{' compiled' if args.compile else ''}, step = forward + backward"
          f"{' + AdamW' if args.optimizer else ''}; one fresh process per configuration",
          file=sys.stderr)
    if not args.no_prime:  # first-touch costs land here, not on the first recorded arch
        t0 = time.perf_counter()
        rec = run_isolated(dict(configs[0], steps=1, warmup=1, profile=False), args.timeout)
        print(f"[prime] {configs[0]['arch']} T={configs[0]['block_size']}: not recorded "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    runs = {i: [] for i in range(len(configs))}
    for rep in range(args.repeats):
        for i, cfg in enumerate(configs):
            t0 = time.perf_counter()
            rec = run_isolated(cfg, args.timeout)
            runs[i].append(rec)
            what = (f"error: {rec['error']}" if "error" in rec else
                    f"{rec['step_ms']:.1f} ms/step, {rec['peak_mem_mb']:,.0f} MB")
            print(f"[{rep * len(configs) + i + 1}/{args.repeats * len(configs)}] {cfg['arch']} "
                  f"T={cfg['block_size']}: {what} ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr)
            if args.profile and "profile" in rec:
                print(f"\nprofile: {cfg['arch']} T={cfg['block_size']} (2 steps)\n{rec['profile']}")
    records = []
    for i, cfg in enumerate(configs):
        rec = combine(runs[i])
        if "error" in rec:
            rec = {"kind": "train_step", "arch": cfg["arch"], "block_size": cfg["block_size"],
                   "preset": cfg["preset"], "device": device, **rec}
        records.append(rec)

    prep = None
    if args.prepare_file is None:
        found = [c for c in PREPARE_CANDIDATES if c.is_file()]
        args.prepare_file = str(found[0]) if found else ""
        if not found:
            print("prepare: skipped (no text file found; pass --prepare_file)")
    if args.prepare_file:
        try:
            prep = prepare_throughput(args.prepare_file)
        except Exception as e:  # the model table stands on its own
            prep = {"kind": "prepare", "file": args.prepare_file,
                    "error": f"{type(e).__name__}: {e}"}

    print(format_table(records, args.ref))
    if prep is not None:
        if "error" in prep:
            print(f"prepare: error: {prep['error']}")
        else:
            print(f"prepare: {prep['mb_per_sec']:.2f} MB/s of text tokenised "
                  f"({prep['bytes'] / 1e6:.2f} MB, {prep['tokens']:,} tokens in "
                  f"{prep['seconds']:.2f} s; {prep['source']})")
    if args.json:
        with open(args.json, "w") as f:
            for rec in records + ([prep] if prep is not None else []):
                f.write(json.dumps(rec) + "\n")
    return records, prep


if __name__ == "__main__":
    main()
