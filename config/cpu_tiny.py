# A small PRISM that learns visibly in minutes on a laptop CPU:
#   python train.py config/cpu_tiny.py          (what `python train.py` picks without CUDA)
# 4 layers, d = 64, 4 heads of p = 32 (overcompleteness ρ = H·p/d = 2, 2 signal + 2 noise heads),
# context 128: 3.4M parameters, 3.2M of them the GPT-2-vocabulary embedding. On a CPU nearly all
# the time goes into the 50,257-way output layer, so the model is narrow and the budget small:
# 150 iterations of 8 x 128 tokens (154K tokens, about half an epoch of ../shared/data's sample).
# Measured numbers: docs/RESULTS.md, "Training".
# The sizes come from the preset (baselines.PRESETS), which holds them for every arch at PRISM's
# parameter count, so `python train.py --arch=gpt2` (or gemma3) trains the matched baseline.
# A model field given here or on the command line (--n_layer=2) overrides the preset's.
out_dir = "out/cpu_tiny"
arch = "prism"
preset = "cpu-tiny"

batch_size = 8
grad_accum = 1

max_iters = 150
learning_rate = 6e-3
min_lr = 6e-4
warmup_iters = 15
weight_decay = 0.1
grad_clip = 1.0

eval_interval = 50
eval_iters = 8
log_interval = 10
