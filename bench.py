"""
Benchmarks, printed as a table and appended as JSON lines to out_file:
 (a) sampling latency per batch of the DiT (eager and compiled) against autoregressive generation with a KV cache
     (the reference AR network, model.py causal=True, with sample.sample_ar, and HF GPT-2 `generate`; same width and
     depth, random weights);
 (b) training throughput and MFU of the `mdlm` and `sdtt` steps, and the cost of an sdtt step against its parts
     (K teacher forwards + one student forward/backward);
 (c) on CPU the same quantities with small shapes, read as ratios (absolute CPU times mean little).

    python bench.py                      # GPU: DiT-small shapes, seq 1024
    python bench.py --device=cpu         # CPU: small shapes (the defaults below you do not set switch on cpu)
Ratios are measured in one run; compare absolute numbers only on the same device.
"""
import json
import time
from contextlib import nullcontext

import torch

from configurator import check_choice, config_keys, configure
from diffusion import sample
from evaluate import git_commit
from model import SIZES, DiT, DiTConfig

device = 'cuda' if torch.cuda.is_available() else 'cpu'
size = 'small'              # DiT size on GPU ('small' | 'medium' | 'large'); CPU uses cpu_* below
seq_len = 1024
vocab_size = 50258
batch_sizes = (1, 8, 32)
sample_steps = (8, 16, 32, 64, 128, 256, 512, 1024)
long_steps_max_batch = 8    # steps > 128 are measured only at batch sizes up to this (they take seconds each)
compile = torch.cuda.is_available()  # also measure torch.compile'd forward and sampling (slow to build on CPU)
compile_mode = 'default'    # 'reduce-overhead': CUDA graphs (the sampler has no per-step sync; helps batch 1)
head_only = None            # sampler's output layer at the revealed positions only (diffusion.sample); None: on,
                            # except with CUDA graphs (a new number of positions every step would re-record them)
latency = True              # (a): forward and sampling latency (the autoregressive rows compare against it)
hf_baseline = True          # needs transformers
hf_batch_sizes = (1, 8)     # also the batch sizes of the project's AR baseline below
ar_baseline = True          # the AR baseline (causal=True, same width/depth) sampling with its KV cache (sample.sample_ar)
train = True
train_compile_mode = 'default'  # of (b), as distill.py's compile_mode: 'default' | 'max-autotune-no-cudagraphs'
train_batch = 32            # micro-batch of the training-step benchmark
sdtt_batch = 16             # sdtt runs K teacher forwards besides the student's (as the first session's table)
num_distill_steps = 2       # K of the sdtt training step
peak_flops = 989e12         # H100 SXM dense bf16
cpu_n_layer, cpu_n_embd, cpu_n_head, cpu_seq_len, cpu_vocab = 4, 128, 4, 128, 258
out_file = 'bench.jsonl'
_defaults = {k: v for k, v in globals().items() if k in config_keys(globals())}
config = configure(globals())

dev = torch.device(device)
cuda = dev.type == 'cuda'
if cuda:
    torch.backends.cuda.matmul.allow_tf32 = True
    arch = dict(SIZES[size], cond_dim=128)
    L, V = seq_len, vocab_size
else:  # small shapes: ratios only; the settings left at their GPU defaults switch to CPU ones, those given stay
    arch = dict(n_layer=cpu_n_layer, n_embd=cpu_n_embd, n_head=cpu_n_head, cond_dim=64)
    cpu = dict(seq_len=cpu_seq_len, vocab_size=cpu_vocab, batch_sizes=(1, 8), hf_batch_sizes=(1, 8), train_batch=8,
               sdtt_batch=8, sample_steps=tuple(s for s in sample_steps if s <= 32))
    globals().update({k: v for k, v in cpu.items() if config[k] == _defaults[k]})
    L, V = seq_len, vocab_size
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


commit = git_commit()
device_name = torch.cuda.get_device_name() if cuda else f'cpu x{torch.get_num_threads()} threads'


def record(**r):
    """Print a result and append it to out_file at once (a run cut short by a time limit keeps what it measured)."""
    results.append(r)
    print(' | '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}' for k, v in r.items()), flush=True)
    with open(out_file, 'a') as f:
        f.write(json.dumps({'device': device_name, 'commit': commit, 'date': time.strftime('%Y-%m-%d'), 'arch': arch,
                            'torch': torch.__version__, **r}) + '\n')


torch.manual_seed(0)
model = DiT(DiTConfig(vocab_size=V, block_size=L, dropout=0.0, **arch)).to(dev).eval()
for p in model.output_layer.parameters():  # zero-init would make every prediction uniform: use random weights
    torch.nn.init.normal_(p, std=0.02)
variants = {'eager': model}
if compile:
    variants['compiled'] = torch.compile(model, mode=compile_mode)

# ---- (a) forward latency and sampling latency
fwd_ms = {}
for name, m in variants.items() if latency else ():
    for B in batch_sizes:
        idx = torch.randint(0, V - 1, (B, L), device=dev)
        with torch.no_grad(), autocast:
            s = timeit(lambda: m(idx), warmup=3, reps=10)
        fwd_ms[name, B] = s * 1e3
        record(bench='forward', variant=name, batch=B, seq_len=L, ms=s * 1e3, tokens_per_s=B * L / s)
