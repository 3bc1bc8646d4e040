# Pretrain an MDLM small (169.6M, no time conditioning) from scratch with the NELBO: the MDLM recipe (SPEC §3).
# Data:  python prepare_data.py --out_dir=data/owt
# Run:   torchrun --standalone --nproc_per_node=8 distill.py config/mdlm_small.py
# Other sizes: --n_layer=24 --n_head=16 --n_embd=1024 (medium) or --n_embd=1536 (large), with a new --out_dir.
# Its out_dir is then a teacher for config/kld_*.py (init_from='out/mdlm_small'; the EMA weights are used).
objective = 'mdlm'
init_from = 'scratch'
data_dir = 'data/owt'
out_dir = 'out/mdlm_small'
n_layer, n_head, n_embd, cond_dim, block_size = 12, 12, 768, 128, 1024
dropout = 0.1
time_conditioning = False
global_batch_size = 512                 # MDLM: 512 x 1024 tokens
batch_size = 32                         # per GPU: 8 x 32 x 2 accumulation steps
learning_rate = 3e-4
warmup_iters = 2500
weight_decay, grad_clip, ema_decay = 0.0, 1.0, 0.9999
sampling_eps = 1e-3
max_iters = 1000000                     # MDLM-OWT: 1M steps (the SDTT scaling teachers: 400k)
log_interval, eval_interval, eval_iters, ckpt_interval = 10, 10000, 320, 2000  # validation: 320 x 32 sequences
compile = True
