"""
Train PRISM (model.py) on the tokens prepare_tinystories.py wrote. One file, top to bottom:
settings, data, evaluation, checkpoints, the training loop, the command line.

    python train.py                                  # config/prism_50m.py on CUDA, else config/cpu_small.py
    python train.py config/cpu_small.py --max_iters=100 --batch_size=8
    python train.py config/cpu_small.py --init_from=resume             # continue out_dir/ckpt.pt
    torchrun --standalone --nproc_per_node=8 train.py config/prism_50m.py  # DDP, one process per GPU

Settings are the fields of TrainConfig below and of model.py's PrismConfig (n_layer, n_embd, n_head,
head_dim, block_size, ...). A config file is a Python file that assigns some of them; the
`--key=value` arguments are applied after the config files. vocab_size comes from meta.json.

Other architectures (the lab's, e.g. --arch=gpt2): a config file describes a PRISM. For another
arch, train.py asks that arch's model class for its sizes at the same scale, through the lab's
hook `ModelClass.sizes_like_prism(prism_model_args) -> dict` (model.get_arch imports the lab on
the first name it does not know), then applies the command line's fields of that arch's own config
(--n_head=4 is GPT2Config's n_head). Unless out_dir is given on the command line, such a run
writes to the config's out_dir + "_" + arch (out/cpu_small_gpt2), so it leaves PRISM's checkpoint alone.

Outputs, written by rank 0 only: out_dir/log.jsonl (one JSON record per evaluation) and
out_dir/ckpt.pt (model, optimizer, settings, iteration, RNG states, elapsed time; rewritten at
every evaluation, the point --init_from=resume continues from, exactly).
"""

import dataclasses
import gc
import inspect
import json
import math
import os
import re
import sys
import time
import types
import typing
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch

from model import CheckpointError, PrismConfig, build_model, checkpoint_payload, get_arch, read_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))


class TrainError(Exception):
    """A mistake in the settings, the data or the checkpoint: main() prints it as one line."""


# -----------------------------------------------------------------------------
# Settings


@dataclass
class TrainConfig:
    data_dir: str = "data/tinystories"  # train.bin, val.bin, meta.json (prepare_tinystories.py)
    out_dir: str = "out"                # ckpt.pt and log.jsonl
    init_from: str = "scratch"          # "scratch" or "resume" (from out_dir/ckpt.pt)
    arch: str = "prism"                 # "prism", or one of the lab's (gpt2, gemma3, ...)
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
    compile: Optional[bool] = None      # torch.compile: true, false or auto (= on with CUDA only)
    seed: int = 1337                    # fixes the initialisation and the data order

    def __post_init__(self):
        def need(ok, name, why):
            if not ok:
                raise TrainError(f"{name} = {getattr(self, name)!r} {why}")

        need(self.init_from in ("scratch", "resume"), "init_from", "must be 'scratch' or 'resume'")
        need(self.dtype in ("auto", "float32", "bfloat16", "float16"), "dtype",
             "must be auto, float32, bfloat16 or float16")
        for name in ("batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval"):
            need(getattr(self, name) > 0, name, "must be positive")
        for name in ("max_iters", "warmup_iters", "grad_clip", "weight_decay"):
            need(getattr(self, name) >= 0, name, "must not be negative")
        need(self.learning_rate > 0, "learning_rate", "must be positive")
        need(0 <= self.min_lr <= self.learning_rate, "min_lr", "must be in [0, learning_rate]")


def read_config_file(path):
    """The settings a config file assigns: its top-level names, except _private ones and modules."""
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except OSError:
        raise TrainError(f"no config file {path}") from None
    namespace = {}
    exec(compile(source, path, "exec"), namespace)  # noqa: S102 — config files are Python by design
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and not isinstance(v, (types.ModuleType, types.FunctionType, type))}