for name, m in variants.items() if latency else ():
    for B in batch_sizes:
        for steps in sample_steps:
            if steps > 128 and (B > long_steps_max_batch or name == 'eager'):
                continue  # seconds each: compiled only, small batches
            reps = 3 if steps <= 64 else 1
            ho = head_only if head_only is not None else not (name == 'compiled' and compile_mode == 'reduce-overhead')
            s = timeit(lambda: sample(m, B, steps, L, mask_id=V - 1, bos_id=0, seed=0, device=dev, head_only=ho),
                       warmup=1, reps=reps)
            record(bench='sample', variant=name, batch=B, steps=steps, head_only=ho, seconds=s,
                   ms_per_step=s / steps * 1e3, overhead_vs_forwards=s / (steps * fwd_ms[name, B] / 1e3) - 1)


def speedups(rec, B, s):
    """Add to an autoregressive row (s seconds for batch B) the speed-ups of DiT sampling at 16/32/64 steps."""
    for steps in (16, 32, 64):
        best = min((r['seconds'] for r in results if r['bench'] == 'sample' and r['batch'] == B and r['steps'] == steps),
                   default=None)
        if best:
            rec[f'speedup_{steps}_steps'] = s / best
    return rec


if ar_baseline:  # MDLM/SDTT's AR network (plain pre-LN blocks): BOS + seq_len - 1 tokens, one forward per token, KV cache
    torch._dynamo.reset()  # a fresh cache of compiled versions (see section (b))
    from sample import sample_ar
    ar = DiT(DiTConfig(vocab_size=V, block_size=L, dropout=0.0, causal=True, **arch)).to(dev).eval()
    for p in ar.output_layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    ar_variants = {'eager': ar}
    if compile:  # dynamic: the cached length grows by one every step
        ar_variants['compiled'] = torch.compile(ar, mode=compile_mode, dynamic=True)
    for name, m in ar_variants.items():
        for B in hf_batch_sizes:
            s = timeit(lambda: sample_ar(m, B, L, bos_id=0, seed=0, device=dev), warmup=1, reps=1)
            record(**speedups(dict(bench='ar_kv_cache', variant=name, batch=B, seq_len=L, seconds=s), B, s))

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
        record(**speedups(dict(bench='hf_generate', variant='eager', batch=B, seq_len=L, seconds=s), B, s))

# ---- (b) training steps: mdlm and sdtt, with MFU; the sdtt step against its parts
if train:  # as distill.py runs them: noise drawn on the host, network + loss compiled as one graph
    # every compiled DiT shares DiT.forward's cache of compiled versions (its guards check the class, not the
    # instance): start afresh, or the teacher below would fall back to eager past the recompile limit
    torch._dynamo.reset()
    from diffusion import to_device
    from distill import COMPILE_MODES, Objective, draw_noise, step_flops, teacher_targets, training_loss
    check_choice('train_compile_mode', train_compile_mode, COMPILE_MODES)  # (no CUDA graphs, as distill.py)
    student = DiT(DiTConfig(vocab_size=V, block_size=L, dropout=0.1, **arch)).to(dev).train()
    teacher = DiT(DiTConfig(vocab_size=V, block_size=L, dropout=0.0, **arch)).to(dev).eval().requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, fused=cuda)
    maybe_compile = (lambda f: torch.compile(f, mode=train_compile_mode)) if compile else (lambda f: f)
    run_t = maybe_compile(teacher)
    objectives = {o: maybe_compile(Objective(student, o, V - 1, 'kld', bf16=cuda)) for o in ('mdlm', 'sdtt')}

    def train_step(objective, x0, batches):
        b = to_device(draw_noise(x0, objective, V - 1, 1e-3, 2 / 1024, num_distill_steps), dev)
        batches.append(b)
        training_loss(objectives[objective], b, run_t, num_distill_steps, V - 1, bf16=cuda).backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for objective, B in (('mdlm', train_batch), ('sdtt', sdtt_batch)):
        x0, batches = torch.randint(0, V - 1, (B, L)), []  # on the host, like distill.py's batches
        s = timeit(lambda: train_step(objective, x0, batches), warmup=3, reps=5)
        # MFU counts the matmul FLOPs as run (distill.step_flops: no embedding lookup, the output layers at the
        # positions that need them); mfu_6N is nanoGPT's convention (6 x all parameters, everything everywhere)
        flops = sum(step_flops(student, teacher, b, num_distill_steps) for b in batches) / len(batches)
        flops_6n = (6 * student.num_params() + 12 * arch['n_layer'] * arch['n_embd'] * L) * B * L
        flops_6n *= 1 + num_distill_steps / 3 if objective == 'sdtt' else 1
        record(bench='train', objective=objective, batch=B, seq_len=L, ms=s * 1e3, tokens_per_s=B * L / s,
               masked_fraction=sum(len(b['pos']) for b in batches) / len(batches) / (B * L),
               mfu=flops / s / peak_flops if cuda else float('nan'),
               mfu_6N=flops_6n / s / peak_flops if cuda else float('nan'))
        if objective == 'sdtt':  # the parts, timed separately in the same run: the K teacher forwards as the step
            b = batches[-1]      # runs them (teacher_targets) + an mdlm step (the student's forward and backward)
            parts = timeit(lambda: teacher_targets(run_t, b, num_distill_steps, V - 1, bf16=cuda))
            parts += timeit(lambda: train_step('mdlm', x0, []))
            record(bench='sdtt_parts', batch=B, ms_step=s * 1e3, ms_parts=parts * 1e3, step_over_parts=s / parts)

print(f'{len(results)} results appended to {out_file} ({device_name}, commit {commit})')
