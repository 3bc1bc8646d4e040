# SDTT of the published MDLM small (kuleshov-group/mdlm-owt, 1M steps) with the reverse KL: the paper's recipe (SPEC §5)
# Data:  python prepare_data.py --out_dir=data/owt          (OpenWebText, GPT-2 BPE, rows of 1024; last 100k docs = val)
# Run:   torchrun --standalone --nproc_per_node=8 distill.py config/kld_small.py
#        python distill.py config/kld_small.py                        (one GPU: 8 accumulation steps of 16)
# Output: out/kld_small/round_{r}_steps_{1024/2^r}/ for r = 1..7 (512 ... 8 sampling steps), ckpt.pt, log.jsonl
objective = 'sdtt'
init_from = 'kuleshov-group/mdlm-owt'   # or a local copy of it, an out_dir of config/mdlm_small.py, an MDLM .ckpt
data_dir = 'data/owt'
out_dir = 'out/kld_small'
divergence = 'kld'
num_distill_steps = 2                   # the student learns to take 2 teacher steps in one
global_batch_size = 128                 # sequences of 1024 tokens per optimiser step
batch_size = 16                         # per GPU: 8 x 16 (the reference README ran 32 per GPU on 4 GPUs)
learning_rate = 3e-4                    # the reference code's default; the paper text says 6e-5 with 500 warm-up steps
warmup_iters = 2500
weight_decay, grad_clip, ema_decay = 0.0, 1.0, 0.9999
dropout = 0.1                           # in the student; the teacher runs in eval mode
sampling_eps = 1e-5
teacher_num_steps = 1024                # round r: dt = (1 - 1e-5)/1024 * 2^r
round_every = 10000
min_num_sampling_steps = 8              # 7 rounds (70k steps); the reference's README runs to 80k and exits there
teacher_from_ema = False                # the raw student weights become the teacher at each boundary (reference)
reset_optimizer_each_round = False
max_iters = 80000
log_interval, eval_interval, eval_iters, ckpt_interval = 10, 5000, 160, 1000  # validation: 160 x 16 sequences
compile = True
