"""
Benchmarks, printed as a table and appended as JSON lines to out_file:
 (a) sampling latency per batch of the DiT (eager and compiled) against autoregressive generation with a KV cache
     (Hugging Face GPT-2 of the same width and depth, random weights, `generate`);
 (b) training throughput and MFU of the `mdlm` and `sdtt` steps, and the cost of an sdtt step against its parts
     (K teacher forwards + one student forward/backward);
 (c) on CPU the same quantities with small shapes, read as ratios (absolute CPU times mean little).

    python bench.py                      # GPU: DiT-small shapes, seq 1024
    python bench.py --device=cpu         # CPU: small shapes (the defaults below switch when device is cpu)
Ratios are measured in one run; compare absolute numbers only on the same device.
"""
import json
import os
import time
from contextlib import nullcontext

import torch

from configurator import configure
from diffusion import sample
from distill import training_loss
from evaluate import git_commit
from model import DiT, DiTConfig, SIZES

device = 'cuda' if torch.cuda.is_available() else 'cpu'
size = 'small'              # DiT size on GPU ('small' | 'medium' | 'large'); CPU uses cpu_* below
seq_len = 1024
vocab_size = 50258
batch_sizes = (1, 8, 32)
sample_steps = (8, 16, 32, 64, 128, 256, 512, 1024)
long_steps_max_batch = 8    # steps > 128 are measured only at batch sizes up to this (they take seconds each)
compile = torch.cuda.is_available()  # also measure torch.compile'd forward and sampling (slow to build on CPU)
compile_mode = 'default'    # 'max-autotune-no-cudagraphs' tunes matmuls (minutes to build); the sampler syncs once per step
hf_baseline = True          # needs transformers
hf_batch_sizes = (1, 8)
train = True
train_batch = 32            # micro-batch of the training-step benchmark
sdtt_batch = 16             # sdtt keeps K+1 fp32 [B, L, V] log-prob tensors alive: a smaller micro-batch
K = 2
peak_flops = 989e12         # H100 SXM dense bf16
cpu_n_layer, cpu_n_embd, cpu_n_head, cpu_seq_len, cpu_vocab = 4, 128, 4, 128, 258
out_file = 'bench.jsonl'
config = configure(globals())

dev = torch.device(device)
cuda = dev.type == 'cuda'
if cuda:
    torch.backends.cuda.matmul.allow_tf32 = True
    arch = dict(SIZES[size], cond_dim=128)
    L, V = seq_len, vocab_size
else:  # small shapes: ratios only
    arch = dict(n_layer=cpu_n_layer, n_embd=cpu_n_embd, n_head=cpu_n_head, cond_dim=64)
    L, V = cpu_seq_len, cpu_vocab
    batch_sizes, hf_batch_sizes, train_batch, sdtt_batch = (1, 8), (1, 8), 8, 8
    sample_steps = tuple(s for s in sample_steps if s <= 32)
autocast = torch.autocast('cuda', dtype=torch.bfloat16) if cuda else nullcontext()
results = []


def sync():
    if cuda:
        torch.cuda.synchronize()


