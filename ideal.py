"""
The ideal student of one SDTT round: what a round's objective asks for, with unlimited capacity and training.

A round trains the student at x_t on one random draw of the teacher's K steps at a time; the minimiser of the
divergence over those draws is, per masked position, for kld (reverse KL) the normalised geometric mean of the draws'
distributions, for kl_fwd their mean. This script estimates it at every sampling step (Rao-Blackwellised over `draws`
draws) and samples with it, batch for batch with sample.py's seeds: gen-PPL paired with the teacher's and the trained
student's samples says whether a round falls short of its reach (teacher@n -> teacher@Kn) for want of training or
because its objective itself, a one-step student whose tokens within a step are independent, goes no further.

    python ideal.py --teacher=out/e2e/sdtt/round_2_steps_8 --num_steps=4 --seed=1 --out_dir=out/e2e
    python evaluate.py --eval=genppl --samples=out/e2e/samples/ideal --judge=out/e2e/judge --out_dir=out/e2e
"""
import os
import re
import time

import numpy as np
import torch

from configurator import config_keys, configure
from diffusion import SAMPLE_EPS, draw_categorical, move_chance, sample, schedule_of, sigma
from distill import real_log_probs, teacher_draws
from sample import batch_seed, load_model, save_samples

teacher = 'out/e2e/teacher'   # the round's teacher: any checkpoint sample.py loads (a round directory too)
num_steps = 16                # n, the student's sampling steps: the teacher takes K steps of 1/(K n) for each
num_distill_steps = 2         # K
draws = 8                     # draws of the teacher's steps per sampling step (each: K - 1 teacher forwards)
divergence = 'kld'            # 'kld' (geometric mean) | 'kl_fwd' (arithmetic mean): the minimiser over the draws
n_samples, batch_size, seq_len, seed = 512, 64, 128, 1   # as sample.py's: the same batches, paired
out_dir = 'out/e2e'
device = 'cpu'
_CONFIG_KEYS = config_keys(globals())  # exactly the settings above
# divergence -> (f, finish): its minimiser over random targets t is finish(E f(log t)), E the weighted mean.
# kld: argmin_s E KL(s || t) = normalised exp E log t; kl_fwd: argmin_s E KL(t || s) = E t
MINIMISERS = {'kld': (lambda lp: lp, lambda s: torch.log_softmax(s, -1)), 'kl_fwd': (torch.exp, torch.log)}


def time_of(sig, schedule, iters=60):
    """t with sigma(t) = sig (a float): bisection on the schedule's m, which increases in t."""
    m, lo, hi = -np.expm1(-sig), 0.0, 1.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if move_chance(torch.tensor(mid, dtype=torch.float64), schedule) < m else (lo, mid)
    return (lo + hi) / 2


