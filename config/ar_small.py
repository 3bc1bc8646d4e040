# The autoregressive baseline of the paper: the MDLM small network with causal attention, next-token loss,
# trained like the MDLM (SPEC §2-3). Its out_dir is also a local judge for generative perplexity.
# Data:  python prepare_data.py --out_dir=data/owt
# Run:   torchrun --standalone --nproc_per_node=8 distill.py config/ar_small.py
# Other sizes: --n_layer=24 --n_head=16 --n_embd=1024 (medium) or --n_embd=1536 (large), with a new --out_dir.
objective = 'ar'
init_from = 'scratch'
data_dir = 'data/owt'
out_dir = 'out/ar_small'
n_layer, n_head, n_embd, cond_dim, block_size = 12, 12, 768, 128, 1024
dropout = 0.1
global_batch_size = 512                 # MDLM: 512 x 1024 tokens
batch_size = 32                         # per GPU: 8 x 32 x 2 accumulation steps
learning_rate = 3e-4
warmup_iters = 2500
weight_decay, grad_clip, ema_decay = 0.0, 1.0, 0.9999
max_iters = 1000000
log_interval, eval_interval, eval_iters, ckpt_interval = 10, 10000, 40, 2000
compile = True
