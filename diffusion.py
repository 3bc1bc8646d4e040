"""Masked diffusion (MDLM, Sahoo et al. 2024) in continuous time: noise schedules, masking, SUBS, NELBO, sampler.
MASK is the last vocabulary id (V - 1); a model is any callable model(ids [B, L], sigma [B]) -> logits [B, L, V]."""
import functools
import inspect
import math
import sys
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from tqdm import tqdm

NOISE_EPS = 1e-3   # every schedule: m(1) = 1 - 1e-3, so sigma(1) stays finite
SAMPLE_EPS = 1e-5  # the sampling grid ends at t = 1e-5 (MDLM and SDTT)
CHUNK_ELEMS = 2 ** 25  # a sampler step's [positions, V] float work in chunks of this many entries (~256 MB in fp64)


# ---------------------------------------------------------------------------------------------------- schedule
# A noise schedule is its move chance m(t), the probability that a token is masked at time t in [0, 1], and m'(t).
# Everything else derives from m here: sigma = -log(1 - m) (the network's input), the NELBO weight m'/m, the
# sampler's reveal probability 1 - m(s)/m(t), the SDTT teacher's steps. A new schedule is one more entry.
NOISE_SCHEDULES = {  # name -> (m, m') on tensors; m(1) = 1 - NOISE_EPS (MDLM)
    'loglinear': (lambda t: (1 - NOISE_EPS) * t, lambda t: torch.full_like(t, 1 - NOISE_EPS)),  # all published models
    # m = (1 - eps)(1 - cos(pi t / 2)), written with sin^2 to keep its precision at small t
    'cosine': (lambda t: (1 - NOISE_EPS) * 2 * torch.sin(math.pi / 4 * t) ** 2,
               lambda t: (1 - NOISE_EPS) * math.pi / 2 * torch.sin(math.pi / 2 * t)),
}


def schedule_of(meta):
    """The noise schedule of a checkpoint's meta (model.meta): its noise_schedule, log-linear if it records none."""
    name = (meta or {}).get('noise_schedule') or 'loglinear'
    if name not in NOISE_SCHEDULES:
        raise ValueError(f'the model was trained with noise schedule {name!r}, which this code does not have (one of '
                         f'{list(NOISE_SCHEDULES)}): add it to diffusion.NOISE_SCHEDULES')
    return name


def move_chance(t, schedule='loglinear'):
    """m(t), the masking probability at time t (a tensor)."""
    return NOISE_SCHEDULES[schedule][0](t)


def sigma(t, schedule='loglinear'):
    """Total noise sigma(t) = -log(1 - m(t)), the network's time input."""
    return -torch.log1p(-move_chance(t, schedule))


def nelbo_weight(t, schedule='loglinear'):
    """m'(t) / m(t) (= sigma'/expm1(sigma)): the NELBO weight of a masked token, 1/t for log-linear (float64 inside)."""
    m, dm = NOISE_SCHEDULES[schedule]
    return (dm(t.double()) / m(t.double())).to(t.dtype)


def sample_t(n, device, sampling_eps=1e-3, generator=None):
    """Stratified times (MDLM's antithetic sampling): one draw in each stratum [i/n, (i+1)/n), mapped to [eps, 1]."""
    u = torch.rand(n, device=device, generator=generator)
    t = (u + torch.arange(n, device=device)) / n
    return (1 - sampling_eps) * t + sampling_eps


def q_xt(x0, p_mask, mask_id, generator=None):
    """Forward process: each token independently replaced by MASK with probability p_mask [B]."""
    u = torch.rand(x0.shape, device=x0.device, generator=generator)
    return torch.where(u < p_mask[:, None], mask_id, x0)


