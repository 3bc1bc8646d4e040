"""
Training, nanoGPT-style, for three objectives: sdtt (self-distillation through time, SPEC §5: the student learns to
take K steps of a frozen teacher in one), mdlm (MDLM NELBO pretraining: the teachers), ar (the autoregressive baseline).

    python distill.py config/tiny_mdlm.py                                 # CPU, minutes
    torchrun --standalone --nproc_per_node=8 distill.py config/kld_small.py
    python distill.py config/kld_small.py --init_from=resume              # continue out_dir/ckpt.pt exactly

Writes to out_dir: ckpt.pt, log.jsonl and, for sdtt, round_{r}_steps_{n}/ (the EMA student after r rounds). A step's
data and random draws are functions of (seed, step, micro-batch): the same on resume and on any number of GPUs.
"""
import copy
import json
import math
import os
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, replace
from functools import lru_cache
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import check_choice, check_sizes, config_keys, configure
from diffusion import (NOISE_SCHEDULES, SAMPLE_EPS, draw_categorical, mdlm_loss, move_chance, q_xt, sample_t,
                       schedule_of, sigma, to_device)
from fileio import RunLocked, WriteFailed, read_jsonl, release_lock, run_lock, write_failed
from model import (DiT, DiTConfig, check_device, default_meta, is_ar_state_dict, load_pretrained,
                   load_state_dict_strict, read_checkpoint, save_pretrained, strip_prefix, weight_sizes, write_atomic)
from prepare_data import load_meta, open_split

# ----------------------------------------------------------------------------------------------------------- config
# defaults: SDTT of the published MDLM small on one node (config/kld_small.py spells out the paper recipe)
objective = 'sdtt'          # 'sdtt' | 'mdlm' | 'ar'
data_dir = 'data/owt'       # written by prepare_data.py: train.bin, val.bin, meta.json
out_dir = 'out/sdtt'
init_from = 'kuleshov-group/mdlm-owt'  # 'scratch' | 'resume' | hub id | model dir | ckpt.pt or its out_dir | MDLM .ckpt
init_revision = None        # hub revision of init_from (e.g. 'teacher_1M_sm' of jdeschena/sdtt)
# model (init_from='scratch'; a loaded or resumed model keeps its architecture: another value set here is an error)
n_layer, n_head, n_embd, cond_dim, block_size = 12, 12, 768, 128, 1024
dropout, time_conditioning = 0.1, False
noise_schedule = 'loglinear' # diffusion.NOISE_SCHEDULES: 'loglinear' | 'cosine'; a loaded model keeps its own
# optimisation (SPEC §3 / §5 reference defaults)
batch_size = 16             # micro-batch per process
global_batch_size = 128     # sequences per optimiser step, over all processes and accumulation steps
max_iters = 80000
learning_rate, warmup_iters = 3e-4, 2500  # the reference code's; the SDTT paper's text: 6e-5, 500 steps
weight_decay, beta1, beta2, grad_clip = 0.0, 0.9, 0.999, 1.0
ema_decay = 0.9999          # EMA of the weights, warm-up min(decay, (1+n)/(10+n)) at update n = 1, 2, ...; eval, saving
sampling_eps = None         # lowest training t; None: 1e-5 for sdtt (SDTT), 1e-3 for mdlm (MDLM)
# SDTT
num_distill_steps = 2       # K: teacher steps the student learns to take in one
divergence = 'kld'          # a name of DIVERGENCES: 'kld' (reverse KL) | 'kl_fwd' | 'mse' | 'tvd' | 'tvd_true'
reference_time_grid = False # True: the reference's buggy teacher times t*space + (1 - t)*t_end (SPEC §5)
teacher_num_steps = 1024    # sampling steps of the original teacher; round r: dt = (1 - 1e-5)/teacher_num_steps * K^r
round_every = 10000         # optimiser steps per round
min_num_sampling_steps = 8  # stop before a round whose student would sample with fewer steps
teacher_from_ema = False    # at a round boundary the teacher (and student) become the EMA weights, EMA restarts
reset_optimizer_each_round = False  # at a round boundary AdamW's moments are cleared and the LR warms up again
# logging, evaluation (eval_iters batches of batch_size rows in all, shared among the processes), checkpoints
log_interval, eval_interval, eval_iters, ckpt_interval = 10, 1000, 20, 1000
# system
seed = 1337
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16'          # 'bfloat16' (autocast on CUDA; losses always fp32) | 'float32'
compile = False
compile_mode = 'default'    # or 'max-autotune-no-cudagraphs' (no CUDA graphs: teacher_targets writes in place)
peak_flops = 989e12         # per device, for MFU (H100 SXM dense bf16)
_DEFAULTS = {k: globals()[k] for k in config_keys(globals())}
OBJECTIVES = {'sdtt': 'val_distill_loss', 'mdlm': 'val_nelbo', 'ar': 'val_loss'}  # name -> its validation loss's key
COMPILE_MODES = ('default', 'max-autotune-no-cudagraphs')  # (bench.py's training steps take the same)
# KEPT: what a loaded model keeps; FREE_ON_RESUME: what a resumed run may change and still continue exactly (no warning)
KEPT = ('n_layer', 'n_head', 'n_embd', 'cond_dim', 'block_size', 'time_conditioning', 'noise_schedule')
FREE_ON_RESUME = KEPT + ('init_from', 'init_revision', 'out_dir', 'max_iters', 'log_interval', 'eval_interval',
                         'eval_iters', 'ckpt_interval', 'device', 'compile', 'compile_mode', 'peak_flops')


