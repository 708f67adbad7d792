# The CPU quickstart: the paper's PRISM at a size that writes simple stories after minutes on a
# laptop CPU (what `python train.py` picks without CUDA):
#   python prepare_tinystories.py --sample
#   python train.py
# d = 128, 4 layers, 4 signal + 4 noise heads of p = 64, context 128, the sample's compact
# 4,096-token vocabulary: 1.34M parameters, 0.55M of them the tied embedding.
data_dir = "data/sample"
out_dir = "out/cpu_small"

n_layer = 4
n_head = 4
n_embd = 128
expansion = 2
block_size = 128

batch_size = 16
grad_accum = 1

max_iters = 543
learning_rate = 5.66e-3  # the rate the lab's grid chose for this model, data and budget
min_lr = 5.66e-4
warmup_iters = 27
weight_decay = 0.1
grad_clip = 1.0

eval_interval = 100
eval_iters = 20
log_interval = 20