# ---------------------------------------------------------------------------------------------------- loss
def mdlm_loss(logits, x0, xt, t, mask_id, positions=None, schedule='loglinear'):
    """MDLM NELBO per token: sum over masked positions of -log p_theta(x0 | xt) m'(t)/m(t) / B L, with SUBS (MASK never
    predicted: an fp32 log-softmax over the real tokens; unmasked positions carried over: no loss). logits: [B, L, V],
    or [M, V] at positions, the flat indices of xt's masked positions (None: found here, a host sync)."""
    if positions is None:
        positions = (xt == mask_id).flatten().nonzero().squeeze(1)
        logits = logits.flatten(0, 1)[positions]
    nll = F.cross_entropy(logits[:, :mask_id].float(), x0.flatten()[positions], reduction='none')
    return (nll * nelbo_weight(t, schedule)[positions // x0.shape[1]]).sum() / x0.numel()


# ---------------------------------------------------------------------------------------------------- sampling
def to_device(v, device):
    """A host tensor (or a dict of them) on the device, without making the host wait (pinned memory on CUDA)."""
    if isinstance(v, dict):
        return {k: to_device(x, device) for k, x in v.items()}
    return v.pin_memory().to(device, non_blocking=True) if torch.device(device).type == 'cuda' else v.to(device)


def draw_categorical(logits, u, chunk_elems=CHUNK_ELEMS, finite=None):
    """One index per row of logits [N, V] from softmax(logits), by inverse CDF in float64 with uniforms u [N] (float32
    starves rare tokens, flattering gen-PPL: Zheng et al. 2024). finite: a device bool and-ed with "rows finite"."""
    N, V = logits.shape
    out = torch.empty(N, dtype=torch.long, device=logits.device)
    rows = max(1, chunk_elems // V)
    for i in range(0, N, rows):
        cdf = torch.softmax(logits[i:i + rows].double(), dim=-1).cumsum_(dim=-1)
        idx = torch.searchsorted(cdf, (u[i:i + rows] * cdf[:, -1])[:, None], right=True)  # first cdf > u
        out[i:i + rows] = idx.squeeze(1).clamp_(max=V - 1)
        if finite is not None:
            finite &= cdf[:, -1].isfinite().all()
    return out


def gives_distribution(logits):
    """Whether every row's softmax is a distribution, as a device bool (amax propagates NaN and needs no fp32 copy)."""
    return logits.amax(dim=-1).isfinite().all()


def check_finite(finite):
    """The one sync of a sampler's NaN check: a diverged model must not pass for one that samples the last token."""
    if not bool(finite):
        raise FloatingPointError('the model gave NaN/inf logits while sampling: the samples are meaningless (a diverged'
                                 ' checkpoint, or fp16/bf16 overflow of a model cast whole: sample it in float32)')


def in_eval_mode(sampler):
    """The sampler with its model (first argument) in eval mode, as MDLM's restore_model_and_sample, then back."""
    @functools.wraps(sampler)
    def run(model, *args, **kwargs):
        training = isinstance(model, torch.nn.Module) and model.training
        try:
            return sampler(model.eval() if training else model, *args, **kwargs)
        finally:
            if training:
                model.train()
    return run


def project(project_fn, x):
    """project_fn(x), which must return the tokens (the release README's "Don't forget to return")."""
    y = project_fn(x)
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        got = f'a tensor of shape {list(y.shape)}' if isinstance(y, torch.Tensor) else type(y).__name__
        raise TypeError(f'project_fn must return the token tensor of shape {list(x.shape)} (`return x`?), not {got}')
    return y


def fresh_seed():
    """A seed from the global CPU generator, so torch.manual_seed before the call makes it reproducible."""
    return int(torch.randint(2 ** 62, (1,)))


def sampling_grid(num_steps, eps=SAMPLE_EPS):
    """t_k = linspace(1, eps, N+1)[k], k < N; every step goes from t to s = t - dt with dt = (1 - eps)/N."""
    return torch.linspace(1, eps, num_steps + 1, dtype=torch.float64)[:-1].tolist(), (1 - eps) / num_steps


def prior(model, n_samples, seq_len, mask_id, bos_id=None, add_bos=True, project_fn=None, device='cpu'):
    """All-MASK [n_samples, seq_len] (MDLM's _sample_prior), BOS first if add_bos (default model.meta['bos_id']),
    then project_fn(x) (a prompt)."""
    block_size = getattr(getattr(model, 'config', None), 'block_size', None)
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f'n_samples must be an integer >= 1, got {n_samples!r}')
    if not isinstance(seq_len, int) or seq_len < 1 or (block_size is not None and seq_len > block_size):
        raise ValueError(f'seq_len must be an integer in [1, {block_size}] (the model block size), got {seq_len!r}')
    x = torch.full((n_samples, seq_len), mask_id, dtype=torch.long, device=device)
    bos_id = getattr(model, 'meta', {}).get('bos_id') if bos_id is None else bos_id
    if add_bos and bos_id is not None:
        x[:, 0] = bos_id  # as every training row starts (this project's scripts); MDLM/SDTT/DUO: add_bos=False
    return x if project_fn is None else project(project_fn, x)


def takes_positions(model):
    """Whether model(ids, sigma, positions) computes logits at those flat positions only (a DiT, also compiled)."""
    m = getattr(model, '_orig_mod', model)
    return 'positions' in inspect.signature(m.forward if isinstance(m, torch.nn.Module) else m).parameters


def run_model(model, schedule, t, x, *positions):
    """model's logits for x [B, L] at time t (a float), under bf16 autocast on CUDA."""
    with torch.autocast('cuda', dtype=torch.bfloat16) if x.device.type == 'cuda' else nullcontext():
        return model(x, sigma(torch.full((x.shape[0],), t, device=x.device), schedule), *positions)


def reveal_tokens(forward, x, reveal, u_token, mask_id, cache, head_only, finite):
    """Draws the tokens at reveal [B, L] (host bool) -> (new x, sequence-forwards run). head_only: the output layer
    only at those positions; cache: the forward only for the sequences that change (MDLM's ddpm_cache)."""
    B, L = x.shape
    b, l = reveal.nonzero(as_tuple=True)  # about L/num_steps per sequence get a float64 draw
    flat = to_device(b * L + l, x.device)  # flat indices into the B * L positions
    xs, at = x, flat  # the sequences run and the revealed positions among them
    if cache and not len(b):  # (without cache every step runs a forward: NFE = steps, as MDLM's sampler)
        return x, 0
    changed = reveal.any(dim=1)
    if cache and not changed.all():  # only the sequences this step changes
        rows = to_device(changed.nonzero().squeeze(1), x.device)
        xs, at = x[rows], to_device((changed.cumsum(0)[b] - 1) * L + l, x.device)
    if head_only:  # a new count every step, 0 and 1 included: unbacked, one compiled graph for all
        if 'torch._dynamo' in sys.modules:  # (a compiled model imported it; importing it costs ~1 s)
            torch._dynamo.decorators.mark_unbacked(at, 0)
        picked = forward(xs, at)
    else:
        picked = forward(xs)[at // L, at % L]
    x_new = x.clone()
    x_new.view(-1)[flat] = draw_categorical(picked[:, :mask_id], to_device(u_token[reveal], x.device), finite=finite)
    return x_new, len(xs)


def final_denoise(forward, x, masked, mask_id, final_step, generator, finite):
    """Still masked positions: the argmax of one more forward (MDLM/SDTT) or a float64 draw (DUO) -> (x, forwards)."""
    rows = masked.any(dim=1).nonzero().squeeze(1)
    if not len(rows):
        return x, 0
    rows = to_device(rows, x.device)
    final = forward(x[rows])[..., :mask_id]
    finite &= gives_distribution(final)
    if final_step == 'draw':  # (uniforms for every position of these rows, after all the steps' draws)
        u = to_device(torch.rand(final.shape[:2], dtype=torch.float64, generator=generator), x.device)
        fill = draw_categorical(final.flatten(0, 1), u.flatten(), finite=finite).view(final.shape[:2])
    else:
        fill = final.argmax(-1)
    x[rows] = torch.where(x[rows] == mask_id, fill, x[rows])
    return x, len(rows)


@in_eval_mode
@torch.no_grad()
def sample(model, n_samples, num_steps, seq_len, mask_id=None, bos_id=None, add_bos=True, project_fn=None, cache=False,
           eps=SAMPLE_EPS, seed=None, generator=None, device=None, verbose=False, step_fn=None, head_only=None,
           final_step='argmax', schedule=None):
    """Ancestral sampling (SPEC §4) -> (tokens [n_samples, seq_len], forwards per sequence). A step from t to s keeps a
    masked position masked w.p. m(s)/m(t) (schedule: default the model's). The host (generator, on the CPU) draws all
    randomness, so it knows the reveals before the forward: no sync per step, the same tokens on any device.
    project_fn(x) (a prompt) runs after the prior and every step. step_fn(x, logits, t, s, u, mask_id, schedule) -> x
    replaces the ancestral update (u: float64 uniforms [B, L]; a sync per step). head_only=False for CUDA graphs."""
    mask_id = model.config.vocab_size - 1 if mask_id is None else mask_id
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f'num_steps must be an integer >= 1, got {num_steps!r}')
    if final_step not in ('argmax', 'draw'):
        raise ValueError(f"final_step must be 'argmax' (MDLM/SDTT) or 'draw' (DUO), got {final_step!r}")
    if step_fn is not None and (cache or head_only):
        raise ValueError('cache and head_only need the ancestral step (its reveals are known first), not a step_fn')
    if device is None:
        p = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
        device = p.device if p is not None else 'cpu'
    generator = generator or torch.Generator().manual_seed(seed if seed is not None else fresh_seed())  # (host)
    head_only = step_fn is None and takes_positions(model) if head_only is None else head_only
    schedule = schedule or schedule_of(getattr(model, 'meta', None))
    x = prior(model, n_samples, seq_len, mask_id, bos_id, add_bos, project_fn, torch.device(device))
    masked = (x == mask_id).cpu()  # the host tracks what is masked: the only sync (step_fn aside)
    finite = torch.ones((), dtype=torch.bool, device=x.device)  # all logits finite so far (checked once, at the end)
    ts, dt = sampling_grid(num_steps, eps)
    n_forward = 0  # sequence-forwards
    for t in tqdm(ts, desc=f'sampling {n_samples}x{seq_len}, {num_steps} steps', disable=not verbose):
        s = max(t - dt, 0.0)
        # draws for every position at every step, so caching (which skips forwards) sees the same randomness
        u_reveal = torch.rand(x.shape, dtype=torch.float64, generator=generator)
        u_token = torch.rand(x.shape, dtype=torch.float64, generator=generator)
        if step_fn is not None:  # decides on the device: the host learns the new state with one sync
            logits = run_model(model, schedule, t, x)
            finite &= gives_distribution(logits[..., :mask_id])
            x_new = step_fn(x, logits, t, s, to_device(u_token, x.device), mask_id, schedule)
            n_forward += n_samples
            masked = (x_new == mask_id).cpu()
        else:
            m_t, m_s = move_chance(torch.tensor([t, s], dtype=torch.float64), schedule).tolist()
            reveal = masked & (u_reveal >= m_s / m_t)  # P(reveal) = 1 - m(s)/m(t)
            forward = functools.partial(run_model, model, schedule, t)
            x_new, n = reveal_tokens(forward, x, reveal, u_token, mask_id, cache, head_only, finite)
            n_forward += n
            masked = masked & ~reveal
        x = x_new if project_fn is None else project(project_fn, x_new)  # (the prompt: never masked after the prior)
    forward = functools.partial(run_model, model, schedule, ts[-1] - dt)
    x, n = final_denoise(forward, x, masked, mask_id, final_step, generator, finite)
    if n and project_fn is not None:
        x = project(project_fn, x)
    check_finite(finite)
    return x, (n_forward + n) / n_samples
