"""
Train a language model of this project (PRISM, or a baseline) on tokens from prepare_tinystories.py.
One file, top to bottom: settings, data, schedule, evaluation, checkpoints, the loop, the CLI.

    python train.py                                    # config/prism_50m.py on CUDA, else config/cpu_tiny.py
    python train.py config/prism_50m.py --max_iters=100 --batch_size=8
    python train.py config/cpu_tiny.py --init_from=resume           # continue out_dir/ckpt.pt
    torchrun --standalone --nproc_per_node=8 train.py config/prism_50m.py   # DDP, one process per GPU

Settings are the fields of TrainConfig below plus the fields of the arch's config dataclass
(model.py's PrismConfig for "prism": n_layer, n_embd, n_head, head_dim, block_size, ...). A config
file is a Python file that assigns some of them; `--key=value` arguments are applied after it.
`preset` takes the model's sizes from baselines.PRESETS, where every arch has PRISM's parameter
count, so the shipped configs train any --arch; model fields that are set override the preset's,
the others keep the dataclass defaults; vocab_size always comes from meta.json.

Outputs, written by rank 0 only: out_dir/log.jsonl (one JSON record per evaluation) and
out_dir/ckpt.pt (model, optimizer, settings, iteration, RNG states; rewritten at every evaluation).
"""

import dataclasses
import inspect
import io
import json
import math
import os
import re
import sys
import time
import tokenize
import types
import typing
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from typing import Optional

import numpy as np
import torch

from model import CheckpointError, build_model, checkpoint_payload, get_arch, read_checkpoint
from lab.baselines import PRESETS, preset_sizes

HERE = os.path.dirname(os.path.abspath(__file__))


class TrainError(Exception):
    """A mistake in the settings, the data or the checkpoint: main() prints it as one line."""


# -----------------------------------------------------------------------------
# Settings


@dataclass
class TrainConfig:
    # data and outputs
    data_dir: str = "data/tinystories"  # train.bin, val.bin, meta.json (prepare_tinystories.py)
    out_dir: str = "out"                # ckpt.pt and log.jsonl
    init_from: str = "scratch"          # "scratch" or "resume" (from out_dir/ckpt.pt)
    # the model: its sizes (n_layer, n_embd, block_size, ...) are the fields of the arch's config
    arch: str = "prism"                 # "prism", or a baseline of baselines.py: "gpt2", "gemma3"
    preset: Optional[str] = None        # model sizes of every arch at PRISM's parameter count (baselines.PRESETS); set model fields win
    # batch: tokens per iteration = batch_size * grad_accum * block_size
    batch_size: int = 12                # sequences per micro-step and process
    grad_accum: int = 1                 # micro-steps per iteration, split across the processes
    # AdamW and the learning-rate schedule: linear warmup, then cosine down to min_lr at max_iters
    max_iters: int = 5000               # iterations (optimizer steps) of the whole run
    learning_rate: float = 6e-4         # peak learning rate, reached after warmup_iters
    min_lr: float = 6e-5                # learning rate at max_iters, the end of the cosine
    warmup_iters: int = 200             # iterations of linear warmup from ~0 to learning_rate
    weight_decay: float = 0.1           # AdamW weight decay, on matrices and embeddings only
    beta1: float = 0.9                  # AdamW β1
    beta2: float = 0.95                 # AdamW β2
    grad_clip: float = 1.0              # clip the gradient norm to this; 0 = off
    # evaluation and progress
    eval_interval: int = 250            # evaluate, log and checkpoint every this many iterations
    eval_iters: int = 100               # batches per split in one evaluation
    log_interval: int = 10              # a progress line every this many iterations
    # system
    device: str = "auto"                # "auto" = cuda if there is one, else cpu; or "cuda:1", "mps"
    dtype: str = "auto"                 # "auto" = bfloat16 on CUDA (float16 without bf16), else float32
    compile: Optional[bool] = None      # torch.compile; auto = on with CUDA only
    seed: int = 1337                    # fixes the initialisation and the data order

    def __post_init__(self):
        def need(ok, name, why):
            if not ok:
                raise TrainError(f"{name} = {getattr(self, name)!r} {why}")

        need(self.init_from in ("scratch", "resume"), "init_from", "must be 'scratch' or 'resume'")
        need(self.preset is None or self.preset in PRESETS, "preset",
             f"is not a size preset of baselines.py ({', '.join(PRESETS)})")
        need(self.dtype in ("auto", "float32", "bfloat16", "float16"), "dtype",
             "must be auto, float32, bfloat16 or float16")
        for name in ("batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval"):
            need(getattr(self, name) > 0, name, "must be positive")
        for name in ("max_iters", "warmup_iters", "grad_clip", "weight_decay"):
            need(getattr(self, name) >= 0, name, "must not be negative")
        need(self.learning_rate > 0, "learning_rate", "must be positive")
        need(0 <= self.min_lr <= self.learning_rate, "min_lr", "must be in [0, learning_rate]")


