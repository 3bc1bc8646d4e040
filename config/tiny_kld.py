# SDTT on CPU in ~7 minutes: distil the tiny MDLM of config/tiny_mdlm.py (run that first) with the reverse KL.
# The teacher samples with 64 steps (teacher_num_steps); 3 rounds of 400 steps give students of 32, 16 and 8 steps:
# out/tiny_kld/round_1_steps_32, round_2_steps_16, round_3_steps_8 (then a round-4 student would need 4 < 8: stop).
# (400 rather than 200 steps: from the same teacher, the round-2 student's gen-PPL at 16 steps is 30.71 instead of
# 31.46, 2.8 standard errors better; rounds 1 and 3 gain within the noise. README "Results".)
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
teacher_num_steps = 64
round_every = 400
min_num_sampling_steps = 8
log_interval, eval_interval, eval_iters, ckpt_interval = 10, 50, 4, 50
peak_flops = 1.66e11          # as config/tiny_mdlm.py
