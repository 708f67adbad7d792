# The ~50M-parameter PRISM of the paper (docs/PRISM.md §5), for one or more GPUs:
#   python train.py config/prism_50m.py
#   torchrun --standalone --nproc_per_node=8 train.py config/prism_50m.py
# d = 512, 8 layers, 16 heads of p = 64 (overcompleteness ρ = H·p/d = 2, 8 signal + 8 noise heads
# with π-RoPE), context 512, GPT-2 BPE: 51M parameters, 25.8M of them the tied embedding.
# The sizes come from the preset (baselines.PRESETS), which holds them for every arch at PRISM's
# parameter count, so `--arch=gpt2` (or gemma3) trains the matched baseline; the PrismConfig fields
# it does not set keep model.py's defaults. A model field set here or on the command line
# overrides the preset's.
out_dir = "out/prism_50m"
arch = "prism"
preset = "paper-50m"

# batch: 32 sequences x 4 micro-steps x 512 tokens = 65,536 tokens per iteration
# (grad_accum is split across GPUs: with 4 GPUs each does one micro-step)
batch_size = 32
grad_accum = 4

# 20,000 iterations = 1.3B tokens, about 2.8 epochs of TinyStoriesV2-GPT4 (~470M tokens)
max_iters = 20000
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 500
weight_decay = 0.1
grad_clip = 1.0

eval_interval = 500
eval_iters = 100
log_interval = 10