def _field_types(cls):
    return typing.get_type_hints(cls)


def _parse_value(key, raw, typ):
    """A command-line string as a value of the field's type."""
    if typing.get_origin(typ) in (typing.Union, types.UnionType):  # Optional[X]: "none"/"auto" = None
        if raw.lower() in ("none", "auto"):
            return None
        typ = next(a for a in typing.get_args(typ) if a is not type(None))
    if typ is bool:
        if raw.lower() in ("true", "1"):
            return True
        if raw.lower() in ("false", "0"):
            return False
        raise TrainError(f"--{key} expects true or false, got {raw!r}")
    if typ in (int, float, str):
        try:
            return typ(raw)
        except ValueError:
            raise TrainError(f"--{key} expects {typ.__name__}, got {raw!r}") from None
    raise TrainError(f"--{key}: cannot parse a value of type {typ} from the command line")


def _check_value(key, value, typ, source):
    """A value from a config file, checked against the field's type (an int is a fine float)."""
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        if value is None:
            return None
        typ = next(a for a in typing.get_args(typ) if a is not type(None))
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ in (bool, int, float, str) and (type(value) is not typ):
        raise TrainError(f"{key} = {value!r} in {source} should be of type {typ.__name__}")
    return value


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


def parse_args(argv):
    """Config files and --key=value arguments -> (TrainConfig, model_args).

    Applied in order. Keys that are TrainConfig fields go to the TrainConfig; keys that are fields
    of the arch's config dataclass go to model_args (only the ones set: the rest keep the
    dataclass defaults); any other key is an error naming it."""
    settings = []  # (key, value, source, from_command_line)
    for arg in argv:
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if not eq or not key:
                raise TrainError(f"expected --key=value, got {arg!r}")
            settings.append((key, value, "the command line", True))
        else:
            settings += [(k, v, arg, False) for k, v in read_config_file(arg).items()]

    train_types = _field_types(TrainConfig)
    arch = TrainConfig.arch
    for key, value, source, raw in settings:
        if key == "arch":
            arch = _parse_value(key, value, str) if raw else _check_value(key, value, str, source)
    config_cls = _arch_config(arch)
    model_types = _field_types(config_cls)

    train_args, model_args = {}, {}
    for key, value, source, raw in settings:
        if key in train_types:
            typ, dest = train_types[key], train_args
        elif key == "vocab_size":
            raise TrainError(f"vocab_size (from {source}) is not a setting: it comes from the "
                             "data's meta.json")
        elif key in model_types:
            typ, dest = model_types[key], model_args
        else:
            raise TrainError(f"unknown key {key!r} (from {source}): it is neither a TrainConfig "
                             f"field nor a {config_cls.__name__} field (arch {arch!r})")
        dest[key] = _parse_value(key, value, typ) if raw else _check_value(key, value, typ, source)
    return TrainConfig(**train_args), model_args


def model_settings(cfg, model_args):
    """The model fields of a run: the preset's sizes for cfg.arch, then the fields that are set."""
    if cfg.preset is None:
        return dict(model_args)
    try:
        return {**preset_sizes(cfg.preset, cfg.arch), **model_args}
    except ValueError as e:
        raise TrainError(str(e)) from None


def _arch_config(arch):
    try:
        return get_arch(arch)[0]
    except ValueError as e:
        raise TrainError(str(e)) from None


def resolve_system(cfg, local_rank=None):
    """The TrainConfig with device, dtype and compile made concrete for this machine."""
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
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
# Data: train.bin / val.bin are raw uint16 GPT-2 tokens; a batch is random windows of them.


