# SDTT of an MDLM medium (424.5M parameters) with the reverse KL, the kld_small recipe otherwise (SPEC §5).
# The teacher is yours to fill in (init_from below), one of:
#   - an MDLM trained with the original MDLM code: its Lightning checkpoint, e.g. .../checkpoints/0-1000000.ckpt
#     (n_head and block_size below must match it; see distill.py load_lightning_ckpt if torch.load refuses the file)
#   - an out_dir of this project: python distill.py config/mdlm_small.py --n_layer=24 --n_head=16 --n_embd=1024 --out_dir=out/mdlm_medium
#   - the scaling teacher of the SDTT release: init_from = 'jdeschena/sdtt', init_revision = 'teacher_400k_md_step_400000'
# Run:   torchrun --standalone --nproc_per_node=8 distill.py config/kld_medium.py
objective = 'sdtt'
init_from = ''                          # FILL IN: the teacher (an empty value stops with an error)
n_head, block_size = 16, 1024           # only read for an MDLM .ckpt teacher (not stored in its weights)
data_dir = 'data/owt'
out_dir = 'out/kld_medium'
divergence = 'kld'
num_distill_steps = 2
global_batch_size = 128
batch_size = 16                          # per GPU (8 GPUs); accumulation keeps the global batch at 128
learning_rate = 3e-4                    # the reference code's default; the paper text says 6e-5 with 500 warm-up steps
warmup_iters = 2500
weight_decay, grad_clip, ema_decay = 0.0, 1.0, 0.9999
dropout = 0.1
sampling_eps = 1e-5
teacher_num_steps = 1024
round_every = 10000
min_num_sampling_steps = 8
max_iters = 80000
log_interval, eval_interval, eval_iters, ckpt_interval = 10, 5000, 20, 1000
compile = True
