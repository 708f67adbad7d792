"""
Train PRISM (model.py) on the tokens prepare_tinystories.py wrote, on a CPU, a GPU or many.

    python train.py                                   # config/prism_50m.py with CUDA, else config/cpu_small.py
    python train.py config/cpu_small.py --max_iters=100 --learning_rate=8e-3
    python train.py config/cpu_small.py --init_from=resume          # continue out_dir/ckpt.pt exactly
    torchrun --standalone --nproc_per_node=8 train.py config/prism_50m.py --batch_size=8 --grad_accum=8

A config file is a Python file that assigns settings; --key=value arguments override it. The
settings are TrainConfig's fields below and the model's (model.py's PrismConfig, or another
--arch's config); vocab_size comes from the data's meta.json. Rank 0 writes out_dir/log.jsonl (one
record per evaluation) and out_dir/ckpt.pt (rewritten at every evaluation: the exact resume point).
"""

import gc
import inspect
import json
import math
import os
import re
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoint import (CheckpointError, read_training_checkpoint, replace_file, restore_training_state,
                        rng_states, training_checkpoint)
from configurator import SettingsError, describe, read_settings, split_settings, typed
from model import build_model, get_arch

HERE = os.path.dirname(os.path.abspath(__file__))


class TrainError(Exception):
    """A bad setting value (configurator.py checks the types), the data or the machine."""


# What main() prints as one line `error: ...`, exit status 2: the user's mistake, not a bug.
USER_ERRORS = (TrainError, SettingsError, CheckpointError)
REFUSED = {"vocab_size": "it comes from the data's meta.json"}  # settings no one may set


@dataclass
class TrainConfig:
    data_dir: str = "data/tinystories"  # train.bin, val.bin, meta.json (prepare_tinystories.py)
    out_dir: str = "out"                # ckpt.pt and log.jsonl
    init_from: str = "scratch"          # "scratch" or "resume" (from out_dir/ckpt.pt)
    arch: str = "prism"                 # the model: "prism", or one of the lab's (gpt2, gemma3, ...)
    batch_size: int = 12                # sequences per micro-step and process
    grad_accum: int = 1                 # micro-steps per iteration, split across the processes
    max_iters: int = 5000               # iterations (optimizer steps) of the whole run
    learning_rate: float = 6e-4         # peak learning rate, reached after warmup_iters
    min_lr: float = 6e-5                # learning rate at max_iters, the end of the cosine
    warmup_iters: int = 200             # iterations of linear warmup from ~0 to learning_rate
    weight_decay: float = 0.1           # AdamW weight decay, on matrices and embeddings only
    beta1: float = 0.9                  # AdamW β1
    beta2: float = 0.95                 # AdamW β2
    grad_clip: float = 1.0              # clip the gradient norm to this; 0 = off
    eval_interval: int = 250            # evaluate, log and checkpoint every this many iterations
    eval_iters: int = 100               # batches per split in one evaluation
    log_interval: int = 10              # a progress line every this many iterations
    device: str = "auto"                # "auto" = cuda if there is one, else cpu; or "cuda:1", "mps"
    dtype: str = "auto"                 # "auto" = bfloat16 on CUDA (float16 without bf16), else float32
    compile: bool | None = None         # torch.compile: true, false or auto (= on with CUDA only)
    seed: int = 1337                    # fixes the initialisation and the data order

    def __post_init__(self):
        checks = [(self.init_from in ("scratch", "resume"), "init_from", "must be scratch or resume"),
                  (self.dtype in ("auto", "float32", "bfloat16", "float16"), "dtype",
                   "must be auto, float32, bfloat16 or float16"),
                  (self.learning_rate > 0, "learning_rate", "must be positive"),
                  (0 <= self.min_lr <= self.learning_rate, "min_lr", "must be in [0, learning_rate]")]
        checks += [(getattr(self, k) > 0, k, "must be positive") for k in
                   ("batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval")]
        checks += [(getattr(self, k) >= 0, k, "must not be negative") for k in
                   ("max_iters", "warmup_iters", "grad_clip", "weight_decay")]
        for ok, name, why in checks:
            if not ok:
                raise TrainError(f"{name} = {getattr(self, name)!r} {why}")


# -----------------------------------------------------------------------------
# Settings: config files, then --key=value arguments (configurator.py), checked against the fields
# above and the arch's config; --help from the comments beside them
def parse_args(argv):
    """Config files, then --key=value arguments -> (TrainConfig, the arch's model args)."""
    settings = read_settings(argv)
    arch = typed("arch", *settings.get("arch", ("prism", "the defaults")), "prism")
    hint = "; another arch at a PRISM config's size: python -m lab.train" if arch != "prism" else ""
    train_args, model_args = split_settings(settings, TrainConfig, arch_config(arch), hint=hint,
                                            refused=REFUSED)
    return TrainConfig(**train_args), model_args