def load_data(data_dir):
    """(train, val, meta): memmap views of the token files and the parsed meta.json."""
    if not os.path.isdir(data_dir):
        raise TrainError(f"data_dir {data_dir} does not exist; make it with "
                         f"`python prepare_tinystories.py` (see README.md)")
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
    """Inputs x and next-token targets y, int64 (len(offsets), block_size), for windows of the
    token array `data` starting at `offsets`; on CUDA through pinned memory, without blocking."""
    windows = np.stack([data[i: i + block_size + 1] for i in offsets]).astype(np.int64)
    windows = torch.from_numpy(windows)
    x, y = windows[:, :-1], windows[:, 1:]
    if torch.device(device).type == "cuda":
        return (x.pin_memory().to(device, non_blocking=True),
                y.pin_memory().to(device, non_blocking=True))
    return x.contiguous().to(device), y.contiguous().to(device)


# -----------------------------------------------------------------------------
# Schedule and evaluation


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
    seed, so that evaluations along a run (and across runs) see the same text. Under DDP each
    process takes every world_size-th batch and the sum is all-reduced: the result does not
    depend on the number of processes."""
    rng = np.random.default_rng(seed)
    offsets = random_offsets(rng, len(data), block_size, (eval_iters, batch_size))
    was_training = model.training
    model.eval()
    total = 0.0
    for k in range(rank, eval_iters, world_size):
        x, y = get_batch(data, offsets[k], block_size, device)
        with ctx:
            _, loss = model(x, y)
        total += loss.item()
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
            _, loss = model(x, y)
        total += loss.item() * len(offsets)  # every window has block_size targets
    model.train(was_training)
    return total / n_windows


def bits_per_byte(loss, meta):
    """Nats per token -> bits per byte of the original text, from meta.json's token and byte counts."""
    return loss / math.log(2) * meta["val_tokens"] / meta["val_bytes"]


# -----------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path, payload):
    """torch.save to a temporary file, then os.replace: a reader never sees half a checkpoint."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    differ = [f"{k} = {v!r} (checkpoint: {ckpt['model_config'].get(k, '<absent>')!r})"
              for k, v in model_config.items() if ckpt["model_config"].get(k, object()) != v]
    differ += [f"{k} absent (checkpoint: {v!r})" for k, v in ckpt["model_config"].items()
               if k not in model_config]
    if differ:
        raise TrainError(f"{path} holds a model of another size: {'; '.join(differ)}")
    return ckpt


def _rng_states(rng, device):
    state = {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state()}
    if torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_states(state, rng, device):
    rng.bit_generator.state = state["numpy"]
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _read_log(path):
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# -----------------------------------------------------------------------------
# The training loop


def train(cfg, model_args=None):
    """Train as `cfg` and `model_args` say; returns a summary (rank 0's numbers under DDP):
    arch, params, iters, tokens, final and best val loss, val ppl and bpb, train loss, tokens/s."""
    model_args = model_settings(cfg, model_args or {})
    procs = Processes.from_environment()
    cfg = resolve_system(cfg, procs.local_rank)
    if cfg.grad_accum % procs.world_size:
        raise TrainError(f"grad_accum = {cfg.grad_accum} must be a multiple of the number of "
                         f"processes ({procs.world_size})")

    # -- data, model, checkpoint: check everything before starting processes or writing files ----
    train_data, val_data, meta = load_data(cfg.data_dir)
    config_cls = _arch_config(cfg.arch)
    try:
        model_config = asdict(config_cls(**{**model_args, "vocab_size": meta["vocab_size"]}))
    except (TypeError, ValueError) as e:
        raise TrainError(str(e)) from None
    block_size = model_config["block_size"]
    for name, data in (("train", train_data), ("val", val_data)):
        if len(data) <= block_size + 1:
            raise TrainError(f"{name}.bin has {len(data)} tokens, too few for block_size = {block_size}")
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    ckpt = load_checkpoint(ckpt_path, cfg.arch, model_config) if cfg.init_from == "resume" else None

    if procs.distributed:
        if torch.device(cfg.device).type == "cuda":
            torch.cuda.set_device(cfg.device)
        torch.distributed.init_process_group(
            backend="nccl" if torch.device(cfg.device).type == "cuda" else "gloo")
    try:
        return _train(Run(cfg, model_config, train_data, val_data, meta, procs), ckpt)
    finally:
        if procs.distributed:
            torch.distributed.destroy_process_group()


def _train(run, ckpt):
    """The loop, nanoGPT's shape: evaluate and checkpoint every eval_interval iterations, else one
    optimizer step, and a progress line every log_interval."""
    cfg = run.cfg
    run.build_model_and_optimizer()
    if ckpt is not None:
        run.resume_from(ckpt)
    else:
        run.start_a_fresh_log()
    run.wrap_model()  # torch.compile, DistributedDataParallel
    run.start_clock()
    while True:
        run.set_learning_rate()
        if run.iter_num % cfg.eval_interval == 0 or run.iter_num == cfg.max_iters:
            run.evaluate_and_checkpoint()
        if run.iter_num >= cfg.max_iters:
            break
        run.optimizer_step()
        if run.iter_num % cfg.log_interval == 0 or run.iter_num == cfg.max_iters:
            run.report_progress()
    run.report_done()
    return run.summary


@dataclass
class Processes:
    """This process's place in the run: the only one, or one of world_size under torchrun."""
    distributed: bool = False
    rank: int = 0
    local_rank: Optional[int] = None
    world_size: int = 1

    @classmethod
    def from_environment(cls):
        if int(os.environ.get("RANK", -1)) == -1:
            return cls()
        return cls(True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]),
                   int(os.environ["WORLD_SIZE"]))

    @property
    def master(self):
        return self.rank == 0