def _value(key, value, typ, source):
    """A setting as a value of its field's type: parsed from a command-line string, or checked
    (a config file's value; an int is a fine float)."""
    optional = typing.get_origin(typ) in (typing.Union, types.UnionType)
    if optional:  # Optional[bool]: None is "auto"
        typ = next(a for a in typing.get_args(typ) if a is not type(None))
    if source != "the command line":
        if optional and value is None:
            return None
        if typ is float and type(value) is int:
            return float(value)
        if type(value) is not typ:
            raise TrainError(f"{key} = {value!r} in {source} should be of type {typ.__name__}")
        return value
    if typ is bool:
        words = {"true": True, "1": True, "false": False, "0": False, **({"auto": None} if optional else {})}
        if value.lower() not in words:
            raise TrainError(f"--{key} expects {'true, false or auto' if optional else 'true or false'}, "
                             f"got {value!r}")
        return words[value.lower()]
    try:
        return typ(value)
    except ValueError:
        raise TrainError(f"--{key} expects {typ.__name__}, got {value!r}") from None


def _get_arch(name):
    try:
        return get_arch(name)
    except ValueError as e:
        raise TrainError(str(e)) from None


def parse_args(argv):
    """Config files, then --key=value arguments -> (TrainConfig, model_args of cfg.arch).

    A config file's keys are TrainConfig or PrismConfig fields; a command-line key is a TrainConfig
    field or a field of the arch's config; anything else is an error naming it. For an arch other
    than PRISM the config files' PrismConfig fields become that arch's sizes through its
    sizes_like_prism (the lab's hook, see the docstring at the top)."""
    files, cli = {}, {}
    for arg in argv:
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if not eq or not key:
                raise TrainError(f"expected --key=value, got {arg!r}")
            cli[key] = (value, "the command line")
        else:
            files.update({k: (v, arg) for k, v in read_config_file(arg).items()})
    train_types, prism_types = typing.get_type_hints(TrainConfig), typing.get_type_hints(PrismConfig)
    train_args, prism_args, arch_args = {}, {}, {}
    arch = cli["arch"][0] if "arch" in cli else files.get("arch", (TrainConfig.arch,))[0]
    config_cls, model_cls = _get_arch(arch)
    arch_types = typing.get_type_hints(config_cls)
    for settings, model_types, model_dest in ((files, prism_types, prism_args), (cli, arch_types, arch_args)):
        for key, (value, source) in settings.items():
            if key == "vocab_size":
                raise TrainError(f"vocab_size (from {source}) is not a setting: it comes from the "
                                 "data's meta.json")
            typ, dest = ((train_types[key], train_args) if key in train_types
                         else (model_types[key], model_dest) if key in model_types else (None, None))
            if dest is None:
                cls = PrismConfig if settings is files else config_cls
                raise TrainError(f"unknown key {key!r} (from {source}): it is neither a TrainConfig "
                                 f"field nor a {cls.__name__} field (arch {arch!r})")
            dest[key] = _value(key, value, typ, source)
    if config_cls is PrismConfig:
        return TrainConfig(**train_args), {**prism_args, **arch_args}
    if not hasattr(model_cls, "sizes_like_prism"):
        raise TrainError(f"arch {arch!r} has no sizes_like_prism, so it cannot train from a PRISM config")
    try:  # no config file: the PrismConfig defaults are the PRISM
        model_args = model_cls.sizes_like_prism(prism_args)
    except ValueError as e:
        raise TrainError(str(e)) from None
    if "out_dir" not in cli:  # keep PRISM's checkpoint: out/cpu_small -> out/cpu_small_gpt2
        train_args["out_dir"] = f"{train_args.get('out_dir', TrainConfig.out_dir)}_{arch}"
    return TrainConfig(**train_args), {**model_args, **arch_args}


def resolve_system(cfg, local_rank=None):
    """The TrainConfig with device, dtype and compile made concrete for this machine."""
    device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else cfg.device
    device = "cpu" if device == "auto" else device
    device_type = device.split(":")[0]
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise TrainError(f"device = {cfg.device!r} but this machine has no CUDA")
        if local_rank is not None:  # one GPU per process under torchrun
            device = f"cuda:{local_rank}"
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = ("float32" if device_type != "cuda"
                 else "bfloat16" if torch.cuda.is_bf16_supported() else "float16")
    compile_ = device_type == "cuda" if cfg.compile is None else cfg.compile
    return dataclasses.replace(cfg, device=device, dtype=dtype, compile=compile_)


