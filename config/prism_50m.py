# The paper's PRISM as its author trained it (config/train_prism_tiny.py and train.py's defaults
# in HuangDongchen/PRISM-Transformer at b7a0024), for one GPU or several:
#   python train.py config/prism_50m.py          (what `python train.py` picks with CUDA)
#   torchrun --standalone --nproc_per_node=8 train.py config/prism_50m.py --batch_size=8 --grad_accum=8
#   (the same 32,768 tokens per iteration: grad_accum splits across the processes)
# d = 512, 8 layers, 8 signal + 8 noise heads of p = 128, context 512, GPT-2 BPE: 51.19M parameters
# (51,192,320). bfloat16 and torch.compile on CUDA (train.py's dtype/compile = auto).
data_dir = "data/tinystories"
out_dir = "out/prism_50m"

n_layer = 8
n_head = 8
n_embd = 512
expansion = 2
block_size = 512
dropout = 0.1
bias = False
lambda_start = 0.01
lambda_end = 0.1

# 32 sequences x 2 micro-steps x 512 tokens = 32,768 tokens per iteration
# (grad_accum is split across GPUs: with 2 GPUs each does one micro-step)
batch_size = 32
grad_accum = 2

# 20,000 iterations = 655M tokens, about 1.4 passes over TinyStoriesV2-GPT4 (~470M tokens)
max_iters = 20000
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 1000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0

eval_interval = 2000
eval_iters = 200
log_interval = 10
