# e2e.py on one GPU, sized for <= 10 minutes on an H100 (issue #6): the same pipeline as the CPU default with an
# 8 x 512 teacher and judge on rows of 256 bytes, 3 SDTT rounds of 500 steps from a 256-step teacher.
#   python e2e.py config/e2e_gpu.py
# NOT RUN YET (no GPU in the session that wrote it): the step counts come from the H100 DiT-small throughput in
# BENCHMARKS.md scaled by FLOPs (~164 MFLOP per byte-token here: ~2M tokens/s alone, about half when the teacher and
# the judge share the GPU). Estimated: teacher + judge ~4 min, SDTT ~2 min, sampling + evaluation ~3 min (process
# start-up and compilation included). Lower the max_iters below if the first run goes over.
corpus = 'corpus'          # the embedded one (travels with the repository)
tokenizer = 'byte'
seq_len = 256
work_dir = 'out/e2e_gpu'
device = 'cuda'
_model = '--n_layer=8 --n_head=8 --n_embd=512 --cond_dim=128 --compile=True --peak_flops=989e12'
teacher_args = _model + ' --batch_size=128 --global_batch_size=128 --max_iters=2000 --warmup_iters=100' \
                       ' --learning_rate=1e-3 --ema_decay=0.999 --log_interval=100 --eval_interval=500 --ckpt_interval=500'
judge_args = teacher_args
sdtt_args = '--compile=True --batch_size=64 --global_batch_size=64 --round_every=500 --max_iters=1500' \
            ' --learning_rate=3e-4' \
            ' --warmup_iters=50 --ema_decay=0.99 --log_interval=50 --eval_interval=250 --ckpt_interval=250' \
            ' --peak_flops=989e12'
teacher_num_steps = 256     # students of 128, 64 and 32 steps after rounds 1..3 (then 4 rounds would reach 16)
min_steps = 4
n_samples = 512             # as the CPU default: the paired noise margins grow as sqrt(n_samples)
sample_batch = 256
eval_batch = 128
jobs = 2                    # the teacher and the judge share the GPU; sampling runs two processes at a time
val_rows = 2048
