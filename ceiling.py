"""
The ceiling of one SDTT round: samples of the student that a perfectly trained round would give, at any scale.

A round trains the student at x_t on one random draw of the teacher's K steps at a time. With unlimited capacity and
training, its output at x_t is the minimiser over those draws of the divergence: per masked position, kld (reverse
KL): the normalised geometric mean of the draws' distributions; kl_fwd: their mean. This script estimates it from
`draws` draws at every sampling step and samples with it, batch for batch with sample.py's seeds, so evaluate.py's
gen-PPL, paired with the teacher's samples, says how much of a round's reach (teacher@n -> teacher@Kn) a one-step
student, whose tokens within a step are independent, can take at all; a trained student is measured against that.

    python ceiling.py --teacher=out/e2e/teacher --num_steps=16 --seed=1 --out_dir=out/e2e
    python evaluate.py --eval=genppl --samples=out/e2e/samples/ceiling --judge=out/e2e/judge --out_dir=out/e2e
"""
import os
import re
import time

import numpy as np
import torch

from configurator import config_keys, configure
from diffusion import SAMPLE_EPS, move_chance, sample, schedule_of
from distill import real_log_probs, teacher_draws, teacher_targets
from sample import batch_seed, load_model, save_samples

teacher = 'out/e2e/teacher'   # the round's teacher: any checkpoint sample.py loads (a round directory too)
num_steps = 16                # n, the student's sampling steps: the teacher takes K steps of 1/(K n) for each
num_distill_steps = 2         # K
draws = 4                     # teacher draws averaged per sampling step (each costs K teacher forwards)
divergence = 'kld'            # 'kld' (geometric mean) | 'kl_fwd' (arithmetic mean): the minimiser over the draws
n_samples, batch_size, seq_len, seed = 512, 64, 128, 1   # as sample.py's: the same batches, paired
out_dir = 'out/e2e'
device = 'cpu'
_CONFIG_KEYS = config_keys(globals())  # exactly the settings above
MINIMISERS = {'kld': lambda lp: torch.log_softmax(lp.mean(0), -1),  # argmin_s E KL(s || t) = normalised exp E log t
              'kl_fwd': lambda lp: torch.logsumexp(lp, 0) - np.log(len(lp))}  # argmin_s E KL(t || s) = E t


def time_of(sig, schedule, iters=60):
    """t with sigma(t) = sig (a float): bisection on the schedule's m, which increases in t."""
    m, lo, hi = -np.expm1(-sig), 0.0, 1.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if move_chance(torch.tensor(mid, dtype=torch.float64), schedule) < m else (lo, mid)
    return (lo + hi) / 2


class IdealStudent(torch.nn.Module):
    """model(x, sigma) -> logits: at x's masked positions, the minimiser of the divergence over `draws` draws of the
    teacher's K steps from t to the student's next time (distill.teacher_targets' SDTT targets, its own generator)."""

    def __init__(self, net, mask_id, num_steps, K, draws, divergence, schedule, generator):
        super().__init__()
        self.net, self.K, self.draws, self.schedule, self.gen = net, K, draws, schedule, generator
        self.dt = (1 - SAMPLE_EPS) / (K * num_steps)  # the teacher's step at K n steps (diffusion.sampling_grid)
        self.minimiser, self.mask_id = MINIMISERS[divergence], mask_id

    def forward(self, x, sig):
        B, L = x.shape
        t = torch.full((B,), time_of(sig[0].item(), self.schedule))  # fp32, as in training
        pos = (x == self.mask_id).flatten().nonzero().squeeze(1).cpu()
        lp = [real_log_probs(teacher_targets(self.net, {'xt': x, 'pos': pos.to(x.device), **teacher_draws(
            t, pos, L, self.dt, self.K, self.schedule, self.gen)}, self.K, self.mask_id, schedule=self.schedule),
            self.mask_id) for _ in range(self.draws)]
        out = torch.zeros(B * L, self.mask_id + 1, device=x.device)
        out[pos.to(x.device), :self.mask_id] = self.minimiser(torch.stack(lp))
        return out.view(B, L, -1)


def main(argv=None):
    c = configure({k: globals()[k] for k in _CONFIG_KEYS}, argv)
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
    path = os.path.join(c['out_dir'], 'samples', 'ceiling', f"{name}_ancestral_T{n}_L{c['seq_len']}_n{len(tokens)}"
                                                             f"_s{c['seed']}")
    tok = lm.tokenizer if lm.meta.get('tokenizer') else None
    texts = tok.batch_decode(tokens) if tok else [' '.join(map(str, r)) for r in tokens]
    save_samples(path, tokens, {**c, 'model': name, 'meta': lm.meta, 'seconds': round(time.time() - t0, 1)}, texts)
    print(f'{len(tokens)} samples in {time.time() - t0:.0f}s -> {path}.npz')
    return path


if __name__ == '__main__':
    main()