# ----------------------------------------------------------------------------------------------------------- losses
def real_log_probs(logits, mask_id):
    """log p(x0 | xt), fp32 [..., V-1]: SUBS at the masked positions, without its -inf MASK column (no inf - inf)."""
    return F.log_softmax(logits[..., :mask_id].float(), dim=-1)


def teacher_times(t, dt, K, reference_grid=False):
    """Start times [K, B] of the K teacher steps of size dt from t [B]: t - k dt, clamped at 1e-5 as the reference.
    reference_grid (SPEC §5 bug): t*space + (1 - t)*(t - K dt), space = linspace(1, 0, K): 1/(2 - t) fewer reveals."""
    if reference_grid:
        space = torch.linspace(1, 0, K, dtype=t.dtype, device=t.device)[:, None]
        ts = t * space + (1 - t) * (t - K * dt)
    else:
        ts = t - dt * torch.arange(K, dtype=t.dtype, device=t.device)[:, None]
    return ts.clamp(min=SAMPLE_EPS)


def draw_noise(x0, objective, mask_id, sampling_eps, dt=None, K=2, reference_grid=False, schedule='loglinear'):
    """Every random draw of micro-batch x0 [B, L], on the host (no step waits for the GPU to learn a size): t [B], xt,
    pos [M] (xt's masked flat indices); sdtt: also teacher_draws' tensors."""
    if objective == 'ar':
        return dict(x0=x0)
    B, L = x0.shape
    t = sample_t(B, 'cpu', sampling_eps)
    xt = q_xt(x0, move_chance(t, schedule), mask_id)
    pos = (xt == mask_id).flatten().nonzero().squeeze(1)
    b = dict(x0=x0, xt=xt, t=t, pos=pos)
    if objective == 'sdtt':
        b.update(teacher_draws(t, pos, L, dt, K, schedule, reference_grid=reference_grid))
    return b


def teacher_draws(t, pos, L, dt, K, schedule='loglinear', generator=None, reference_grid=False):
    """The random draws of the teacher's K steps from x_t [B, L] (pos: its masked flat positions, on the host):
    teacher_t [K, B] and, per step k < K-1, reveal_k (the rows of pos it reveals) and u_k (float64)."""
    times, b = teacher_times(t, dt, K, reference_grid), {}
    row = pos // L  # sequence of each masked position
    pending = torch.ones(len(pos), dtype=torch.bool)
    for k in range(K - 1):  # the last step's draw changes no target: skipped
        keep = move_chance((times[k] - dt).clamp(min=0), schedule) / move_chance(times[k], schedule)  # s <= 0: all
        reveal = pending & (torch.rand(len(pos), dtype=torch.float64, generator=generator) >= keep[row])
        pending &= ~reveal
        b[f'reveal_{k}'] = reveal.nonzero().squeeze(1)
        b[f'u_{k}'] = torch.rand(len(b[f'reveal_{k}']), dtype=torch.float64, generator=generator)
    b['teacher_t'] = times
    return b


@torch.no_grad()
def teacher_targets(teacher, b, K, mask_id, bf16=False, schedule='loglinear'):
    """SDTT targets (SPEC §5): teacher logits [M, V] at xt's masked positions over K float64 ancestral steps; a
    position revealed at step k gets step k's, the others the last step's (steps k < K-1: head at their reveals)."""
    x, pos, kept = b['xt'], b['pos'], []
    for k in range(K):
        at = pos if k == K - 1 else pos[b[f'reveal_{k}']]
        torch._dynamo.maybe_mark_dynamic(at, 0)  # M or R_k: one compiled teacher for both sizes
        with torch.autocast('cuda', dtype=torch.bfloat16) if bf16 else nullcontext():
            logits = teacher(x, sigma(b['teacher_t'][k], schedule), at)
        if k < K - 1:
            kept.append((b[f'reveal_{k}'], logits))
            x = x.flatten().index_put((at,), draw_categorical(logits[:, :mask_id], b[f'u_{k}'])).view_as(x)
    for rows, lg in kept:  # (in place into the teacher's output: do not compile the teacher with CUDA graphs)
        logits[rows] = lg
    torch._dynamo.maybe_mark_dynamic(logits, 0)  # [M, V]: as pos, a new M every micro-batch
    return logits


# name -> per-position divergence of student ls and teacher lt log-probs [M, V-1]: the SDTT reference's (SPEC §5) + TVD
DIVERGENCES = {
    'kld': lambda ls, lt: (ls.exp() * (ls - lt)).sum(-1),          # reverse KL(student || teacher): the paper's best
    'kl_fwd': lambda ls, lt: (lt.exp() * (lt - ls)).sum(-1),       # KL(teacher || student)
    'mse': lambda ls, lt: (ls - lt).square().sum(-1) / (ls.shape[-1] + 1),  # LOG-probs; / V: the reference's mean
    'tvd': lambda ls, lt: (ls - lt).abs().sum(-1),                 # the reference's "tvd": L1 of LOG-probs over V
    'tvd_true': lambda ls, lt: 0.5 * (ls.exp() - lt.exp()).abs().sum(-1),  # total variation 0.5 * sum |p_s - p_t|
}