def timeit(fn, warmup=2, reps=5):
    """Median wall time of fn() in seconds (synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def record(**r):
    results.append(r)
    print(' | '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}' for k, v in r.items()), flush=True)


torch.manual_seed(0)
model = DiT(DiTConfig(vocab_size=V, block_size=L, dropout=0.0, **arch)).to(dev).eval()
for p in model.output_layer.parameters():  # zero-init would make every prediction uniform: use random weights
    torch.nn.init.normal_(p, std=0.02)
variants = {'eager': model}
if compile:
    variants['compiled'] = torch.compile(model, mode=compile_mode)

# ---- (a) forward latency and sampling latency
fwd_ms = {}
for name, m in variants.items():
    for B in batch_sizes:
        idx = torch.randint(0, V - 1, (B, L), device=dev)
        with torch.no_grad(), autocast:
            s = timeit(lambda: m(idx), warmup=3, reps=10)
        fwd_ms[name, B] = s * 1e3
        record(bench='forward', variant=name, batch=B, seq_len=L, ms=s * 1e3, tokens_per_s=B * L / s)
for name, m in variants.items():
    for B in batch_sizes:
        for steps in sample_steps:
            if steps > 128 and (B > long_steps_max_batch or name == 'eager'):
                continue  # seconds each: compiled only, small batches
            reps = 3 if steps <= 64 else 1
            s = timeit(lambda: sample(m, B, steps, L, mask_id=V - 1, bos_id=0, seed=0, device=dev), warmup=1, reps=reps)
            record(bench='sample', variant=name, batch=B, steps=steps, seconds=s,
                   ms_per_step=s / steps * 1e3, overhead_vs_forwards=s / (steps * fwd_ms[name, B] / 1e3) - 1)

if hf_baseline:
    from transformers import GPT2Config, GPT2LMHeadModel
    hf = GPT2LMHeadModel(GPT2Config(n_layer=arch['n_layer'], n_embd=arch['n_embd'], n_head=arch['n_head'],
                                    n_positions=L, vocab_size=V - 1, bos_token_id=0,
                                    eos_token_id=0)).to(dev).eval()
    if cuda:
        hf = hf.to(torch.bfloat16)
    for B in hf_batch_sizes:
        ids = torch.zeros(B, 1, dtype=torch.long, device=dev)
        gen = lambda: hf.generate(ids, do_sample=True, max_new_tokens=L - 1, min_new_tokens=L - 1, pad_token_id=0,
                                  attention_mask=torch.ones_like(ids))
        with torch.no_grad():
            s = timeit(gen, warmup=1, reps=1)
        rec = dict(bench='hf_generate', variant='eager', batch=B, seq_len=L, seconds=s)
        for steps in (16, 32, 64):
            best = min((r['seconds'] for r in results if r['bench'] == 'sample' and r['batch'] == B and r['steps'] == steps),
                       default=None)
            if best:
                rec[f'speedup_{steps}_steps'] = s / best
        record(**rec)

# ---- (b) training steps: mdlm and sdtt, with MFU; the sdtt step against its parts
if train:
    student = DiT(DiTConfig(vocab_size=V, block_size=L, dropout=0.1, **arch)).to(dev).train()
    teacher = DiT(DiTConfig(vocab_size=V, block_size=L, dropout=0.0, **arch)).to(dev).eval().requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, fused=cuda)
    run_s = torch.compile(student) if compile else student
    run_t = torch.compile(teacher) if compile else teacher
    fpt = student.flops_per_token(L)  # fwd + bwd
    for objective, B in (('mdlm', train_batch), ('sdtt', sdtt_batch)):
        x0 = torch.randint(0, V - 1, (B, L), device=dev)

        def step():
            loss = training_loss(run_s, x0, objective, V - 1, 1e-3, autocast, teacher=run_t, dt=2 / 1024, K=K)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        s = timeit(step, warmup=3, reps=5)
        flops = fpt * B * L * (1 if objective == 'mdlm' else 1 + K / 3)  # + K teacher forwards (1/3 of fwd+bwd)
        # MFU counts matmul FLOPs (no embedding lookup); mfu_6N is nanoGPT's convention (6 x all parameters)
        flops_6n = (6 * student.num_params() + 12 * arch['n_layer'] * arch['n_embd'] * L) * B * L
        record(bench='train', objective=objective, batch=B, seq_len=L, ms=s * 1e3, tokens_per_s=B * L / s,
               mfu=flops / s / peak_flops if cuda else float('nan'),
               mfu_6N=flops_6n / s / peak_flops if cuda and objective == 'mdlm' else float('nan'))
        if objective == 'sdtt':  # the parts, timed separately in the same run: K teacher forwards + an mdlm step
            def teacher_fwd():
                with torch.no_grad(), autocast:
                    run_t(x0)

            def mdlm_step():
                training_loss(run_s, x0, 'mdlm', V - 1, 1e-3, autocast).backward()
                torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
            parts = K * timeit(teacher_fwd) + timeit(mdlm_step)
            record(bench='sdtt_parts', batch=B, ms_step=s * 1e3, ms_parts=parts * 1e3, step_over_parts=s / parts)

commit = git_commit()
name = torch.cuda.get_device_name() if cuda else f'cpu x{torch.get_num_threads()} threads'
with open(out_file, 'a') as f:
    for r in results:
        f.write(json.dumps({'device': name, 'commit': commit, 'date': time.strftime('%Y-%m-%d'), 'arch': arch,
                            'torch': torch.__version__, **r}) + '\n')
print(f'{len(results)} results appended to {out_file} ({name}, commit {commit})')