# -----------------------------------------------------------------------------
# Data: train.bin / val.bin are raw uint16 token ids; a batch is random windows of them.


def load_data(data_dir):
    """(train, val, meta): memmap views of the token files and the parsed meta.json."""
    if not os.path.isdir(data_dir):
        command = "python prepare_tinystories.py" + (
            " --sample --vocab_size=4096 --report_fraction=0.5"  # config/cpu_small.py's data
            if os.path.normpath(data_dir) == os.path.join("data", "sample") else "")
        raise TrainError(f"data_dir {data_dir} does not exist; make it with `{command}` (see README.md)")
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(meta_path):
        raise TrainError(f"{meta_path} is missing; run prepare_tinystories.py to write it")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise TrainError(f"{meta_path} is not valid JSON ({e})") from None
    missing = [k for k in ("vocab_size", "val_tokens", "val_bytes") if k not in meta]
    if missing:
        raise TrainError(f"{meta_path} lacks {', '.join(missing)}")
    splits = []
    for split in ("train", "val"):
        path = os.path.join(data_dir, f"{split}.bin")
        if not os.path.isfile(path):
            raise TrainError(f"{path} is missing; run prepare_tinystories.py to write it")
        splits.append(np.memmap(path, dtype=np.uint16, mode="r"))
    return splits[0], splits[1], meta


def random_offsets(rng, n_tokens, block_size, shape):
    """Start positions of random windows of block_size + 1 tokens, drawn from the numpy rng."""
    return rng.integers(0, n_tokens - block_size, size=shape)


def get_batch(data, offsets, block_size, device):
    """Inputs x and next-token targets y, int64 (len(offsets), block_size), for the windows of
    `data` starting at `offsets`; on CUDA through pinned memory, without blocking."""
    windows = torch.from_numpy(np.stack([data[i: i + block_size + 1] for i in offsets]).astype(np.int64))
    x, y = windows[:, :-1], windows[:, 1:]
    if torch.device(device).type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.contiguous().to(device), y.contiguous().to(device)


def get_lr(it, cfg):
    """Linear warmup over warmup_iters, then cosine decay from learning_rate to min_lr at max_iters."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= cfg.max_iters:
        return cfg.min_lr
    progress = (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


@torch.no_grad()
def estimate_loss(model, data, block_size, batch_size, eval_iters, device, seed=0,
                  ctx=nullcontext(), rank=0, world_size=1):
    """Mean loss over eval_iters batches of `data`: the same windows at every call with the same
    seed, so evaluations along a run (and across runs) see the same text. Under DDP each process
    takes every world_size-th batch and the sum is all-reduced: the result does not depend on the
    number of processes."""
    offsets = random_offsets(np.random.default_rng(seed), len(data), block_size, (eval_iters, batch_size))
    was_training = model.training
    model.eval()
    total = 0.0
    for k in range(rank, eval_iters, world_size):
        x, y = get_batch(data, offsets[k], block_size, device)
        with ctx:
            total += model(x, y)[1].item()
    model.train(was_training)
    if world_size > 1:
        total_t = torch.tensor(total, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(total_t)
        total = total_t.item()
    return total / eval_iters


@torch.no_grad()
def evaluate_split(model, data, block_size, batch_size, device, ctx=nullcontext()):
    """Mean loss per token over ALL non-overlapping windows of `data` (window w covers tokens
    w·block_size … (w+1)·block_size, its targets shifted by one; the tail shorter than a window is
    left out): the whole split, no sampling noise, the same number at every call."""
    n_windows = (len(data) - 1) // block_size
    if n_windows < 1:
        raise TrainError(f"a split of {len(data)} tokens holds no window of {block_size + 1}")
    was_training = model.training
    model.eval()
    total = 0.0
    for start in range(0, n_windows, batch_size):
        offsets = np.arange(start, min(start + batch_size, n_windows)) * block_size
        x, y = get_batch(data, offsets, block_size, device)
        with ctx:
            total += model(x, y)[1].item() * len(offsets)  # every window has block_size targets
    model.train(was_training)
    return total / n_windows


def bits_per_byte(loss, meta):
    """Nats per token -> bits per byte of the original text, from meta.json's token and byte counts."""
    return loss / math.log(2) * meta["val_tokens"] / meta["val_bytes"]