def sdtt_divergence(ls, lt, name):  # averaged over the M positions
    d = DIVERGENCES[name](ls, lt)
    return d.sum() / max(d.shape[0], 1)  # a micro-batch with nothing masked: 0, not NaN


class Objective(torch.nn.Module):
    """The network and its loss as one module, for torch.compile to fuse the fp32 vocabulary-wide work; DDP wraps it."""
    def __init__(self, net, objective, mask_id, divergence='kld', bf16=False, schedule='loglinear'):
        super().__init__()
        self.net, self.objective, self.mask_id, self.divergence, self.bf16 = net, objective, mask_id, divergence, bf16
        self.schedule = schedule

    def forward(self, x0, xt=None, t=None, pos=None, target=None):
        """ar: next-token loss of x0. mdlm: NELBO of x0 from xt. sdtt: divergence from the teacher's logits target."""
        with torch.autocast('cuda', dtype=torch.bfloat16) if self.bf16 else nullcontext():
            logits = self.net(x0[:, :-1]) if self.objective == 'ar' else self.net(xt, sigma(t, self.schedule), pos)
        if self.objective == 'ar':
            return F.cross_entropy(logits[..., :self.mask_id].float().flatten(0, 1), x0[:, 1:].flatten())
        if self.objective == 'mdlm':
            return mdlm_loss(logits, x0, xt, t, self.mask_id, positions=pos, schedule=self.schedule)
        return sdtt_divergence(real_log_probs(logits, self.mask_id), real_log_probs(target, self.mask_id),
                               self.divergence)


def training_loss(objective_fn, b, teacher=None, K=2, mask_id=None, bf16=False, schedule='loglinear'):
    """The loss of one micro-batch b (draw_noise's tensors, on the device)."""
    if 'xt' not in b:  # ar
        return objective_fn(b['x0'])
    # M changes every micro-batch: dynamic from the start (else DDP's graph splitting recompiles for every new M)
    torch._dynamo.maybe_mark_dynamic(b['pos'], 0)
    target = teacher_targets(teacher, b, K, mask_id, bf16, schedule) if 'teacher_t' in b else None
    return objective_fn(b['x0'], b['xt'], b['t'], b['pos'], target)


def step_flops(student, teacher, b, K):
    """Matmul FLOPs of micro-batch b as run, from sizes (no sync): the student's forward and backward, head at the M
    masked positions (ar: everywhere), and the teacher's K forwards (head at the revealed rows, then at all M)."""
    B, L = b['x0'].shape
    if 'pos' not in b:
        return student.flops_per_token(L) * B * L
    M = b['pos'].shape[0]
    f = student.flops_per_token(L, head_fraction=M / (B * L))
    if 'teacher_t' in b:
        rows = M + sum(b[f'reveal_{k}'].shape[0] for k in range(K - 1))
        f += K * teacher.flops_per_token(L, backward=False, head_fraction=rows / (K * B * L))
    return f * B * L


# ----------------------------------------------------------------------------------------------------------- data
def mix_seed(*ints):
    """A 63-bit seed from a tuple of integers (different tuples give unrelated streams)."""
    return int(np.random.SeedSequence([int(i) for i in ints]).generate_state(2, np.uint64)[0] >> np.uint64(1))


@lru_cache(maxsize=4)
def epoch_permutation(n_rows, seed, epoch):
    return np.random.default_rng([seed, epoch]).permutation(n_rows)


