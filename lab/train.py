"""
Train one of the lab's archs at the size lab/variants.py matches to a PRISM config file.

    python -m lab.train config/cpu_small.py --arch=gpt2              # -> out/cpu_small_gpt2
    python -m lab.train config/cpu_small.py --arch=gemma3 --max_iters=100 --n_head=8

The config file's PRISM sizes become the arch's sizes at the same preset (variants.sizes_like_prism)
and its training settings stay; then the command line's --key=value (TrainConfig fields, and the
arch's own config fields) apply, as in train.py. Unless --out_dir is given, the run writes to the
config's out_dir + "_" + arch, so PRISM's checkpoint stays where it is.
"""

import dataclasses
import sys

import train
from configurator import read_settings, split_settings
from lab.variants import sizes_like_prism


def parse_args(argv):
    """(TrainConfig, model args of --arch) from PRISM config files and --key=value flags."""
    cfg, prism_args = train.parse_args([a for a in argv if not a.startswith("--")])
    given = read_settings([a for a in argv if a.startswith("--")])
    arch = given.pop("arch", (None,))[0]
    if arch is None:
        raise train.TrainError("--arch=NAME is required (python train.py trains PRISM itself)")
    train_args, arch_args = split_settings(given, train.TrainConfig, train.arch_config(arch),
                                           refused=train.REFUSED)
    try:
        model_args = {**sizes_like_prism(arch, prism_args), **arch_args}
    except ValueError as e:
        raise train.TrainError(str(e)) from None
    out_dir = train_args.pop("out_dir", f"{cfg.out_dir}_{arch}")  # PRISM's checkpoint stays
    return dataclasses.replace(cfg, arch=arch, out_dir=out_dir, **train_args), model_args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        return print(__doc__.strip())
    try:
        if all(a.startswith("--") for a in argv):  # no config file: train.py's default one
            argv = [train.default_config(), *argv]
        return train.train(*parse_args(argv))
    except train.USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