def arch_config(name):
    try:
        return get_arch(name)[0]
    except ValueError as e:
        raise TrainError(str(e)) from None


def default_config():
    """The config that fits this machine: the paper's PRISM on a GPU, the small one on a CPU."""
    return os.path.join(HERE, "config", "prism_50m.py" if torch.cuda.is_available() else "cpu_small.py")


def usage(argv=()):
    """The docstring, then every setting of TrainConfig and of --arch's config (PRISM's by default)."""
    config = os.path.relpath(default_config(), HERE)
    arch = next((a.split("=", 1)[1] for a in reversed(argv) if a.startswith("--arch=")), "prism")
    cfg, model_args = parse_args([default_config()]) if arch == "prism" else (TrainConfig(), {})
    given, model_cls = {**asdict(cfg), **model_args}, arch_config(arch)
    return "\n".join([__doc__.strip(), "", f"Settings: --name=DEFAULT  what it is  [{config}: its value there]",
                      "", "TrainConfig:", *describe(TrainConfig, given, config),
                      "", f"{model_cls.__name__} (arch {arch}; --arch=NAME --help for another's):",
                      *describe(model_cls, given, config, skip=REFUSED)])


# -----------------------------------------------------------------------------
# Data (train.bin / val.bin: raw uint16 token ids; a batch is random windows of them), the learning
# rate, evaluation, and the checkpoint that makes a resumed run the run it continues
def load_data(data_dir):
    """(train, val, meta): memmap views of the token files and the parsed meta.json."""
    if not os.path.isdir(data_dir):
        sample = " --sample" if os.path.normpath(data_dir) == os.path.join("data", "sample") else ""
        raise TrainError(f"data_dir {data_dir} does not exist; make it with "
                         f"`python prepare_tinystories.py{sample}` (see README.md)")
    *bins, meta_path = [os.path.join(data_dir, name) for name in ("train.bin", "val.bin", "meta.json")]
    if missing := [path for path in (*bins, meta_path) if not os.path.isfile(path)]:
        raise TrainError(f"{missing[0]} is missing; run prepare_tinystories.py to write it")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise TrainError(f"{meta_path} is not valid JSON ({e})") from None
    if missing := [k for k in ("vocab_size", "val_tokens", "val_bytes") if k not in meta]:
        raise TrainError(f"{meta_path} lacks {', '.join(missing)}")
    return *(np.memmap(path, dtype=np.uint16, mode="r") for path in bins), meta


def random_offsets(rng, n_tokens, block_size, shape):
    """Start positions of random windows of block_size + 1 tokens, drawn from the numpy rng."""
    return rng.integers(0, n_tokens - block_size, size=shape)


def get_batch(data, offsets, block_size, device):
    """Inputs x and next-token targets y, (len(offsets), block_size), of the windows at offsets."""
    windows = torch.from_numpy(np.stack([data[i: i + block_size + 1] for i in offsets]).astype(np.int64))
    x, y = windows[:, :-1], windows[:, 1:]
    if torch.device(device).type == "cuda":  # through pinned memory, without blocking
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.contiguous().to(device), y.contiguous().to(device)