def get_batch(data, first, count, seed, seq_len):
    """Samples first.. of the stream "each row once per epoch, seeded order": int64 [count, seq_len] on the host."""
    n = len(data)
    rows = np.array([epoch_permutation(n, seed, i // n)[i % n] for i in range(first, first + count)])
    return torch.from_numpy(data[rows, :seq_len].astype(np.int64))


def count_rounds(n, K, lowest):
    """The SDTT rounds from a teacher of n steps: round r's student samples with n / K^r >= lowest steps."""
    R = 0
    while n >= lowest * K ** (R + 1):
        R += 1
    if R == 0:
        raise ValueError(f'teacher_num_steps={n}, num_distill_steps={K}: the first student would sample with {n / K:g} '
                         f'< min_num_sampling_steps={lowest} steps; raise teacher_num_steps or lower the minimum')
    if n % K ** R:
        ok = ', '.join(str(v) for v in (n // K ** R * K ** R, (n // K ** R + 1) * K ** R) if v)
        raise ValueError(f'teacher_num_steps={n}: the {R} round(s) of num_distill_steps={K} down to min_num_sampling_'
                         f'steps={lowest} need it divisible by {K}^{R} = {K ** R} (e.g. {ok}), or fewer rounds')
    return R


# ------------------------------------------------------------------------------------------------------- checkpoints
# what MDLM Lightning checkpoints pickle besides tensors (in their hyper-parameters)
MDLM_GLOBALS = ('omegaconf.', 'transformers.models.', 'tokenizers.', 'pytorch_lightning.', 'lightning.',
                'lightning_fabric.', 'typing.Any', 'collections.defaultdict', 'numpy.core.multiarray._reconstruct',
                'numpy._core.multiarray._reconstruct', 'numpy.ndarray', 'numpy.dtype')


def refused_checkpoint(path, e):
    """Why torch.load(weights_only=True) refused path: converting is advised only for an MDLM Lightning checkpoint."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as e2:  # not a zip nor a pickle
        return f'{path} is not a torch checkpoint ({str(e2).splitlines()[0] if str(e2) else type(e2).__name__})'
    if not names:
        return f'{path} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""})'
    other = [n for n in names if not n.startswith(MDLM_GLOBALS)]
    if other:
        return (f'{path} pickles {", ".join(other[:5])}, which no MDLM Lightning checkpoint holds: loading it would '
                'run that code. Do not load it with weights_only=False; get the weights from a source you trust')
    return (f'{path}: torch.load(weights_only=True) refuses its pickled hyper-parameters ({", ".join(names[:5])}): an '
            f'MDLM Lightning checkpoint. If you trust the file, keep only the weights once:\n  python -c "import '
            f"torch; c = torch.load('{path}', map_location='cpu', weights_only=False); "
            f"torch.save({{'state_dict': c['state_dict'], 'ema': c.get('ema')}}, '{path[:-5]}_weights.ckpt')\"\n"
            f'and pass init_from={path[:-5]}_weights.ckpt')


def load_lightning_ckpt(path, n_head, block_size, time_conditioning):
    """A checkpoint of the MDLM code: 'state_dict' ('backbone.' prefixes), EMA (if any) 'ema' -> 'shadow_params' in
    parameter order. Its pickled hyper-parameters are not read: n_head and block_size come from the config."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'init_from={path}: no such file')
    try:
        ck = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise ValueError(refused_checkpoint(path, e)) from e
    if not isinstance(ck, dict) or 'state_dict' not in ck:
        raise ValueError(f'{path} has no state_dict: not an MDLM Lightning checkpoint')
    sd = strip_prefix(ck['state_dict'])
    ar = is_ar_state_dict(sd)  # MDLM's AR baseline (models/autoregressive.py): no sigma_map, no adaLN
    cfg = DiTConfig(**weight_sizes(sd), n_head=n_head, block_size=block_size,
                    time_conditioning=time_conditioning and not ar, causal=ar)
    model = DiT(cfg)
    shadow = (ck.get('ema') or {}).get('shadow_params')
    if shadow is not None:
        params = dict(model.named_parameters())
        if len(shadow) < len(params) or any(s.shape != p.shape for s, p in zip(shadow, params.values())):
            raise ValueError(f'{path}: the EMA shadow_params do not follow the DiT parameter order')
        sd = {**sd, **dict(zip(params, shadow))}
    print(f'teacher: {path} ({"EMA" if shadow is not None else "raw"} weights, n_head={n_head} from the config)')
    load_state_dict_strict(model, sd, path)
    model.meta = default_meta(cfg.vocab_size)
    return model.eval()


def save_checkpoint(ckpt, path):
    write_atomic(path, lambda f: torch.save(ckpt, f))  # a crash mid-write leaves the previous checkpoint intact


def append_log(path, record, keep_upto=None):
    """Append one JSON line; keep_upto=n first drops the steps > n (a resume redoes them) and lines with no step."""
    if keep_upto is not None:
        recs = read_jsonl(path, need={'step': int}, what='a log record with a step') if os.path.exists(path) else []
        kept = ''.join(json.dumps(r) + '\n' for _, r in recs if r['step'] <= keep_upto)
        write_atomic(path, lambda f: f.write(kept.encode()))
    if record is not None:
        try:
            with open(path, 'a') as f:
                f.write(json.dumps(record) + '\n')
        except OSError as e:  # a full disk: its lines so far stay (a cut last one is left out when read)
            raise write_failed(path, e, kept='the lines before are intact') from e


# ----------------------------------------------------------------------------------------------------------- setup
# (these read the settings as module globals, as main() leaves them)
def check_settings(config):
    """Bad settings fail before anything is written. Returns the lowest training t and the rounds (mdlm, ar: inf)."""
    for key, allowed in (('objective', OBJECTIVES), ('divergence', DIVERGENCES), ('dtype', ('bfloat16', 'float32')),
                         ('noise_schedule', NOISE_SCHEDULES), ('compile_mode', COMPILE_MODES)):
        check_choice(key, config[key], tuple(allowed))
    check_sizes(config, batch_size=1, global_batch_size=1, log_interval=1, round_every=1, num_distill_steps=2,
                teacher_num_steps=1, min_num_sampling_steps=1, max_iters=0, eval_iters=0, eval_interval=0,
                ckpt_interval=0, n_layer=1, n_head=1, n_embd=1, cond_dim=1, block_size=1, learning_rate=0,
                weight_decay=0, warmup_iters=0, grad_clip=0, ema_decay=0, beta1=0, beta2=0)  # (intervals 0: off)
    if beta1 >= 1 or beta2 >= 1 or ema_decay > 1:  # (torch's message from inside AdamW, or an EMA that runs away)
        raise ValueError(f'beta1={beta1}, beta2={beta2}, ema_decay={ema_decay}: the betas must be in [0, 1), ema_decay '
                         'in [0, 1]')
    check_device(device)
    eps = sampling_eps if sampling_eps is not None else (1e-5 if objective == 'sdtt' else 1e-3)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise ValueError(f'sampling_eps={sampling_eps!r}: the lowest training t must be a number in (0, 1) (MDLM 1e-3, '
                         'SDTT 1e-5), or None for those defaults')
    if objective != 'sdtt':
        return eps, math.inf
    return eps, count_rounds(teacher_num_steps, num_distill_steps, min_num_sampling_steps)


def start_processes():
    """(ddp, rank, world size, device): torchrun sets RANK/WORLD_SIZE; one process otherwise."""
    if int(os.environ.get('RANK', -1)) == -1:
        return False, 0, 1, torch.device(device)
    # the communication threads inherit this signal mask: Ctrl-C/SIGTERM go to the main thread, which stops cleanly
    # (a SIGTERM delivered to a gloo thread aborted that rank: 'terminate called without an active exception')
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    dev = torch.device(f'cuda:{int(os.environ["LOCAL_RANK"])}' if device.startswith('cuda') else device)
    if dev.type == 'cuda':
        torch.cuda.set_device(dev)
    return True, dist.get_rank(), dist.get_world_size(), dev


def read_resume_checkpoint(config, meta, ckpt_path, master):
    """out_dir's ckpt.pt, with a warning naming the settings and data that differ from the run's."""
    ckpt = read_checkpoint(ckpt_path, '; restore it or start a new out_dir')
    if ckpt['config'].get('objective') != objective:
        raise ValueError(f"{ckpt_path} is a run of objective={ckpt['config'].get('objective')!r}, not {objective!r}: "
                         f"resume it with its own config, or start {objective} in another out_dir")
    changed = [k for k in config if k not in FREE_ON_RESUME and ckpt['config'].get(k) != config[k]]
    was = {k: ckpt.get('meta', {}).get(k) for k in ('row_len', 'n_train_rows')}  # (None: an older checkpoint)
    changed += [f'{data_dir} re-prepared: {k} {meta.get(k)} (the run: {v})' for k, v in was.items()
                if v is not None and v != meta.get(k)]
    if changed and master:
        print(f'warning: resuming with other {", ".join(changed)} than {ckpt_path}: not an exact continuation')
    return ckpt


def load_models(config, meta, ckpt_path, master):
    """The network to train and the resumed ckpt (or None); a loaded one keeps its architecture and noise schedule."""
    if init_from == 'resume' and not os.path.exists(ckpt_path):
        raise FileNotFoundError(f'init_from=resume: no {ckpt_path} (start a run first, or fix out_dir)')
    if master:  # one run per out_dir: only rank 0 writes, so only it takes the lock (released at the end of main)
        run_lock(out_dir)
    ckpt, weights, recorded = None, None, config  # recorded: the meta that names the noise schedule
    if init_from == 'resume':
        ckpt = read_resume_checkpoint(config, meta, ckpt_path, master)
        cfg, weights, recorded = DiTConfig(**ckpt['model_args']), ckpt['model'], ckpt['meta']
    elif os.path.exists(ckpt_path):
        raise FileExistsError(f'{ckpt_path} exists: continue it with --init_from=resume, or pick another out_dir')
    elif init_from == 'scratch':
        if objective == 'sdtt':
            raise ValueError("objective='sdtt' needs a teacher: init_from = hub id, model directory, ckpt.pt or .ckpt")
        cfg = DiTConfig(vocab_size=meta['vocab_size'], block_size=block_size, n_layer=n_layer, n_head=n_head,
                        n_embd=n_embd, cond_dim=cond_dim, time_conditioning=time_conditioning, causal=objective == 'ar')
    else:  # trained weights: the teacher of sdtt, or a model to train further
        source = (load_lightning_ckpt(os.path.expanduser(init_from), n_head, block_size, time_conditioning)
                  if init_from.endswith('.ckpt') else load_pretrained(init_from, revision=init_revision))
        cfg, weights, recorded = source.config, source.state_dict(), source.meta
        steps = source.meta.get('num_sampling_steps')
        if objective == 'sdtt' and steps and steps != teacher_num_steps and master:
            print(f'warning: {init_from} was distilled to sample with {steps} steps (its meta), teacher_num_steps='
                  f'{teacher_num_steps}: round 1 starts there (--teacher_num_steps={steps} goes on where it stopped)')
    model = DiT(replace(cfg, dropout=dropout))  # (dropout: the setting's, for a loaded model too)
    if weights is not None:
        model.load_state_dict(weights)
    # a setting moved from its default to another value would be ignored without a word: an error
    trained = {k: getattr(model.config, k, None) for k in KEPT}
    trained['noise_schedule'] = schedule_of(recorded)
    ignored = [f'{k}={config[k]!r} (the model: {v!r})' for k, v in trained.items()
               if config[k] != _DEFAULTS[k] and config[k] != v]
    if ignored:
        raise ValueError(f'init_from={init_from!r}: a loaded model keeps its own architecture, but '
                         f'{", ".join(ignored)} asks for another: leave these at their defaults, or start from scratch')
    config.update(trained)
    if model.config.vocab_size != meta['vocab_size']:
        raise ValueError(f'{data_dir} is tokenized with {meta.get("tokenizer")} (vocabulary {meta["vocab_size"]}), the '
                         f'model has vocabulary {model.config.vocab_size}: prepare the data with the model tokenizer')
    if model.config.causal != (objective == 'ar'):
        raise ValueError(f'objective={objective} needs a {"causal" if objective == "ar" else "bidirectional"} model')
    return model, ckpt


def build_run(model, ckpt, dev, **fields):
    """The run's state (from ckpt when resuming): the model, its EMA, sdtt's frozen teacher (no submodule), AdamW."""
    run = SimpleNamespace(model=model.to(dev), step=0, round=0, ema_updates=0, dev=dev, **fields,
                          finite=torch.ones((), dtype=torch.bool, device=dev))  # (finite: no NaN since the last check)
    run.ema = copy.deepcopy(model).requires_grad_(False).eval()
    run.teacher = copy.deepcopy(model).requires_grad_(False).eval() if objective == 'sdtt' else None
    run.optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(beta1, beta2), eps=1e-8,
                                      weight_decay=weight_decay, fused=dev.type == 'cuda')
    if not ckpt:
        return run
    if run.teacher is not None:
        run.teacher.load_state_dict(ckpt['teacher'])
    run.ema.load_state_dict(ckpt['ema'])
    run.optimizer.load_state_dict(ckpt['optimizer'])
    for g in run.optimizer.param_groups:  # load_state_dict brought back the saved values: the config's apply
        g.update(weight_decay=weight_decay, betas=(beta1, beta2))
    run.step, run.round, run.ema_updates = ckpt['step'], ckpt['round'], ckpt['ema_updates']
    torch.set_rng_state(ckpt['rng']['torch'])  # (device generators: reseeded by every micro-batch, not saved)
    if run.master:
        print(f'resumed {run.ckpt_path} at step {run.step}, round {run.round}')
    return run


def setup(config):
    """Everything the training loop reads, as one namespace: build_run's state, processes, data, compiled losses."""
    eps, n_rounds = check_settings(config)
    ddp, rank, world, dev = start_processes()
    if global_batch_size % (world * batch_size):
        raise ValueError(f'global_batch_size={global_batch_size} is not divisible by world size {world} x '
                         f'batch_size {batch_size}: change batch_size or global_batch_size')
    torch.manual_seed(seed)
    if dev.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    meta = load_meta(data_dir)
    train_data, val_data = open_split(data_dir, 'train'), open_split(data_dir, 'val')
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    model, ckpt = load_models(config, meta, ckpt_path, rank == 0)
    seq_len = min(meta['row_len'], model.config.block_size)
    if seq_len < meta['row_len'] and rank == 0:
        print(f"note: the rows of {data_dir} have {meta['row_len']} tokens, the model takes the first {seq_len} "
              f"(prepare_data.py --row_len={seq_len} uses them all)")
    run = build_run(model, ckpt, dev, eps=eps, n_rounds=n_rounds, ddp=ddp, rank=rank, world=world, master=rank == 0,
                    grad_accum=global_batch_size // (world * batch_size), meta=meta, mask_id=meta['mask_id'],
                    schedule=config['noise_schedule'], train_data=train_data, val_data=val_data, ckpt_path=ckpt_path,
                    seq_len=seq_len, bf16=dev.type == 'cuda' and dtype == 'bfloat16')
    fwd = Objective(model, objective, run.mask_id, divergence, run.bf16, run.schedule)
    fwd = torch.compile(fwd, mode=compile_mode) if compile else fwd
    run.fwd = DDP(fwd, device_ids=[dev.index] if dev.type == 'cuda' else None) if ddp else fwd
    run.ema_fwd = Objective(run.ema, objective, run.mask_id, divergence, run.bf16, run.schedule)
    run.teacher_fwd = torch.compile(run.teacher, mode=compile_mode) if compile and objective == 'sdtt' else run.teacher
    return run


# ----------------------------------------------------------------------------------------------------------- plumbing
def dt_of(r):
    """The teacher's step size in round r: K teacher steps of round r are one student step."""
    return (1 - SAMPLE_EPS) / teacher_num_steps * num_distill_steps ** r


def run_meta(run):
    """The meta of its checkpoints and round directories (sdtt: the round, the steps its student samples with)."""
    m = {k: run.meta.get(k) for k in ('tokenizer', 'bos_id', 'eos_id', 'mask_id', 'row_len', 'n_train_rows')}
    m.update(objective=objective, step=run.step, noise_schedule=run.schedule)
    if objective == 'sdtt':
        m.update(round=run.round, num_sampling_steps=teacher_num_steps // num_distill_steps ** run.round,
                 divergence=divergence, num_distill_steps=num_distill_steps)
    return m


def write_checkpoint(run, config):
    """ckpt.pt: all an exact resume needs; finite, as every save follows a log_window (which stops a NaN run)."""
    save_checkpoint(dict(model_args=asdict(run.model.config), model=run.model.state_dict(), ema=run.ema.state_dict(),
                         teacher=run.teacher.state_dict() if run.teacher is not None else None,
                         optimizer=run.optimizer.state_dict(), step=run.step, round=run.round, dt=dt_of(run.round),
                         ema_updates=run.ema_updates, config=config, meta=run_meta(run),
                         rng=dict(torch=torch.get_rng_state())), run.ckpt_path)
    run.saved_step = run.step


def loss_of(run, net, data, first):
    """The loss of rows first.. of data (and its batch), the noise drawn on the host from the torch seed."""
    x0 = get_batch(data, first, batch_size, seed, run.seq_len)
    b = to_device(draw_noise(x0, objective, run.mask_id, run.eps, dt_of(run.round), num_distill_steps,
                             reference_time_grid, run.schedule), run.dev)
    return training_loss(net, b, run.teacher_fwd, num_distill_steps, run.mask_id, run.bf16, run.schedule), b


@torch.no_grad()
def validate(run):
    """The EMA weights on eval_iters fixed validation batches: the same rows and noise on any number of GPUs."""
    total = torch.zeros((), device=run.dev)
    for i in range(run.rank, eval_iters, run.world):
        torch.manual_seed(mix_seed(seed, 1, i))
        total += loss_of(run, run.ema_fwd, run.val_data, i * batch_size)[0]
    if run.ddp:
        dist.all_reduce(total)
    val = total.item() / eval_iters
    rec = {'step': run.step, OBJECTIVES[objective]: val,
           **({'val_ppl': math.exp(min(val, 50))} if objective != 'sdtt' else {})}
    run.log(rec, ' | '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in rec.items()))


def end_round(run):
    """Round run.round ends: its student (EMA weights) is saved, becomes the teacher, and dt grows K-fold."""
    run.round += 1
    if run.master:
        run.ema.meta = run_meta(run)
        rdir = os.path.join(out_dir, f'round_{run.round}_steps_{run.ema.meta["num_sampling_steps"]}')
        save_pretrained(run.ema, rdir)
        run.log(dict(step=run.step, round_done=run.round, next_dt=dt_of(run.round)),  # (the plot's round boundaries)
                f'round {run.round} done at step {run.step}: {rdir}; next dt = {dt_of(run.round):.3e}')
    if teacher_from_ema:  # as the reference's use_ema_on_growth: student and teacher restart from the EMA
        run.model.load_state_dict(run.ema.state_dict())
        run.ema_updates = 0
    run.teacher.load_state_dict(run.model.state_dict())
    if reset_optimizer_each_round:
        run.optimizer.state.clear()


def open_log(run):
    """run.log(record, text): stdout and log.jsonl (resumed: without the steps it redoes); record=None prints only."""
    path = os.path.join(out_dir, 'log.jsonl')
    if run.master:
        os.makedirs(out_dir, exist_ok=True)
        append_log(path, None, keep_upto=run.step if init_from == 'resume' else -1)

    def log(rec, text):
        if run.master:
            print(text)
            if rec is not None:
                append_log(path, rec)
    run.log = log
    sdtt = f', K={num_distill_steps}, {divergence}' if objective == 'sdtt' else ''
    log(None, f'{objective}: {run.model.num_params() / 1e6:.1f}M parameters, {run.world} process(es) x '
              f'{run.grad_accum} micro-batch(es) of {batch_size} x {run.seq_len} tokens, '
              f'{global_batch_size * run.seq_len:,} tokens/step{sdtt}')


def log_window(run, lr, grad_norm, stop):
    """Ends a log window with one sync, all processes agreeing: the summed loss, grad norm, NaN, FLOPs and stop
    requests (the ranks that got no signal learn which one stopped the run: the exit status). Returns any stop."""
    stats = [run.loss_sum, grad_norm, ~run.finite, bool(stop), run.flops]
    stats = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=run.dev) for v in stats])
    if run.ddp:
        dist.all_reduce(stats)
        if stats[3]:
            sig = torch.tensor(stop[0] if stop else 0, device=run.dev)
            dist.all_reduce(sig, op=dist.ReduceOp.MAX)
            stop[:] = [int(sig)]
    loss_val, norm_val, bad, stop_any, flops_val = stats.tolist()
    if bad:
        kept = (f'the last good checkpoint ({run.ckpt_path}) is kept' if os.path.exists(run.ckpt_path)
                else 'no checkpoint yet')
        raise FloatingPointError(f'non-finite loss or gradient before step {run.step}: stopping; {kept}. Lower '
                                 'learning_rate or check the data.')
    dt_s, n, world = time.time() - run.t_log, run.step - run.step_log, run.world
    rec = dict(step=run.step, loss=loss_val / world / n, lr=lr, round=run.round,
               dt=dt_of(run.round) if objective == 'sdtt' else None, grad_norm=norm_val / world,
               tokens_per_s=n * global_batch_size * run.seq_len / dt_s, mfu=flops_val / dt_s / (peak_flops * world),
               time=time.time())
    run.log(rec, f"step {run.step} | loss {rec['loss']:.4g} | lr {lr:.2e} | round {run.round} | "
                 f"{rec['tokens_per_s']:,.0f} tok/s | mfu {100 * rec['mfu']:.1f}% | grad norm {rec['grad_norm']:.3f}")
    run.loss_sum.zero_()
    run.flops, run.t_log, run.step_log = 0.0, time.time(), run.step
    return stop_any > 0