# -----------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path, payload):
    """torch.save to a temporary file, then os.replace: a reader never sees half a checkpoint."""
    with open(path + ".tmp", "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def load_checkpoint(path, arch, model_config):
    """The checkpoint at `path`, checked to hold a model of this arch and config."""
    if not os.path.isfile(path):
        raise TrainError(f"init_from = 'resume' but there is no checkpoint at {path}: nothing to "
                         "resume yet (train from scratch first: --init_from=scratch)")
    try:
        ckpt = read_checkpoint(path)
    except CheckpointError as e:
        raise TrainError(str(e)) from None
    if not isinstance(ckpt, dict) or not {"arch", "model_config", "model", "iter_num"} <= ckpt.keys():
        raise TrainError(f"{path} is not a checkpoint written by train.py")
    if ckpt["arch"] != arch:
        raise TrainError(f"{path} holds a {ckpt['arch']!r} model, but arch = {arch!r}")
    saved = ckpt["model_config"]
    differ = [f"{k} = {v!r} (checkpoint: {saved.get(k, '<absent>')!r})"
              for k, v in model_config.items() if saved.get(k, object()) != v]
    differ += [f"{k} absent (checkpoint: {v!r})" for k, v in saved.items() if k not in model_config]
    if differ:
        raise TrainError(f"{path} holds a model of another size: {'; '.join(differ)}")
    return ckpt


def rng_states(rng, device):
    state = {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state()}
    if torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_states(state, rng, device):
    rng.bit_generator.state = state["numpy"]
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C in the loop, with where the run was and where its checkpoint is (None: none yet)."""

    def __init__(self, iter_num, ckpt_iter, ckpt_path):
        super().__init__(iter_num)
        self.iter_num, self.ckpt_iter, self.ckpt_path = iter_num, ckpt_iter, ckpt_path


# -----------------------------------------------------------------------------
# The training loop


def train(cfg, model_args=None):
    """Train as `cfg` and `model_args` (the fields of cfg.arch's config) say; returns a summary
    (rank 0's numbers under DDP): arch, params, out_dir, iters, tokens, train loss, val loss, ppl
    and bpb, best val loss and bpb, tokens/s."""
    # -- processes: one, or one of WORLD_SIZE under torchrun ----------------------------------------
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    cfg = resolve_system(cfg, int(os.environ["LOCAL_RANK"]) if ddp else None)
    device, device_type = cfg.device, torch.device(cfg.device).type
    if cfg.grad_accum % world_size:
        raise TrainError(f"grad_accum = {cfg.grad_accum} must be a multiple of the number of "
                         f"processes ({world_size})")
    accum = cfg.grad_accum // world_size  # this process's micro-steps per iteration

    # -- data, model config, checkpoint: all checked before any process starts or file is written ----
    train_data, val_data, meta = load_data(cfg.data_dir)
    config_cls, _ = _get_arch(cfg.arch)
    try:
        model_config = asdict(config_cls(**{**(model_args or {}), "vocab_size": meta["vocab_size"]}))
    except (TypeError, ValueError) as e:
        raise TrainError(str(e)) from None
    block_size = model_config["block_size"]
    for name, data in (("train", train_data), ("val", val_data)):
        if len(data) <= block_size + 1:
            raise TrainError(f"{name}.bin has {len(data)} tokens, too few for block_size = {block_size}")
    ckpt_path, log_path = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "log.jsonl")
    ckpt = load_checkpoint(ckpt_path, cfg.arch, model_config) if cfg.init_from == "resume" else None
    tokens_per_iter = cfg.batch_size * cfg.grad_accum * block_size

    # -- the device: autocast, TF32, the peak FLOP/s for MFU -------------------------------------------
    log(f"arch {cfg.arch} | device {device} ({world_size} process{'es' if world_size > 1 else ''}) | "
        f"dtype {cfg.dtype} | compile {cfg.compile} | {tokens_per_iter:,} tokens/iter "
        f"({cfg.batch_size} x {cfg.grad_accum} x {block_size})")
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
    if device_type == "cuda":
        if ddp:  # this process's GPU, cuda:LOCAL_RANK
            torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
    ctx = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type, dtype=ptdtype)
    # float32 matmuls run as TF32 here: that is the peak they reach
    peak_flops = (current_gpu_peak_flops("tf32" if ptdtype == torch.float32 else cfg.dtype)
                  if device_type == "cuda" else None)

    # -- model and optimizer. The same batch generator on every process: each draws the whole
    # iteration's batch and takes its own micro-steps, so N processes see the data one process would.
    torch.manual_seed(cfg.seed + rank)  # the init (DDP broadcasts rank 0's), dropout
    rng = np.random.default_rng(cfg.seed)
    raw_model = build_model(cfg.arch, **model_config).to(device)
    log(raw_model.describe_parameters())
    # The ids' meaning travels with the checkpoint, so sample.py can print text without the data.
    raw_model.vocabulary = {k: meta[k] for k in ("tokenizer", "vocab_size", "eot_token", "compact_vocab")
                            if k in meta}
    optimizer = raw_model.configure_optimizers(cfg.weight_decay, cfg.learning_rate,
                                               (cfg.beta1, cfg.beta2), device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=ptdtype == torch.float16)
    iter_num, best_val_loss, ckpt_iter, elapsed_before = 0, math.inf, None, 0.0
    if ckpt is not None:
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        iter_num = ckpt_iter = ckpt["iter_num"]
        best_val_loss, elapsed_before = ckpt["best_val_loss"], ckpt.get("elapsed_s", 0.0)
        set_rng_states(ckpt["rng"][rank % len(ckpt["rng"])], rng, device)
        changed = [f"{k}={v!r} (was {ckpt['train_config'].get(k)!r})" for k, v in asdict(cfg).items()
                   if k != "init_from" and ckpt["train_config"].get(k) != v]
        log(f"resuming from {ckpt_path} at iter {iter_num}"
            + (f"; changed: {', '.join(changed)}" if changed else ""))
    if master:  # a fresh log, or the log up to the checkpoint (a crash may come between the two)
        kept = []
        if ckpt is not None and os.path.isfile(log_path):
            with open(log_path, encoding="utf-8") as f:
                kept = [line for line in f if line.strip() and json.loads(line)["iter"] <= iter_num]
        with open(log_path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(log_path + ".tmp", log_path)
    start_iter = iter_num
    model = eval_model = torch.compile(raw_model) if cfg.compile else raw_model  # eval: no all-reduce
    summary = {"arch": cfg.arch, "params": raw_model.get_num_params(), "out_dir": cfg.out_dir}

    def sync():
        if device_type == "cuda":
            torch.cuda.synchronize()

    run_start = time.time() - elapsed_before  # a resumed run's clock continues the checkpoint's
    train_time, train_tokens, mfu = 0.0, 0, -1.0  # this process's run, for the summary and MFU
    t_seg, seg_iters = time.time(), 0  # since the last evaluation, for log.jsonl
    t_log, log_iters, loss_sum = time.time(), 0, 0.0  # since the last progress line
    if ddp:
        torch.distributed.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    try:
        if ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: PLC0415
            # The buffers (RoPE tables) are constants: no need to send them at every forward.
            no_buffers = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                          inspect.signature(DDP).parameters else {"broadcast_buffers": False})  # torch < 2.13
            model = DDP(model, device_ids=[device] if device_type == "cuda" else None, **no_buffers)
        while True:
            lr = get_lr(iter_num, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            raw_model.set_progress(iter_num / max(1, cfg.max_iters))  # PRISM's λ

            # -- evaluate, log and checkpoint: the resume point, so always, not only when val improves
            if iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters:
                sync()
                seg_time = time.time() - t_seg
                train_time += seg_time
                kw = dict(block_size=block_size, batch_size=cfg.batch_size, eval_iters=cfg.eval_iters,
                          device=device, ctx=ctx, rank=rank, world_size=world_size)
                train_loss = estimate_loss(eval_model, train_data, seed=cfg.seed + 1, **kw)
                val_loss = estimate_loss(eval_model, val_data, seed=cfg.seed + 2, **kw)
                best_val_loss = min(best_val_loss, val_loss)
                record = {"iter": iter_num, "train_loss": train_loss, "val_loss": val_loss,
                          "val_ppl": math.exp(min(val_loss, 700)), "val_bpb": bits_per_byte(val_loss, meta),
                          "lr": lr, "tokens": iter_num * tokens_per_iter,
                          "tokens_per_sec": seg_iters * tokens_per_iter / seg_time if seg_iters else None,
                          "elapsed_s": round(time.time() - run_start, 3), **({"mfu": mfu} if mfu > 0 else {})}
                log(f"eval iter {iter_num}: train loss {train_loss:.4f} | val loss {val_loss:.4f} | "
                    f"val ppl {record['val_ppl']:.2f} | val bpb {record['val_bpb']:.4f}"
                    + (" (best)" if val_loss == best_val_loss else ""))
                summary.update({k: record[k] for k in ("train_loss", "val_loss", "val_ppl", "val_bpb",
                                                       "tokens")},
                               iters=iter_num, best_val_loss=best_val_loss,
                               best_val_bpb=bits_per_byte(best_val_loss, meta))
                states = [rng_states(rng, device)]
                if world_size > 1:  # every process's, so each resumes its own
                    states = [None] * world_size
                    torch.distributed.all_gather_object(states, rng_states(rng, device))
                if not (iter_num == start_iter and ckpt is not None):  # a resumed start is saved already
                    if master:
                        with open(log_path, "a", encoding="utf-8") as f:
                            f.write(json.dumps(record) + "\n")
                        save_checkpoint(ckpt_path, {
                            **checkpoint_payload(raw_model), "optimizer": optimizer.state_dict(),
                            "scaler": scaler.state_dict(), "train_config": asdict(cfg), "iter_num": iter_num,
                            "best_val_loss": best_val_loss, "rng": states,
                            "elapsed_s": time.time() - run_start})
                    ckpt_iter = iter_num
                t_seg = t_log = time.time()
                seg_iters = 0
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
            iter_num, seg_iters, log_iters, train_tokens = (iter_num + 1, seg_iters + 1, log_iters + 1,
                                                            train_tokens + tokens_per_iter)

            # -- progress: the mean loss since the last line (over all processes), speed, time left
            if iter_num % cfg.log_interval == 0 or iter_num == cfg.max_iters:
                if world_size > 1:
                    torch.distributed.all_reduce(loss_sum)
                    loss_sum /= world_size
                mean_loss = (loss_sum / log_iters).item()  # waits for the GPU
                dt = (time.time() - t_log) / log_iters
                if peak_flops:
                    step_mfu = raw_model.estimate_mfu(cfg.batch_size * accum, dt, peak_flops)
                    mfu = step_mfu if mfu < 0 else 0.9 * mfu + 0.1 * step_mfu
                log(f"iter {iter_num}/{cfg.max_iters} | loss {mean_loss:.4f} | lr {lr:.2e} | "
                    f"{tokens_per_iter / dt:,.0f} tok/s | {dt * 1000:.1f} ms/iter | "  # eta without the evals
                    f"eta {format_duration((cfg.max_iters - iter_num) * dt)}"
                    + (f" | mfu {mfu * 100:.1f}%" if peak_flops else ""))
                t_log, log_iters, loss_sum = time.time(), 0, 0.0
    except KeyboardInterrupt:
        raise Interrupted(iter_num, ckpt_iter, ckpt_path) from None
    finally:
        if ddp:
            # The DDP wrapper goes first: its Reducer holds the process group, which
            # destroy_process_group does not free. Left alive (a reference cycle can hold it), the
            # group's gloo threads die with the interpreter, and a rank can abort at exit (SIGABRT).
            del model
            gc.collect()
            torch.distributed.destroy_process_group()

    # this process's speed; None where it trained nothing (resumed at its last checkpoint)
    summary["tokens_per_sec"] = train_tokens / train_time if train_tokens else None
    log(f"done: {summary['iters']} iters | val loss {summary['val_loss']:.4f} (best "
        f"{best_val_loss:.4f}) | val bpb {summary['val_bpb']:.4f} | "
        + (f"{summary['tokens_per_sec']:,.0f} tok/s | " if summary["tokens_per_sec"] else "")
        + f"{time.time() - run_start:.0f} s | {ckpt_path}")
    return summary


def format_duration(seconds):
    """12s, 3m05s, 2h07m: short enough for the progress line."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


# -----------------------------------------------------------------------------
# Command line


def default_config():
    """The config that fits this machine: the paper's 50M PRISM on a GPU, the small one on a CPU."""
    return os.path.join(HERE, "config", "prism_50m.py" if torch.cuda.is_available() else "cpu_small.py")


def field_descriptions(cls):
    """{field name: the comment on its line}: a setting is described once, where it is defined."""
    lines = inspect.getsource(cls).splitlines()
    return {m[1]: m[2].strip() for m in (re.match(r"\s+(\w+)\s*:[^#]*#(.*)", x) for x in lines) if m}


def _shown(value):  # as the command line spells it
    return "auto" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def usage(argv=()):
    """The docstring, then one line per setting: --name=DEFAULT, its description, and the value
    the default config gives it where that differs. The model's fields are those of --arch."""
    config = os.path.join("config", os.path.basename(default_config()))
    try:
        cfg, model_args = parse_args([default_config(), *[a for a in argv if a.startswith("--arch=")][-1:]])
    except TrainError:  # an unknown arch, or one without PRISM's sizes: the default config's
        cfg, model_args = parse_args([default_config()])
    lines = [__doc__.strip(), "", f"Settings: --name=DEFAULT  what it is  [{config}: its value there]"]
    for cls, values in ((TrainConfig, asdict(cfg)), (_get_arch(cfg.arch)[0], model_args)):
        lines += ["", f"{cls.__name__} (arch {cfg.arch}; --arch=NAME --help for another's):"
                  if cls is not TrainConfig else "TrainConfig:"]
        descriptions = field_descriptions(cls)
        for f in dataclasses.fields(cls):
            if f.name == "vocab_size":
                continue
            flag = f"--{f.name}={_shown(f.default)}"
            line = f"  {flag:<28} {descriptions.get(f.name, '')}"
            if f.name in values and values[f.name] != f.default:
                line += f"  [{config}: {_shown(values[f.name])}]"
            lines.append(line)
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(usage(argv))
        return None
    master = int(os.environ.get("RANK", 0)) == 0
    if all(a.startswith("--") for a in argv):
        config = default_config()
        if master:
            print(f"no config file given: using {os.path.relpath(config)} "
                  f"({'CUDA is available' if torch.cuda.is_available() else 'no CUDA: CPU'})")
        argv = [config, *argv]
    elif master:
        print(f"config: {', '.join(a for a in argv if not a.startswith('--'))}")
    try:
        return train(*parse_args(argv))
    except TrainError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt as e:
        if master:
            print(interrupted_message(e), file=sys.stderr)
        raise SystemExit(130) from None


def interrupted_message(e):
    """What to do after Ctrl-C: continue from the checkpoint, saying which iteration it holds."""
    if not isinstance(e, Interrupted):
        return "interrupted before training started"
    if e.ckpt_iter is None:
        return (f"interrupted at iter {e.iter_num}, before the first checkpoint: nothing to resume "
                f"yet ({e.ckpt_path} not written); run the same command again to start over")
    return (f"interrupted at iter {e.iter_num}: continue from iter {e.ckpt_iter} with "
            f"--init_from=resume ({e.ckpt_path})")


# -----------------------------------------------------------------------------
# Peak FLOP/s for MFU.
# Dense (no 2:4 sparsity) peak TFLOP/s by GPU, as torch.cuda.get_device_name() spells it, from
# the vendors' datasheets and architecture whitepapers; the datasheets quote tensor-core rates
# "with sparsity", twice the dense ones given here. bfloat16 / float16: tensor cores with float32
# accumulation (what PyTorch's matmuls use); tf32: float32 matmuls with allow_tf32 (train.py and
# lab/bench.py set it); float32: the plain CUDA cores. None: the GPU has no such unit.
# A name that no pattern matches gets no MFU: a guess from a similar name would be a wrong number.
GPU_PEAK_TFLOPS = (
    # (regex searched in the name, bfloat16, float16, tf32, float32)
    # NVIDIA H100 Tensor Core GPU Architecture whitepaper (SXM5, PCIe); H100 datasheet (NVL)
    (r"H100 80GB HBM3$", 989.4, 989.4, 494.7, 66.9),  # H100 SXM5 reports this name
    (r"H100 PCIe$", 756.5, 756.5, 378.0, 51.2),
    (r"H100 NVL$", 835.5, 835.5, 417.5, 60.0),
    # H200 datasheet: the SXM part has the H100 SXM5's compute, the NVL part the H100 NVL's
    (r"H200$", 989.4, 989.4, 494.7, 66.9),
    (r"H200 NVL$", 835.5, 835.5, 417.5, 60.0),
    # A100 datasheet: the same peaks for SXM4 and PCIe, 40 GB and 80 GB
    (r"A100[- ]", 312.0, 312.0, 156.0, 19.5),
    (r"NVIDIA A10$", 125.0, 125.0, 62.5, 31.2),         # A10 datasheet
    (r"NVIDIA L4$", 121.0, 121.0, 60.0, 30.3),          # L4 datasheet
    (r"NVIDIA L40S$", 362.05, 362.05, 183.0, 91.6),     # L40S datasheet
    # NVIDIA Ada Lovelace (RTX 4090) and Ampere GA102 (RTX 3090) architecture whitepapers; the
    # GeForce cards' tensor cores run at half rate with float32 accumulation, given here
    (r"GeForce RTX 4090$", 165.2, 165.2, 82.6, 82.6),
    (r"GeForce RTX 3090$", 71.0, 71.0, 35.6, 35.6),
    # V100 and T4 datasheets: float16 tensor cores only
    (r"V100-SXM2", None, 125.0, None, 15.7),
    (r"V100-PCIE", None, 112.0, None, 14.0),
    (r"Tesla T4$", None, 65.0, None, 8.1),
)
PEAK_DTYPES = ("bfloat16", "float16", "tf32", "float32")


def gpu_peak_flops(device_name, dtype="bfloat16"):
    """Dense peak FLOP/s of the GPU called `device_name` for matmuls in `dtype` (one of
    PEAK_DTYPES, or a torch dtype), or None where GPU_PEAK_TFLOPS does not know it."""
    dtype = str(dtype).removeprefix("torch.")
    if dtype not in PEAK_DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose from {', '.join(PEAK_DTYPES)}")
    for pattern, *peaks in GPU_PEAK_TFLOPS:
        if re.search(pattern, device_name):
            tflops = peaks[PEAK_DTYPES.index(dtype)]
            return None if tflops is None else tflops * 1e12
    return None


def current_gpu_peak_flops(dtype=None):
    """gpu_peak_flops of the current CUDA device (None without one, with a warning); dtype None:
    bfloat16 where torch.cuda.is_bf16_supported(), else float16, as dtype=auto picks."""
    if not torch.cuda.is_available():
        warnings.warn("no CUDA device: MFU not reported", stacklevel=2)
        return None
    name = torch.cuda.get_device_name()
    if dtype is None:
        dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    peak = gpu_peak_flops(name, dtype)
    if peak is None:
        warnings.warn(f"unknown device {name!r} for {dtype}: MFU not reported (its peak is not in "
                      "train.GPU_PEAK_TFLOPS)", stacklevel=2)
    return peak


if __name__ == "__main__":
    main()
