"""
model.py's PRISM against the author's code, side by side: the same function from the same
weights, and the training step time of each on this machine.

    python -m lab.versus_author --author_repo=PATH              # a clone of HuangDongchen/PRISM-Transformer
    python -m lab.versus_author --author_repo=PATH --preset=paper-50m --batch_size=4 --device=cuda

The author's model.py is imported from the clone you give (this project holds none of its code).
Both models are built at a preset's size (lab/variants.py), the author's weights are copied into
ours (renamed, not permuted) and the logits compared; then a forward, backward and AdamW step of
each is timed, alternating between the two so that both see the same machine, and the medians
and their ratio printed (ours / theirs: below 1 is faster).
"""

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

from lab.variants import preset_sizes
from model import build_model

RENAMED = (("attn.u_proj.", "attn.dictionary."), ("attn.lambda_q", "attn.noise_weight"),
           ("mlp.c_fc.", "mlp.fc."), ("mlp.c_proj.", "mlp.proj."))


def authors_model(repo, sizes, vocab_size):
    """The author's GPT at these sizes, from model.py in the clone at `repo`."""
    path = Path(repo) / "model.py"
    if not path.is_file():
        raise SystemExit(f"error: no model.py in {repo} (a clone of HuangDongchen/PRISM-Transformer)")
    spec = importlib.util.spec_from_file_location("authors_prism", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.GPTConfig(block_size=sizes["block_size"], vocab_size=vocab_size, n_layer=sizes["n_layer"],
                              n_head=sizes["n_head"], n_embd=sizes["n_embd"], dropout=0.0, bias=False,
                              prism_expansion_ratio=sizes["expansion"])
    return module.GPT(config)


def ours_from(theirs, sizes, vocab_size):
    """model.py's PRISM holding the author's weights, renamed."""
    ours = build_model("prism", **sizes, vocab_size=vocab_size)
    state = {}
    for name, value in theirs.state_dict().items():
        if not name.endswith("attn.bias"):  # their causal mask, a buffer
            for old, new in RENAMED:
                name = name.replace(old, new)
            state[name] = value
    ours.load_state_dict(state)
    return ours


def step_time(model, optimizer, x, y, ctx):
    start = time.perf_counter()
    with ctx:
        loss = model(x, y)[1]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--author_repo", required=True, help="a clone of HuangDongchen/PRISM-Transformer")
    p.add_argument("--preset", default="cpu-small", help="sizes (lab/variants.py PRESETS)")
    p.add_argument("--vocab_size", type=int, default=4097, help="vocabulary (4097: the sample's)")
    p.add_argument("--batch_size", type=int, default=16, help="sequences per step")
    p.add_argument("--steps", type=int, default=20, help="timed steps of each model")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="bfloat16 runs both under torch.autocast")
    args = p.parse_args(argv)
    sizes = preset_sizes(args.preset, "prism")
    torch.manual_seed(0)
    padded = 64 * -(-args.vocab_size // 64)  # ours pads its embedding: theirs is given that size
    theirs = authors_model(args.author_repo, sizes, padded).to(args.device)
    ours = ours_from(theirs, sizes, args.vocab_size).to(args.device)
    for model in (theirs, ours):
        for block in model.transformer.h:
            (block.attn.lambda_q if hasattr(block.attn, "lambda_q") else block.attn.noise_weight).fill_(0.05)
    T = sizes["block_size"]
    tokens = torch.randint(0, args.vocab_size, (args.batch_size, T + 1), device=args.device)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    with torch.no_grad():
        gap = (theirs(x, y)[0][..., :args.vocab_size] - ours(x, y)[0]).abs().max()
    print(f"{args.preset}: {ours.get_num_params():,} parameters each; largest logit difference "
          f"with the same weights, float32: {gap.item():.2e}")
    ctx = (torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16)
           if args.dtype == "bfloat16" else torch.autocast("cpu", enabled=False))
    times = {"author's": [], "ours": []}
    optimizers = {"author's": torch.optim.AdamW(theirs.parameters(), lr=1e-4),
                  "ours": torch.optim.AdamW(ours.parameters(), lr=1e-4)}
    models = {"author's": theirs, "ours": ours}
    for i in range(args.steps + 2):  # the first step of each is a warm-up
        for name in (("author's", "ours") if i % 2 else ("ours", "author's")):
            t = step_time(models[name], optimizers[name], x, y, ctx)
            if i >= 2:
                times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, t in med.items():
        print(f"  {name:9s} {1000 * t:8.1f} ms/step (median of {args.steps}; "
              f"{min(times[name]) * 1000:.1f} to {max(times[name]) * 1000:.1f})")
    ratio = med["ours"] / med["author's"]
    print(f"ours / author's: {ratio:.2f} "
          f"({args.batch_size} x {T} tokens, {args.device}, {args.dtype}, "
          f"{torch.get_num_threads()} threads)")


if __name__ == "__main__":
    sys.exit(main())
