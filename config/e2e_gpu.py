# e2e.py on one GPU with GPT-2 tokens (issue 18): the CPU pipeline at a larger scale, sized for ~10 minutes on an
# H100/H200 by estimate. NOT RUN YET (no GPU lent to the sessions that wrote it): the step counts are estimates from
# the DiT-small throughput in BENCHMARKS.md scaled by FLOPs; size them with the GPU run's own tokens/s.
#   python e2e.py config/e2e_gpu.py                   (one replica; --replicas=2 for two)
# Corpus: the embedded one (~3.3M GPT-2 tokens of train): a 6 x 384 teacher (~49M parameters, ~38M of them the
# embedding and output layers) sees it ~10 times, with dropout 0.1. The judge is the reference AR network of the same
# size, trained side by side. Rows of 256 tokens; teacher N = 256 steps; 3 SDTT rounds -> students of 128/64/32 steps.
corpus = 'corpus'
tokenizer = 'gpt2'
seq_len = 256
work_dir = 'out/e2e_gpu'
device = 'cuda'
_model = '--n_layer=6 --n_head=6 --n_embd=384 --cond_dim=128 --dropout=0.1 --compile=True --peak_flops=989e12'
teacher_args = _model + ' --batch_size=64 --global_batch_size=64 --max_iters=5000 --warmup_iters=200' \
                       ' --learning_rate=1e-3 --ema_decay=0.999 --log_interval=100 --eval_interval=1000' \
                       ' --ckpt_interval=1000 --eval_iters=8'
judge_args = teacher_args
sdtt_args = '--compile=True --batch_size=64 --global_batch_size=64 --round_every=1000 --max_iters=3000' \
            ' --learning_rate=3e-4 --warmup_iters=50 --ema_decay=0.99 --log_interval=50 --eval_interval=250' \
            ' --ckpt_interval=500 --min_num_sampling_steps=32 --peak_flops=989e12'
teacher_num_steps = 256     # students of 128, 64 and 32 steps after rounds 1..3
min_steps = 8
n_samples = 512             # as the CPU default: the paired noise margins grow as sqrt(n_samples)
sample_batch = 256
eval_batch = 128
jobs = 2                    # the teacher and the judge share the GPU; sampling runs two processes at a time
val_rows = 0                # all of the embedded validation split (~430 rows of 256 tokens)
