# A tiny MDLM on bytes that trains in a few minutes on 2 CPU cores: the teacher of config/tiny_kld.py.
# Data (once, ~5 s):
#   python prepare_data.py --source=corpus --tokenizer=byte --row_len=128 --out_dir=data/corpus_byte
# Run:
#   python distill.py config/tiny_mdlm.py
#   torchrun --standalone --nproc_per_node=2 distill.py config/tiny_mdlm.py
# On a busy machine OMP_NUM_THREADS=1 is much faster for models this small.
objective = 'mdlm'
init_from = 'scratch'
data_dir = 'data/corpus_byte'
out_dir = 'out/tiny_mdlm'
device = 'cpu'
n_layer, n_head, n_embd, cond_dim, block_size = 4, 4, 128, 64, 128
dropout = 0.0
batch_size = 16
global_batch_size = 32
max_iters = 600
learning_rate = 2e-3
warmup_iters = 50
ema_decay = 0.998             # a short run: with 0.9999 the EMA would still be mostly the initial weights
sampling_eps = 1e-3
log_interval, eval_interval, eval_iters, ckpt_interval = 20, 200, 8, 100
peak_flops = 1.66e11          # 2 cores x 2.6 GHz x 32 fp32 FLOPs/cycle (AVX2/AVX-512 FMA): MFU is only indicative here