@contextmanager
def stop_on_signals(ckpt_path):
    """Ctrl-C / SIGTERM append to the yielded list: the run saves after this step (Ctrl-C again aborts at once)."""
    stop = []

    def on_signal(signum, frame):
        stop.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print(f'\nsignal {signum}: stopping after this step and saving {ckpt_path}'
              + (' (Ctrl-C again to abort)' if signum == signal.SIGINT else ''))
    old = signal.signal(signal.SIGINT, on_signal), signal.signal(signal.SIGTERM, on_signal)
    try:
        yield stop
    finally:
        for sig, handler in zip((signal.SIGINT, signal.SIGTERM), old):
            signal.signal(sig, handler)


def end_run(run, config):
    """Says why the run ended, writes its last checkpoint; returns whether it finished (max_iters or last round)."""
    if run.round >= run.n_rounds:
        next_steps = teacher_num_steps / num_distill_steps ** (run.round + 1)
        run.log(None, f'done: {run.round} rounds; the next student would sample with {next_steps:g} < '
                      f'min_num_sampling_steps={min_num_sampling_steps} steps')
    if run.master and (run.saved_step != run.step or not os.path.exists(run.ckpt_path)):
        write_checkpoint(run, config)
    finished = run.step >= max_iters or run.round >= run.n_rounds
    if run.master:
        print(f'checkpoint: {run.ckpt_path} (step {run.step}, round {run.round})'
              + ('' if finished else f'; stopped before max_iters={max_iters}: continue with --init_from=resume'))
    return finished


