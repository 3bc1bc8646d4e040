# SDTT on CPU (13 min on 2 idle cores): distil the tiny MDLM of config/tiny_mdlm.py (run that first)
# with the reverse KL.
# The teacher samples with 32 steps (teacher_num_steps); 3 rounds of 400 steps give students of 16, 8 and 4 steps:
# out/tiny_kld/round_1_steps_16, round_2_steps_8, round_3_steps_4 (then a round-4 student would need 2 < 4: stop).
# N = 32, not 64: this tiny teacher's gen-PPL is flat between 32 and 64 steps (within noise in every e2e run so far),
# so a first round from 64 to 32 steps had no gap to close. README "Results".
# Run:
#   python distill.py config/tiny_kld.py
#   torchrun --standalone --nproc_per_node=2 distill.py config/tiny_kld.py
#   python distill.py config/tiny_kld.py --init_from=resume        (after Ctrl-C or kill -9)
objective = 'sdtt'
init_from = 'out/tiny_mdlm'   # its ckpt.pt (EMA weights)
data_dir = 'data/corpus_byte'
out_dir = 'out/tiny_kld'
device = 'cpu'
divergence = 'kld'
num_distill_steps = 2
dropout = 0.0
batch_size = 16
global_batch_size = 32
max_iters = 1200              # = 3 rounds
learning_rate = 1e-3
warmup_iters = 20
ema_decay = 0.99
sampling_eps = 1e-5
teacher_num_steps = 32
round_every = 400
min_num_sampling_steps = 4
log_interval, eval_interval, eval_iters, ckpt_interval = 10, 50, 4, 50
peak_flops = 1.66e11          # as config/tiny_mdlm.py