def get_lr(it, cfg):
    """Linear warmup over warmup_iters, then cosine decay from learning_rate to min_lr at max_iters."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    progress = min(1.0, (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


@torch.no_grad()
def estimate_loss(model, data, block_size, cfg, ctx, seed):
    """Mean loss over cfg.eval_iters batches of `data`: the same windows for the same seed."""
    offsets = random_offsets(np.random.default_rng(seed), len(data), block_size, (cfg.eval_iters, cfg.batch_size))
    model.eval()
    with ctx:
        total = sum(model(*get_batch(data, batch, block_size, cfg.device))[1].item() for batch in offsets)
    model.train()
    return total / cfg.eval_iters


# -----------------------------------------------------------------------------
# The training loop, and the MFU on its progress line
# Dense peak TFLOP/s from the datasheets (which quote 2:4 sparsity, twice these): (pattern in
# torch.cuda.get_device_name(), bfloat16, float16, float32 matmuls: TF32 where the GPU has it, else
# its CUDA cores). None: no such unit. A GPU not listed gets no MFU, not a guess.
GPU_PEAK_TFLOPS = (
    (r"H100 80GB HBM3$|H200$", 989.4, 989.4, 494.7),  # SXM
    (r"H100 PCIe$", 756.5, 756.5, 378.0),
    (r"H100 NVL$|H200 NVL$", 835.5, 835.5, 417.5),
    (r"A100[- ]", 312.0, 312.0, 156.0),
    (r"NVIDIA L40S$", 362.05, 362.05, 183.0),
    (r"NVIDIA A10$", 125.0, 125.0, 62.5),
    (r"NVIDIA L4$", 121.0, 121.0, 60.0),
    (r"GeForce RTX 4090$", 165.2, 165.2, 82.6),  # float32 accumulation: half rate on GeForce
    (r"GeForce RTX 3090$", 71.0, 71.0, 35.6),
    (r"V100-SXM2", None, 125.0, 15.7),
    (r"Tesla T4$", None, 65.0, 8.1),
)


def gpu_peak_flops(device_name, dtype):
    """Dense peak FLOP/s of the GPU called `device_name` for matmuls in `dtype`, or None."""
    for pattern, *peaks in GPU_PEAK_TFLOPS:
        if re.search(pattern, device_name):
            tflops = peaks[("bfloat16", "float16", "float32").index(dtype)]
            return None if tflops is None else tflops * 1e12
    return None  # not in the table: no MFU rather than a guess


def resolve_system(cfg, local_rank=None):
    """The TrainConfig with device, dtype and compile made concrete for this machine."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise TrainError(f"device = {cfg.device!r} but this machine has no CUDA")
    device = f"cuda:{local_rank}" if cuda and local_rank is not None else device  # one GPU per process
    dtype = cfg.dtype if cfg.dtype != "auto" else (
        "float32" if not cuda else "bfloat16" if torch.cuda.is_bf16_supported() else "float16")
    return replace(cfg, device=device, dtype=dtype, compile=cuda if cfg.compile is None else cfg.compile)


