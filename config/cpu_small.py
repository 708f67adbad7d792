# The CPU quickstart: a small PRISM that writes simple stories after minutes on a laptop CPU.
#   python prepare_tinystories.py --sample --vocab_size=4096 --report_fraction=0.5
#   python train.py config/cpu_small.py        (what `python train.py` picks without CUDA)
# d = 128, 4 layers, 8 heads of p = 32 (overcompleteness ρ = H·p/d = 2, 4 signal + 4 noise heads
# with π-RoPE), context 128, compact 4,096-token vocabulary: 1.32M parameters, 0.53M of them the
# tied embedding. The study's cpu-small PRISM: 4 passes over the sample's 278K training tokens
# (543 iterations of 16 x 128 tokens, 1.11M tokens) at its best learning rate. Measured: val 1.350
# to 1.363 bits/byte (3.76 to 3.79 nats/token) at the end on two machines; at 3,000-11,000
# tokens/s that is 2-6 minutes of training, plus 7 evaluations of 2 x 20 batches.
data_dir = "data/sample"
out_dir = "out/cpu_small"

n_layer = 4
n_embd = 128
n_head = 8
head_dim = 32
block_size = 128

batch_size = 16
grad_accum = 1

max_iters = 543
learning_rate = 1.6e-2
min_lr = 1.6e-3
warmup_iters = 27
weight_decay = 0.1
grad_clip = 1.0

eval_interval = 100
eval_iters = 20
log_interval = 20