class Run:
    """One training run: its settings, data, model and optimizer, and the counters the loop in
    _train() advances. Each method is one step of that loop."""

    def __init__(self, cfg, model_config, train_data, val_data, meta, procs):
        self.cfg, self.model_config, self.meta, self.procs = cfg, model_config, meta, procs
        self.train_data, self.val_data = train_data, val_data
        self.device, self.device_type = cfg.device, torch.device(cfg.device).type
        self.block_size = model_config["block_size"]
        self.accum = cfg.grad_accum // procs.world_size  # this process's micro-steps per iteration
        self.tokens_per_iter = cfg.batch_size * cfg.grad_accum * self.block_size
        self.ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
        self.log_path = os.path.join(cfg.out_dir, "log.jsonl")
        self.log = print if procs.master else (lambda *a, **k: None)
        self.iter_num, self.best_val_loss, self.lr = 0, math.inf, None
        self.start_iter = 0  # where this process started: a resumed run's checkpoint iteration
        self.log(f"arch {cfg.arch} | device {self.device} ({procs.world_size} "
                 f"process{'es' if procs.world_size > 1 else ''}) | dtype {cfg.dtype} | compile "
                 f"{cfg.compile} | {self.tokens_per_iter:,} tokens/iter "
                 f"({cfg.batch_size} x {cfg.grad_accum} x {self.block_size})")
        if procs.master:
            os.makedirs(cfg.out_dir, exist_ok=True)
        if self.device_type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                        "float16": torch.float16}[cfg.dtype]
        self.ctx = (nullcontext() if self.ptdtype == torch.float32
                    else torch.autocast(self.device_type, dtype=self.ptdtype))

    # -- setup --------------------------------------------------------------------------------

    def build_model_and_optimizer(self):
        cfg = self.cfg
        # The same batch generator on every process: each draws the whole iteration's batch and
        # takes its own micro-steps, so N processes see exactly the data one process would.
        torch.manual_seed(cfg.seed + self.procs.rank)  # the init (DDP broadcasts rank 0's), dropout
        self.rng = np.random.default_rng(cfg.seed)
        self.raw_model = build_model(cfg.arch, **self.model_config).to(self.device)
        self.log(self.raw_model.describe_parameters())
        # The ids' meaning travels with the checkpoint, so sample.py can print text without the data.
        self.raw_model.vocabulary = {k: self.meta[k] for k in ("tokenizer", "vocab_size", "eot_token",
                                                               "compact_vocab") if k in self.meta}
        self.optimizer = self.raw_model.configure_optimizers(
            cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), self.device_type)
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=self.ptdtype == torch.float16)
        self.summary = {"arch": cfg.arch, "params": self.raw_model.get_num_params(),
                        "out_dir": cfg.out_dir}

    def resume_from(self, ckpt):
        self.raw_model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.iter_num, self.best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
        self.start_iter = self.iter_num
        states = ckpt["rng"]
        _set_rng_states(states[self.procs.rank % len(states)], self.rng, self.device)
        changed = [f"{k}={v!r} (was {ckpt['train_config'].get(k)!r})"
                   for k, v in asdict(self.cfg).items()
                   if k != "init_from" and ckpt["train_config"].get(k) != v]
        self.log(f"resuming from {self.ckpt_path} at iter {self.iter_num}"
                 + (f"; changed: {', '.join(changed)}" if changed else ""))
        if self.procs.master:  # drop log records from after the checkpoint (a crash between the two)
            records = [r for r in _read_log(self.log_path) if r["iter"] <= self.iter_num]
            with open(self.log_path + ".tmp", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
            os.replace(self.log_path + ".tmp", self.log_path)

    def start_a_fresh_log(self):
        if self.procs.master and os.path.exists(self.log_path):
            os.remove(self.log_path)

    def wrap_model(self):
        self.model = torch.compile(self.raw_model) if self.cfg.compile else self.raw_model
        self.eval_model = self.model  # evaluation needs no gradient all-reduce
        if self.procs.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: PLC0415
            # The buffers (RoPE tables) are constants: no need to send them at every forward.
            no_sync_buffers = ({"forward_sync_buffers": False}
                               if "forward_sync_buffers" in inspect.signature(DDP).parameters
                               else {"broadcast_buffers": False})  # PyTorch before 2.13
            self.model = DDP(self.model, device_ids=[self.device] if self.device_type == "cuda" else None,
                             **no_sync_buffers)

    def start_clock(self):
        self.run_start = time.time()
        self.train_time, self.train_tokens = 0.0, 0  # this process's run, for the summary
        self.t_seg, self.seg_iters = time.time(), 0  # since the last evaluation, for log.jsonl
        self.t_log, self.iters_since_log, self.loss_sum = time.time(), 0, 0.0
        self.mfu = -1.0

    # -- the steps of the loop ------------------------------------------------------------------

    def set_learning_rate(self):
        self.lr = get_lr(self.iter_num, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr

    def evaluate_and_checkpoint(self):
        cfg, meta, procs = self.cfg, self.meta, self.procs
        self._sync()
        seg_time = time.time() - self.t_seg  # training time since the last evaluation
        self.train_time += seg_time
        kw = dict(block_size=self.block_size, batch_size=cfg.batch_size, eval_iters=cfg.eval_iters,
                  device=self.device, ctx=self.ctx, rank=procs.rank, world_size=procs.world_size)
        train_loss = estimate_loss(self.eval_model, self.train_data, seed=cfg.seed + 1, **kw)
        val_loss = estimate_loss(self.eval_model, self.val_data, seed=cfg.seed + 2, **kw)
        self.best_val_loss = min(self.best_val_loss, val_loss)
        tokens = self.iter_num * self.tokens_per_iter
        record = {"iter": self.iter_num, "train_loss": train_loss, "val_loss": val_loss,
                  "val_ppl": math.exp(min(val_loss, 700)), "val_bpb": bits_per_byte(val_loss, meta),
                  "lr": self.lr, "tokens": tokens,
                  "tokens_per_sec": (self.seg_iters * self.tokens_per_iter / seg_time
                                     if self.seg_iters else None),
                  "elapsed_s": round(time.time() - self.run_start, 3)}
        if self.device_type == "cuda" and self.mfu > 0:
            record["mfu"] = self.mfu
        self.log(f"eval iter {self.iter_num}: train loss {train_loss:.4f} | val loss {val_loss:.4f} | "
                 f"val ppl {record['val_ppl']:.2f} | val bpb {record['val_bpb']:.4f}"
                 + (" (best)" if val_loss == self.best_val_loss else ""))
        self.summary.update(iters=self.iter_num, tokens=tokens, train_loss=train_loss,
                            val_loss=val_loss, val_ppl=record["val_ppl"], val_bpb=record["val_bpb"],
                            best_val_loss=self.best_val_loss,
                            best_val_bpb=bits_per_byte(self.best_val_loss, meta))
        # The checkpoint is the resume point, so it is written at every evaluation (always, not
        # only when val improves); best_val_loss rides along. A resumed run re-evaluates where it
        # starts but does not log or save that point again.
        states = _rng_states(self.rng, self.device)
        if procs.world_size > 1:  # every process's, so each resumes its own
            gathered = [None] * procs.world_size
            torch.distributed.all_gather_object(gathered, states)
            states = gathered
        else:
            states = [states]
        if procs.master and not (self.iter_num == self.start_iter and cfg.init_from == "resume"):
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            save_checkpoint(self.ckpt_path, {
                **checkpoint_payload(self.raw_model), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "train_config": asdict(cfg),
                "iter_num": self.iter_num, "best_val_loss": self.best_val_loss, "rng": states})
        self.seg_iters = 0
        self.t_seg = self.t_log = time.time()

    def optimizer_step(self):
        """grad_accum micro-batches, this process's share of them, then one AdamW step."""
        cfg, rank, accum, model = self.cfg, self.procs.rank, self.accum, self.model
        offsets = random_offsets(self.rng, len(self.train_data), self.block_size,
                                 (cfg.grad_accum, cfg.batch_size))
        mine = offsets[rank * accum:(rank + 1) * accum]
        x, y = get_batch(self.train_data, mine[0], self.block_size, self.device)
        for micro in range(accum):
            last = micro == accum - 1
            # Under DDP the gradients are all-reduced once, after the last micro-step.
            with (model.no_sync() if self.procs.world_size > 1 and not last else nullcontext()):
                with self.ctx:
                    _, loss = model(x, y)
                    loss = loss / accum
                if not last:  # fetch the next micro-batch while this one runs on the GPU
                    x, y = get_batch(self.train_data, mine[micro + 1], self.block_size, self.device)
                self.scaler.scale(loss).backward()
            self.loss_sum += loss.detach().float()
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.iter_num += 1
        self.iters_since_log += 1
        self.seg_iters += 1
        self.train_tokens += self.tokens_per_iter

    def report_progress(self):
        """The mean loss since the last line, speed, and the time left at this speed."""
        cfg = self.cfg
        if self.procs.world_size > 1:  # the mean over all processes, not rank 0's share
            torch.distributed.all_reduce(self.loss_sum)
            self.loss_sum /= self.procs.world_size
        mean_loss = (self.loss_sum / self.iters_since_log).item()  # waits for the GPU
        dt = (time.time() - self.t_log) / self.iters_since_log
        if self.device_type == "cuda":
            # float32 matmuls run as TF32 here (allow_tf32 above): that is the peak they reach
            peak_dtype = "tf32" if self.ptdtype == torch.float32 else self.ptdtype
            step_mfu = self.raw_model.estimate_mfu(cfg.batch_size * self.accum, dt, dtype=peak_dtype)
            self.mfu = step_mfu if self.mfu < 0 else 0.9 * self.mfu + 0.1 * step_mfu
        eta = (cfg.max_iters - self.iter_num) * dt  # evaluations still to come not included
        self.log(f"iter {self.iter_num}/{cfg.max_iters} | loss {mean_loss:.4f} | lr {self.lr:.2e} | "
                 f"{self.tokens_per_iter / dt:,.0f} tok/s | {dt * 1000:.1f} ms/iter | "
                 f"eta {format_duration(eta)}"
                 + (f" | mfu {self.mfu * 100:.1f}%" if self.device_type == "cuda" else ""))
        self.t_log, self.iters_since_log, self.loss_sum = time.time(), 0, 0.0

    def report_done(self):
        s = self.summary
        s["tokens_per_sec"] = self.train_tokens / self.train_time if self.train_time else None
        self.log(f"done: {s['iters']} iters | val loss {s['val_loss']:.4f} (best "
                 f"{s['best_val_loss']:.4f}) | val bpb {s['val_bpb']:.4f} | "
                 + (f"{s['tokens_per_sec']:,.0f} tok/s | " if s["tokens_per_sec"] else "")
                 + f"{time.time() - self.run_start:.0f} s | {self.ckpt_path}")

    def _sync(self):
        if self.device_type == "cuda":
            torch.cuda.synchronize()


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
    """The config that fits this machine: the 50M PRISM on a GPU, the tiny one on a CPU."""
    name = "prism_50m.py" if torch.cuda.is_available() else "cpu_tiny.py"
    return os.path.join(HERE, "config", name)


def default_checkpoint():
    """The checkpoint `python train.py` (no config file) writes on this machine: the default
    config's out_dir/ckpt.pt, relative to where it runs. sample.py and analyze_heads.py start there."""
    out_dir = read_config_file(default_config()).get("out_dir", TrainConfig.out_dir)
    return os.path.join(out_dir, "ckpt.pt")


def field_descriptions(cls):
    """{field name: the comment on its line in the source}: a setting is described once, where
    it is defined, and --help reads it from there."""
    source = inspect.getsource(cls)
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT}
    names = {f.name for f in fields(cls)}
    described = {}
    for line_no, line in enumerate(source.splitlines(), start=1):
        match = re.match(r"\s+(\w+)\s*:", line)
        if match and match.group(1) in names:
            described[match.group(1)] = comments.get(line_no, "")
    return described


def _shown(value, typ):
    if value is None:  # how the command line spells it: auto for a switch, none for a choice
        return "auto" if bool in typing.get_args(typ) else "none"
    return str(value).lower() if isinstance(value, bool) else str(value)


def usage(argv=()):
    """The docstring, then one line per setting: --name=DEFAULT, its description, and the value
    the default config gives it where that differs. The arch's fields are those of --arch if
    given, else of the default config's arch."""
    config = default_config()
    config_name = os.path.join("config", os.path.basename(config))
    arch_args = [a for a in argv if a.startswith("--arch=")][-1:]
    try:
        cfg, model_args = parse_args([config, *arch_args])
    except TrainError:  # an unknown arch: show the default config's
        cfg, model_args = parse_args([config])
    config_cls = _arch_config(cfg.arch)
    sections = [(TrainConfig, asdict(cfg), "TrainConfig fields"),
                (config_cls, model_settings(cfg, model_args),
                 f"{config_cls.__name__} fields (arch {cfg.arch}; --arch=NAME --help for another; "
                 "vocab_size comes from meta.json)")]
    lines = [__doc__.strip(), "",
             f"Settings: --name=DEFAULT, what it is, and [{config_name}: VALUE] where the config "
             "that `python train.py` picks here sets another value."]
    for cls, config_values, title in sections:
        lines += ["", f"{title}:"]
        types_, descriptions = _field_types(cls), field_descriptions(cls)
        for f in fields(cls):
            if f.name == "vocab_size":
                continue
            flag = f"--{f.name}={_shown(f.default, types_[f.name])}"
            line = f"  {flag:<30} {descriptions[f.name]}"
            if f.name in config_values and config_values[f.name] != f.default:
                line += f"  [{config_name}: {_shown(config_values[f.name], types_[f.name])}]"
            lines.append(line)
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(usage(argv))
        return None
    master = int(os.environ.get("RANK", 0)) == 0
    if not any(not a.startswith("--") for a in argv):
        config = default_config()
        if master:
            print(f"no config file given: using {os.path.relpath(config)} "
                  f"({'CUDA is available' if torch.cuda.is_available() else 'no CUDA: CPU'})")
        argv = [config, *argv]
    elif master:
        print(f"config: {', '.join(a for a in argv if not a.startswith('--'))}")
    cfg, started = None, time.time()
    try:
        cfg, model_args = parse_args(argv)
        return train(cfg, model_args)
    except TrainError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        if master:
            print(interrupted_message(cfg, started), file=sys.stderr)
        raise SystemExit(130) from None


def interrupted_message(cfg, started):
    """What to do after Ctrl-C: resume from a checkpoint this run can continue from (one it wrote,
    or the one it resumed from), or, before there is one, start again."""
    if cfg is None:
        return "interrupted"
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    resumable = os.path.isfile(ckpt_path) and (cfg.init_from == "resume"
                                               or os.path.getmtime(ckpt_path) >= started)
    if resumable:
        return f"interrupted: continue with --init_from=resume (from the last checkpoint, {ckpt_path})"
    return (f"interrupted before the first checkpoint: nothing to resume yet ({ckpt_path} not "
            "written); run the same command again to start over")


if __name__ == "__main__":
    main()