def setup_cuda(cfg, log):
    """TF32 for float32 matmuls; -> the GPU's peak FLOP/s for MFU, or None."""
    torch.cuda.set_device(cfg.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    peak = gpu_peak_flops(torch.cuda.get_device_name(cfg.device), cfg.dtype)
    if peak is None:
        log(f"no MFU: {torch.cuda.get_device_name(cfg.device)} is not in train.GPU_PEAK_TFLOPS")
    return peak


def train(cfg, model_args=None):
    """Train as cfg and model_args (cfg.arch's config) say; -> rank 0's summary (the last evaluation's record)."""
    ddp = "RANK" in os.environ  # torchrun sets RANK, WORLD_SIZE and LOCAL_RANK
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    master, log = rank == 0, print if rank == 0 else (lambda *a, **k: None)
    cfg = resolve_system(cfg, int(os.environ["LOCAL_RANK"]) if ddp else None)
    device, device_type = cfg.device, torch.device(cfg.device).type
    if cfg.grad_accum % world_size:
        raise TrainError(f"grad_accum = {cfg.grad_accum} must be a multiple of the {world_size} processes")
    accum = cfg.grad_accum // world_size  # this process's micro-steps per iteration

    # -- data, model config, checkpoint: all checked before a process starts or a file is written
    train_data, val_data, meta = load_data(cfg.data_dir)
    try:
        model_config = asdict(arch_config(cfg.arch)(**{**(model_args or {}), "vocab_size": meta["vocab_size"]}))
    except (TypeError, ValueError) as e:
        raise TrainError(str(e)) from None
    block_size = model_config["block_size"]
    for name, data in (("train", train_data), ("val", val_data)):
        if len(data) <= block_size + 1:
            raise TrainError(f"{name}.bin has {len(data)} tokens, too few for block_size = {block_size}")
    ckpt_path, log_path = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "log.jsonl")
    ckpt = read_training_checkpoint(ckpt_path, cfg.arch, model_config) if cfg.init_from == "resume" else None
    tokens_per_iter = cfg.batch_size * cfg.grad_accum * block_size
    bpb_per_nat = meta["val_tokens"] / meta["val_bytes"] / math.log(2)  # loss -> bits per byte of text
    log(f"arch {cfg.arch} | device {device} ({world_size} process{'es' if world_size > 1 else ''}) | "
        f"dtype {cfg.dtype} | compile {cfg.compile} | {tokens_per_iter:,} tokens/iter "
        f"({cfg.batch_size} x {cfg.grad_accum} x {block_size})")
    ctx = nullcontext() if cfg.dtype == "float32" else torch.autocast(device_type, getattr(torch, cfg.dtype))
    peak_flops = setup_cuda(cfg, log) if device_type == "cuda" else None

    # -- model and optimizer; every process draws the whole iteration's batch and takes its share
    torch.manual_seed(cfg.seed + rank)  # the init (DDP broadcasts rank 0's), dropout
    rng = np.random.default_rng(cfg.seed)
    raw_model = build_model(cfg.arch, **model_config).to(device)
    log(raw_model.describe_parameters())
    raw_model.vocabulary = {k: meta[k] for k in ("tokenizer", "vocab_size", "eot_token", "compact_vocab")
                            if k in meta}  # the ids' meaning travels with the checkpoint
    optimizer = raw_model.configure_optimizers(cfg.weight_decay, cfg.learning_rate,
                                               (cfg.beta1, cfg.beta2), device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=cfg.dtype == "float16")
    iter_num, best_val_loss, elapsed, kept_log = 0, math.inf, 0.0, []
    if ckpt is not None:
        iter_num, best_val_loss, elapsed = restore_training_state(ckpt, raw_model, optimizer, scaler, rng,
                                                                  rank, device)  # λ too: a buffer
        changed = [f"{k}={v!r} (was {ckpt['train_config'].get(k)!r})" for k, v in asdict(cfg).items()
                   if k != "init_from" and ckpt["train_config"].get(k) != v]
        log(f"resuming from {ckpt_path} at iter {iter_num}" + (f"; changed: {', '.join(changed)}" if changed else ""))
        if master and os.path.isfile(log_path):  # a crash may come after a log line, before its checkpoint
            with open(log_path, "rb") as f:
                kept_log = [line for line in f if line.strip() and json.loads(line)["iter"] <= iter_num]
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        replace_file(log_path, lambda f: f.writelines(kept_log))
    start_iter, ckpt_iter = iter_num, iter_num if ckpt is not None else None
    model = eval_model = torch.compile(raw_model) if cfg.compile else raw_model  # eval: no all-reduce
    summary = {"arch": cfg.arch, "params": raw_model.get_num_params(), "out_dir": cfg.out_dir}
    run_start = time.time() - elapsed  # a resumed run's clock continues the checkpoint's
    train_time, mfu = 0.0, -1.0  # this process's time in training steps; MFU's running mean
    t_seg, seg_iters = time.time(), 0  # since the last evaluation, for log.jsonl
    t_log, log_iters, loss_sum = time.time(), 0, 0.0  # since the last progress line
    if ddp:
        torch.distributed.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    try:
        if ddp:  # the buffers (RoPE tables, λ) agree on every process: no need to send them each step
            no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                       inspect.signature(DDP).parameters else {"broadcast_buffers": False})  # torch < 2.13
            model = DDP(model, device_ids=[device] if device_type == "cuda" else None, **no_sync)
        while True:
            lr = get_lr(iter_num, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            raw_model.set_progress(iter_num / max(1, cfg.max_iters))  # PRISM's λ

            # -- evaluate, log and checkpoint (rank 0): the resume point, so always
            if iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters:
                if device_type == "cuda":
                    torch.cuda.synchronize()
                seg_time = time.time() - t_seg
                train_time += seg_time
                state = rng_states(rng, device)
                states = [state] * world_size  # every process's, to resume its own
                if ddp:
                    torch.distributed.all_gather_object(states, state)
                if master:
                    train_loss = estimate_loss(eval_model, train_data, block_size, cfg, ctx, seed=cfg.seed + 1)
                    val_loss = estimate_loss(eval_model, val_data, block_size, cfg, ctx, seed=cfg.seed + 2)
                    best_val_loss = min(best_val_loss, val_loss)
                    record = {"iter": iter_num, "train_loss": train_loss, "val_loss": val_loss,
                              "val_ppl": math.exp(min(val_loss, 700)), "val_bpb": val_loss * bpb_per_nat,
                              "lr": lr, "tokens": iter_num * tokens_per_iter,
                              "tokens_per_sec": seg_iters * tokens_per_iter / seg_time if seg_iters else None,
                              "elapsed_s": round(time.time() - run_start, 3), **({"mfu": mfu} if mfu > 0 else {})}
                    log(f"eval iter {iter_num}: train loss {train_loss:.4f} | val loss {val_loss:.4f} | "
                        f"val ppl {record['val_ppl']:.2f} | val bpb {record['val_bpb']:.4f}"
                        + (" (best)" if val_loss == best_val_loss else ""))
                    summary.update(record, iters=iter_num, best_val_loss=best_val_loss,
                                   best_val_bpb=best_val_loss * bpb_per_nat)
                    if not (iter_num == start_iter and ckpt is not None):  # a resumed start is saved
                        with open(log_path, "a", encoding="utf-8") as f:
                            f.write(json.dumps(record) + "\n")
                        replace_file(ckpt_path, lambda f: torch.save(training_checkpoint(
                            raw_model, optimizer, scaler, asdict(cfg), iter_num, best_val_loss, states,
                            time.time() - run_start), f))
                ckpt_iter, seg_iters = iter_num, 0
                t_seg = t_log = time.time()  # the evaluation's own time counts in neither
            if iter_num >= cfg.max_iters:
                break

            # -- one optimizer step: this process's share of grad_accum micro-batches
            offsets = random_offsets(rng, len(train_data), block_size, (cfg.grad_accum, cfg.batch_size))
            mine = offsets[rank * accum:(rank + 1) * accum]
            x, y = get_batch(train_data, mine[0], block_size, device)
            for micro in range(accum):
                last = micro == accum - 1
                # Under DDP the gradients are all-reduced once, after the last micro-step.
                with model.no_sync() if ddp and not last else nullcontext():
                    with ctx:
                        loss = model(x, y)[1] / accum
                    if not last:  # fetch the next micro-batch while this one runs on the GPU
                        x, y = get_batch(train_data, mine[micro + 1], block_size, device)
                    scaler.scale(loss).backward()
                loss_sum += loss.detach().float()
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            iter_num, seg_iters, log_iters = iter_num + 1, seg_iters + 1, log_iters + 1

            # -- progress: the mean loss since the last line (over all processes), speed, time left
            if iter_num % cfg.log_interval == 0 or iter_num == cfg.max_iters:
                if ddp:
                    torch.distributed.all_reduce(loss_sum)
                    loss_sum /= world_size
                mean_loss, dt = (loss_sum / log_iters).item(), (time.time() - t_log) / log_iters
                if peak_flops:
                    step_mfu = raw_model.estimate_mfu(cfg.batch_size * accum, dt, peak_flops)
                    mfu = step_mfu if mfu < 0 else 0.9 * mfu + 0.1 * step_mfu
                log(f"iter {iter_num}/{cfg.max_iters} | loss {mean_loss:.4f} | lr {lr:.2e} | "
                    f"{tokens_per_iter / dt:,.0f} tok/s | {dt * 1000:.1f} ms/iter | "  # eta without the evals
                    f"eta {tqdm.format_interval((cfg.max_iters - iter_num) * dt)}"
                    + (f" | mfu {mfu * 100:.1f}%" if peak_flops else ""))
                t_log, log_iters, loss_sum = time.time(), 0, 0.0
    except KeyboardInterrupt:  # main() prints what to do next
        raise KeyboardInterrupt(
            f"interrupted at iter {iter_num}, before the first checkpoint: nothing to resume yet "
            f"({ckpt_path} not written); run the same command again to start over" if ckpt_iter is None else
            f"interrupted at iter {iter_num}: continue from iter {ckpt_iter} with --init_from=resume ({ckpt_path})"
        ) from None
    finally:
        if ddp:  # the wrapper first: its Reducer holds the group; left to a reference cycle, the
            del model  # group's gloo threads die with the interpreter and a rank can abort at exit
            gc.collect()
            torch.distributed.destroy_process_group()

    trained = (iter_num - start_iter) * tokens_per_iter  # this process's
    summary["tokens_per_sec"] = trained / train_time if trained else None  # None: nothing trained
    if master:
        speed = f"{summary['tokens_per_sec']:,.0f} tok/s | " if trained else ""
        print(f"done: {summary['iters']} iters | val loss {summary['val_loss']:.4f} (best {best_val_loss:.4f}) | "
              f"val bpb {summary['val_bpb']:.4f} | {speed}{time.time() - run_start:.0f} s | {ckpt_path}")
    return summary


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    master = int(os.environ.get("RANK", 0)) == 0
    try:
        if any(a in ("-h", "--help") for a in argv):
            return print(usage(argv))
        if all(a.startswith("--") for a in argv):
            argv = [default_config(), *argv]
            if master:
                print(f"no config file given: using {os.path.relpath(argv[0])} "
                      f"({'CUDA is available' if torch.cuda.is_available() else 'no CUDA: CPU'})")
        return train(*parse_args(argv))
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt as e:  # train()'s says which iteration the checkpoint holds
        if master:
            print(e.args[0] if e.args else "interrupted before training started", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