# ----------------------------------------------------------------------------------------------------------- training
def main(argv=None):
    config = configure(dict(_DEFAULTS), argv)  # the settings are the config block's names only
    globals().update(config)  # (from the defaults on every call: main() may run several times in one process)
    run = setup(config)
    open_log(run)
    with stop_on_signals(run.ckpt_path) as stop:
        run.loss_sum, run.flops, run.t_log, run.step_log = torch.zeros((), device=run.dev), 0.0, time.time(), run.step
        halt, run.saved_step = False, run.step  # halt: agreed by all processes (at log steps under DDP)
        while not (run.round >= run.n_rounds or run.step >= max_iters or halt):
            # ---- the training step
            # a reset optimiser warms up again each round: the reference's reset rebuilds its LR scheduler too
            since = run.step % round_every if objective == 'sdtt' and reset_optimizer_each_round else run.step
            lr = learning_rate * min(1.0, (since + 1) / (warmup_iters + 1))
            for g in run.optimizer.param_groups:
                g['lr'] = lr
            for micro in range(run.grad_accum):
                gm = run.rank * run.grad_accum + micro  # index of this micro-batch within the global batch
                torch.manual_seed(mix_seed(seed, 0, run.step, gm))  # its noise, dropout and teacher draws
                with run.fwd.no_sync() if run.ddp and micro < run.grad_accum - 1 else nullcontext():
                    loss, b = loss_of(run, run.fwd, run.train_data, run.step * global_batch_size + gm * batch_size)
                    (loss / run.grad_accum).backward()
                run.flops += step_flops(run.model, run.teacher, b, num_distill_steps)
                run.loss_sum += loss.detach() / run.grad_accum
            grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), grad_clip if grad_clip > 0 else math.inf)
            run.finite &= torch.isfinite(run.loss_sum) & torch.isfinite(grad_norm)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            run.step, run.ema_updates = run.step + 1, run.ema_updates + 1
            d = min(ema_decay, (1 + run.ema_updates) / (10 + run.ema_updates))  # n counts this update (MDLM's ema.py)
            torch._foreach_lerp_(list(run.ema.parameters()), list(run.model.parameters()), 1 - d)
            halt = halt or (bool(stop) and not run.ddp)
            boundary = objective == 'sdtt' and run.step % round_every == 0  # round run.round ends with this step
            last = run.step >= max_iters or (boundary and run.round + 1 >= run.n_rounds)
            save = boundary or (ckpt_interval and run.step % ckpt_interval == 0)
            # ---- a log window also ends at checkpoints (a resumed run logs what an uninterrupted one does), at the end
            if run.step % log_interval == 0 or last or halt or save:
                halt = log_window(run, lr, grad_norm, stop) or halt
            t_aside = time.time()  # evaluation, round boundaries and checkpoints are not training: not in tokens/s
            if eval_interval and eval_iters and (run.step % eval_interval == 0 or last):
                validate(run)
            if boundary:
                end_round(run)
            if run.master and save:
                write_checkpoint(run, config)
            run.t_log += time.time() - t_aside
        finished = end_run(run, config)
    release_lock(out_dir)
    if run.ddp:
        dist.barrier()  # wait for rank 0's final checkpoint: gloo aborts if a peer leaves the group early
        dist.destroy_process_group()
    # stopped by a signal: the shell's 128 + signal, not success (`a && b`, e2e.py must not go on half-trained)
    return 0 if finished else 128 + (stop[0] if stop else signal.SIGINT)


if __name__ == '__main__':
    try:
        sys.exit(main())
    except (FileNotFoundError, FileExistsError, ValueError, FloatingPointError, RunLocked, WriteFailed) as e:
        # bad input, another run in out_dir, a full disk: the message says what to do
        sys.exit(f'distill.py: error: {e}')
