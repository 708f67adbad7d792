# The ~50M-parameter PRISM of the paper (docs/PRISM.md §5), for one or more GPUs:
#   python train.py config/prism_50m.py          (what `python train.py` picks with CUDA)
#   torchrun --standalone --nproc_per_node=8 train.py config/prism_50m.py
# d = 512, 8 layers, 16 heads of p = 64 (overcompleteness ρ = H·p/d = 2, 8 signal + 8 noise heads
# with π-RoPE), context 512, GPT-2 BPE: 50.93M parameters, 25.76M of them the tied embedding.
data_dir = "data/tinystories"
out_dir = "out/prism_50m"

n_layer = 8
n_embd = 512
n_head = 16
head_dim = 64
block_size = 512

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