class IdealStudent(torch.nn.Module):
    """model(x, sigma) -> logits: at x's masked positions, the minimiser of the divergence over the SDTT targets of
    the teacher's K steps from t to the student's next time (distill.teacher_targets), estimated from `draws` draws.
    Rao-Blackwellised: a position's own reveal is averaged out exactly (it is revealed at step k with a probability
    the schedule gives; step k's distribution is averaged over the draws that left it masked until k)."""

    def __init__(self, net, mask_id, num_steps, K, draws, divergence, schedule, generator):
        super().__init__()
        self.net, self.mask_id, self.K, self.draws = net, mask_id, K, draws
        self.schedule, self.gen = schedule, generator
        self.dt = (1 - SAMPLE_EPS) / (K * num_steps)  # the teacher's step at K n steps (diffusion.sampling_grid)
        self.f, self.finish = MINIMISERS[divergence]

    def forward(self, x, sig):
        B, L = x.shape
        t = torch.full((B,), time_of(sig[0].item(), self.schedule))  # fp32, as in training
        pos = (x == self.mask_id).flatten().nonzero().squeeze(1).cpu()
        at = pos.to(x.device)
        S, N, first = [0.0] * self.K, [0.0] * self.K, None  # per step: sum of f(log p) and count over pending draws
        for _ in range(self.draws):
            d = teacher_draws(t, pos, L, self.dt, self.K, self.schedule, self.gen)
            xk, pending = x, torch.ones(len(pos), dtype=torch.bool, device=x.device)
            for k in range(self.K):
                if k == 0 and first is not None:  # step 0 starts from x_t in every draw: one forward for all
                    lp = first
                else:
                    lp = real_log_probs(self.net(xk, sigma(d['teacher_t'][k], self.schedule), at), self.mask_id)
                    first = lp if k == 0 else first
                    S[k] = S[k] + pending[:, None] * self.f(lp)
                    N[k] = N[k] + pending
                if k < self.K - 1:
                    rows = d[f'reveal_{k}'].to(x.device)
                    xk = xk.flatten().index_put((at[rows],), draw_categorical(lp[rows], d[f'u_{k}'])).view_as(x)
                    pending[rows] = False
        ts = d['teacher_t'][:, 0].double()
        keep = move_chance((ts - self.dt).clamp(min=0), self.schedule) / move_chance(ts, self.schedule)
        keep[-1] = 0  # the last step takes every position still masked
        prob = torch.cumprod(torch.cat([torch.ones(1, dtype=keep.dtype), keep[:-1]]), 0) * (1 - keep)  # revealed at k
        w = [prob[k].item() * (N[k] > 0) for k in range(self.K)]  # a step no draw reached: its share goes to the rest
        mean = sum((w[k] / sum(w))[:, None] * S[k] / N[k].clamp(min=1)[:, None] for k in range(self.K))
        out = torch.zeros(B * L, self.mask_id + 1, device=x.device)
        out[at, :self.mask_id] = self.finish(mean)
        return out.view(B, L, -1)


def main(argv=None):
    c = configure({k: globals()[k] for k in _CONFIG_KEYS}, argv)
    if c['draws'] < 1:
        raise ValueError(f"draws must be >= 1, got {c['draws']}")
    if c['divergence'] not in MINIMISERS:
        raise ValueError(f"divergence must be one of {list(MINIMISERS)} (the minimiser is known in closed form), "
                         f"got {c['divergence']!r}")
    lm = load_model(c['teacher'], device=c['device'])
    net, n, K, schedule = lm.backbone, c['num_steps'], c['num_distill_steps'], schedule_of(lm.meta)
    batches, t0 = [], time.time()
    for i in range(0, -(-c['n_samples'] // c['batch_size'])):
        b = min(c['batch_size'], c['n_samples'] - i * c['batch_size'])
        s = batch_seed(c['seed'], i)
        gen = torch.Generator().manual_seed(s + 1)  # the teacher's draws: not the sampler's generator
        ideal = IdealStudent(net, lm.meta['mask_id'], n, K, c['draws'], c['divergence'], schedule, gen)
        x, _ = sample(ideal, b, n, c['seq_len'], mask_id=lm.meta['mask_id'], bos_id=lm.meta.get('bos_id'),
                      seed=s, device=c['device'], head_only=False, schedule=schedule)
        batches.append(x.cpu().numpy())
        print(f'batch {i + 1}: {time.time() - t0:.0f}s', flush=True)
    tokens = np.concatenate(batches)
    name = f"ideal-{c['divergence']}-K{K}-d{c['draws']}-" + re.sub(r'[^A-Za-z0-9._@-]+', '-', lm.name).strip('-')
    path = os.path.join(c['out_dir'], 'samples', 'ideal', f"{name}_ancestral_T{n}_L{c['seq_len']}_n{len(tokens)}"
                                                             f"_s{c['seed']}")
    tok = lm.tokenizer if lm.meta.get('tokenizer') else None
    texts = tok.batch_decode(tokens) if tok else [' '.join(map(str, r)) for r in tokens]
    save_samples(path, tokens, {**c, 'model': name, 'meta': lm.meta, 'seconds': round(time.time() - t0, 1)}, texts)
    print(f'{len(tokens)} samples in {time.time() - t0:.0f}s -> {path}.npz')
    return path


if __name__ == '__main__':
    try:
        main()
    except (FileNotFoundError, ValueError, RuntimeError) as e:  # bad input: the message says what to do
        raise SystemExit(f'ideal.py: error: {e}')
