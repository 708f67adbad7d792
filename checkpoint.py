"""
The checkpoint file: checkpoint_payload is a model in it (arch, config, weights, the vocabulary its
token ids belong to); training_checkpoint adds what an exact resume needs (optimizer, scaler, every
process's RNG states, settings), which restore_training_state puts back. sample.py and
analyze_heads.py read a model back with load_model. Written whole or not at all
(replace_file, which train.py uses for log.jsonl too); read without running any code it holds.
"""

import os
import pickle
from dataclasses import asdict

import torch

from model import build_model


class CheckpointError(ValueError):
    """A file that cannot be loaded as a checkpoint; the message is one line for the user."""


def checkpoint_payload(model):
    """A model in a checkpoint: its arch, config, weights (λ included) and the vocabulary its token
    ids belong to (train.py sets it from the data's meta.json)."""
    return {"arch": model.arch, "model_config": asdict(model.config), "model": model.state_dict(),
            "vocabulary": getattr(model, "vocabulary", None)}


def replace_file(path, write):
    """write(f) into path + ".tmp", then os.replace: a reader never sees half a file."""
    with open(path + ".tmp", "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def read_checkpoint(path, device="cpu"):
    """torch.load with weights_only=True: tensors and plain data only. A pickle can carry code
    that runs while it loads; this refuses it before anything runs, as it does a file that is no
    checkpoint (CheckpointError)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except FileNotFoundError:
        raise FileNotFoundError(f"no checkpoint at {path}") from None
    if not (head == b"PK\x03\x04" or head[:1] == b"\x80"):  # a zip archive, or a legacy pickle
        raise CheckpointError(f"{path} is not a PyTorch checkpoint file")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path} is not a safe checkpoint: it contains code/objects other "
                              "than tensors and plain data; refusing to load") from None
    except Exception:  # a truncated or damaged archive; torch's own message is not for the user
        raise CheckpointError(f"{path} is damaged or truncated (not a complete PyTorch "
                              "checkpoint)") from None


def load_model(path, device="cpu"):
    """The model of a checkpoint written by train.py, in eval mode, on `device`."""
    ckpt = read_checkpoint(path, device)
    if not isinstance(ckpt, dict) or not {"arch", "model_config", "model"} <= ckpt.keys():
        raise CheckpointError(f"{path} is not a prism-nano checkpoint (no arch/model_config/model)")
    model = build_model(ckpt["arch"], **ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    model.vocabulary = ckpt.get("vocabulary")
    # what the checkpoint says of its run, for the scripts' "loaded ..." line (None: absent)
    model.training_run = {k: ckpt.get(k) for k in ("iter_num", "best_val_loss", "train_config")}
    return model.to(device).eval()


def rng_states(rng, device):
    """This process's random states: numpy's generator (the data order), torch's and CUDA's (dropout)."""
    return {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state(),
            **({"cuda": torch.cuda.get_rng_state(device)} if torch.device(device).type == "cuda" else {})}


def training_checkpoint(model, optimizer, scaler, train_config, iter_num, best_val_loss, states_by_rank,
                        elapsed_s):
    """What train.py writes at every evaluation: the model, and all an exact resume needs
    (states_by_rank: every process's rng_states, in rank order)."""
    return {**checkpoint_payload(model), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "train_config": train_config, "iter_num": iter_num, "best_val_loss": best_val_loss,
            "rng": states_by_rank, "elapsed_s": elapsed_s}


def restore_training_state(ckpt, model, optimizer, scaler, rng, rank, device):
    """training_checkpoint's state back into the run (process `rank`'s own random states);
    -> (iter_num, best_val_loss, elapsed_s)."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    state = ckpt["rng"][rank % len(ckpt["rng"])]
    rng.bit_generator.state = state["numpy"]
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    return ckpt["iter_num"], ckpt["best_val_loss"], ckpt.get("elapsed_s", 0.0)


def read_training_checkpoint(path, arch, model_config):
    """The checkpoint train.py resumes from, checked to hold a model of this arch and config."""
    if not os.path.isfile(path):
        raise CheckpointError(f"init_from = 'resume' but there is no checkpoint at {path}: nothing "
                              "to resume yet (train from scratch first: --init_from=scratch)")
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or not {"arch", "model_config", "model", "iter_num"} <= ckpt.keys():
        raise CheckpointError(f"{path} is not a checkpoint written by train.py")
    if ckpt["arch"] != arch:
        raise CheckpointError(f"{path} holds a {ckpt['arch']!r} model, but arch = {arch!r}")
    if differ := [f"{k} = {v!r} (checkpoint: {ckpt['model_config'].get(k, '<absent>')!r})"
                  for k, v in model_config.items() if ckpt["model_config"].get(k, object()) != v]:
        raise CheckpointError(f"{path} holds a model of another size: {'; '.join(differ)}")
    return ckpt
