"""
Sample from a masked diffusion LM (MDLM / SDTT student or teacher) or the causal AR baseline (autoregressively, with
a KV cache), as a script or as the Python API of the original SDTT release (implemented here; sdtt.py re-exports it,
so the release's `from sdtt import load_small_student` works as it is).

    python sample.py --init_from=jdeschena/sdtt --revision=baselines_kld_step_70000 --num_steps=32 --n_samples=8
    python sample.py --init_from=out/kld_small --prompt="Today is a great day." --n_samples=4 --seq_len=128
    python sample.py --init_from=out/kld_small --mode=cond_prefix --cond_data=corpus/val.jsonl.gz
    torchrun --standalone --nproc_per_node=8 sample.py --init_from=out/kld_small --n_samples=1024 --batch_size=16
    python sample.py --init_from=out/ar_small --n_samples=1024   # a causal checkpoint: AR sampling, KV cache

Output: out_dir/samples/{uncond,cond}/<settings>.npz (token ids + settings, read back with load_samples) and a
.jsonl of the decoded text next to it. Samples are drawn in batches; batch i always uses the seed
batch_seed(seed, i), whichever process draws it, so any number of processes gives the same samples (for the same
seed and batch_size: the file name does not carry batch_size, its settings do).
"""
import hashlib
import json
import math
import os
import re
import time
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

import diffusion
from configurator import check_choice, check_sizes, config_keys, configure
from fileio import WriteFailed, local_or_dataset, read_jsonl, release_lock, run_lock
from model import check_device, load_pretrained, write_atomic
from prepare_data import get_tokenizer

# -------------------------------------------------------------------- settings (config file or --key=value)
init_from = 'kuleshov-group/mdlm-owt'  # a checkpoint file, a directory (ours, MDLM or SDTT layout) or a hub id
revision = ''             # hub revision, e.g. baselines_kld_step_70000 for jdeschena/sdtt
num_steps = None          # None: the checkpoint's meta num_sampling_steps (a round directory's: its student's;
                          # a run's ckpt.pt: its current teacher's), else 32 (published models carry none)
n_samples = 8             # uncond mode: number of samples
batch_size = 8            # samples per forward batch (per process)
seq_len = None            # None: the model's block size (1024 for the published models)
sampler = 'ancestral'     # 'ancestral' | 'cached' (ancestral, runs only the sequences a step changes) | 'analytic'
                          # | 'ancestral_fp32' (the reference's float32 draws: flatters gen-PPL; for comparisons only)
final_step = 'argmax'     # positions still masked after the last step: 'argmax' (MDLM/SDTT) | 'draw' (DUO's
                          # noise_removal 'ancestral': a float64 draw from the model's distribution)
seed = 1
prompt = ''               # uncond mode: every sample starts with BOS + this text ...
prompt_file = ''          # ... or with the text of this file
add_bos = True            # uncond mode: BOS at position 0, as every training row (this script's choice; False: the
                          # model generates it from an all-MASK prior, as MDLM, SDTT's release and DUO sample)
mode = 'uncond'           # 'uncond' | 'cond_prefix' (SPEC §6 MAUVE protocol)
cond_data = ''            # cond_prefix: a .jsonl(.gz) file (field "text") or a Hugging Face dataset name
cond_split = 'test'       # split of the HF dataset
n_prompts = 8             # cond_prefix: number of documents (SPEC §6: 1024)
min_doc_len = 1024        # cond_prefix: only documents with at least this many tokens
prefix_bos = False        # cond_prefix: True frames documents as [BOS] + tokens (as training rows); False is SPEC §6:
                          # the prompt is the first prefix_len document tokens, the reference its first cond_len
prefix_len = 50           # cond_prefix: prompt = the first prefix_len tokens of the framed document
n_continuations = 5       # cond_prefix: samples per prompt
cond_len = 100            # cond_prefix: total length of prefix + continuation (also the reference length)
out_dir = 'out'
overwrite = False
n_print = 4               # decoded samples printed at the end
compile = False
device = ''               # '' = cuda if available, else cpu
verbose = False
_CONFIG_KEYS = config_keys(globals())  # exactly the settings above

HUB_MDLM, HUB_SDTT = 'kuleshov-group/mdlm-owt', 'jdeschena/sdtt'
LOSSES, SCALING_SIZES, ROUNDS = ('kld', 'mse', 'tvd'), ('sm', 'md', 'large'), tuple(range(1, 8))
# the samplers of DiffusionLM.sample: name -> its diffusion.sample step_fn (None: the ancestral step) from a seeded
# generator on the model's device. The script adds 'cached' (the ancestral step, only the sequences it changes).
SAMPLERS = {'ancestral': lambda generator: None, 'analytic': lambda generator: analytic_step,
            'ancestral_fp32': lambda generator: reference_step(generator)}


# -------------------------------------------------------------------- the release API
class DiffusionLM(torch.nn.Module):
    """A DiT plus what sampling needs: tokenizer, special ids (model.meta) and a name. The backbone is registered as
    `backbone`, so state_dict() has the keys of the published checkpoints."""

    def __init__(self, backbone, name='model'):
        super().__init__()
        self.backbone, self.name = backbone, name

    @property
    def meta(self):
        return self.backbone.meta

    @property
    def device(self):
        return next(self.parameters()).device

    @property
    def tokenizer(self):
        name = self.meta.get('tokenizer')
        if name is None:
            raise ValueError(f'{self.name}: the checkpoint names no tokenizer (meta.tokenizer); only token ids are available')
        tok = get_tokenizer(name)
        if tok.vocab_size != self.backbone.config.vocab_size:
            raise ValueError(f'{self.name}: tokenizer {name} has {tok.vocab_size} ids, the model {self.backbone.config.vocab_size}')
        return tok

    def forward(self, idx, sigma=None):
        return self.backbone(idx, sigma)

    @torch.no_grad()
    def sample(self, n_samples, num_steps, seq_len=1024, verbose=False, project_fn=None, cache=False, seed=None,
               sampler='ancestral', add_bos=None, return_nfe=False, final_step='argmax'):
        """Token ids [n_samples, seq_len] (on the model's device); project_fn(x) is applied to the prior and after
        every step (prompting). sampler: 'ancestral', 'analytic' or 'ancestral_fp32' (reference_step: the
        reference's float32 draws, biased, only to compare with numbers sampled that way); cache: run only the
        sequences a step changes (ancestral only); add_bos: write BOS at position 0 (True: as every training row
        starts; the default None is the release's: an all-MASK prior, the model generates position 0, SPEC §4; a causal
        backbone needs a first token: BOS). return_nfe: also return the forward passes per sequence. final_step: what
        fills positions still masked after the last step, 'argmax' (MDLM/SDTT) or 'draw' (DUO).
        A causal backbone (the AR baseline) samples autoregressively with a KV cache (sample_ar): num_steps, cache
        and sampler do not apply; project_fn forces the positions it sets."""
        check_choice('sampler', sampler, tuple(SAMPLERS))
        if add_bos is None:  # (the release's prior; the AR baseline starts from BOS)
            add_bos = self.backbone.config.causal
        if self.backbone.config.causal:
            tokens, nfe = sample_ar(self.backbone, n_samples, seq_len, bos_id=self.meta.get('bos_id'), add_bos=add_bos,
                                    project_fn=project_fn, seed=seed, verbose=verbose)
            return (tokens, nfe) if return_nfe else tokens
        if seed is None:
            seed = diffusion.fresh_seed()
        step_fn = SAMPLERS[sampler](torch.Generator(self.device).manual_seed(seed))
        tokens, nfe = diffusion.sample(self.backbone, n_samples, num_steps, seq_len, mask_id=self.meta['mask_id'],
                                       bos_id=self.meta.get('bos_id'), add_bos=add_bos, project_fn=project_fn,
                                       cache=cache, seed=seed, verbose=verbose, step_fn=step_fn, final_step=final_step)
        return (tokens, nfe) if return_nfe else tokens


def load_model(name_or_path, revision=None, device='cpu'):
    """Any checkpoint load_pretrained reads (a project ckpt.pt or out_dir, a saved or published directory, a hub id)."""
    backbone = load_pretrained(name_or_path, revision=revision or None, device=device)
    if os.path.exists(name_or_path):  # 'run/round_1_steps_32' (a ckpt.pt: its out_dir): the parent tells two runs apart
        path = os.path.abspath(name_or_path)
        path = os.path.dirname(path) if os.path.isfile(path) else path
        name = os.path.join(os.path.basename(os.path.dirname(path)), os.path.basename(path))
    else:
        name = name_or_path + (f'@{revision}' if revision else '')
    return DiffusionLM(backbone, name)


def _load_release(repo, rev, path, device, round):
    lm = load_model(path, device=device) if path else load_model(repo, revision=rev, device=device)
    lm.meta.setdefault('round', round)
    lm.meta.setdefault('source', path or (f'{repo}@{rev}' if rev else repo))
    return lm


def load_mdlm_small(path=None, device='cpu', revision='teacher_1M_sm'):
    """MDLM small (1M steps) as the release loads it: jdeschena/sdtt@teacher_1M_sm. revision=None loads the same
    model from kuleshov-group/mdlm-owt instead. Or from a local directory holding either."""
    return _load_release(HUB_SDTT if revision else HUB_MDLM, revision, path, device, round=0)


def load_small_student(loss='kld', round=7, path=None, device='cpu'):
    """The students distilled from MDLM small with divergence `loss` (kld/mse/tvd), after `round` (1..7) rounds."""
    check_choice('loss', loss, LOSSES)
    check_choice('round', round, ROUNDS)
    return _load_release(HUB_SDTT, f'baselines_{loss}_step_{10000 * round}', path, device, round)


def load_scaling_student(size='sm', round=7, path=None, device='cpu'):
    """The students of the scaling experiments (teachers trained 400k steps), size sm/md/large, round 1..7."""
    check_choice('size', size, SCALING_SIZES)
    check_choice('round', round, ROUNDS)
    return _load_release(HUB_SDTT, f'scaling_400k_{size}_step_{10000 * round}', path, device, round)


def load_scaling_teacher(size='sm', path=None, device='cpu'):
    """The teachers of the scaling experiments (400k steps, before distillation), size sm/md/large."""
    check_choice('size', size, SCALING_SIZES)
    return _load_release(HUB_SDTT, f'teacher_400k_{size}_step_400000', path, device, round=0)


# -------------------------------------------------------------------- the analytic (SEDD) sampler
def analytic_probs(logits, x, t, s, mask_id, schedule='loglinear'):
    """p(x_s | x_t) [N, V] in float64 for current tokens x [N] and raw logits [N, V], computed as SEDD's Tweedie
    tau-leaping step (MDLM's `_analytic_update`): the concrete score p_t(y)/p_t(x) of the absorbing process,
    'staggered' by exp(dsigma), times the transposed transition exp(-dsigma Q)^T at x.
    For the absorbing process with the SUBS denoiser this is algebraically the ancestral step (real y: p(y)(m_t - m_s)
    /m_t, MASK: m_s/m_t; unmasked tokens stay); the tests check that numerically. Computed here from the score."""
    sig_t, sig_s = diffusion.sigma(torch.tensor([t, s], dtype=torch.float64), schedule).tolist()
    edsig = math.exp(sig_t - sig_s)
    log_k = -math.log(math.expm1(sig_t))  # log(e^-sigma / (1 - e^-sigma)): log-odds of a token being unmasked
    masked = (x == mask_id)[:, None]
    # score of a masked x: p_theta(y) k for real y, 1 for MASK. Of an unmasked x: 1 at x, 1/k at MASK, 0 elsewhere.
    score = F.pad(torch.exp(F.log_softmax(logits[:, :mask_id].double(), dim=-1) + log_k), (0, 1), value=1.0)
    unmasked = torch.zeros_like(score).scatter_(1, x[:, None], 1.0)
    unmasked[:, mask_id] = math.exp(-log_k)
    score = torch.where(masked, score, unmasked)
    stag = score * edsig  # staggered score: e^dsigma score, and (1 - e^dsigma) sum(score) moved onto MASK
    stag[:, mask_id] += (1 - edsig) * score.sum(-1)
    # exp(-dsigma Q)^T at x: x stays itself with e^-dsigma; MASK also goes to every token with 1 - e^-dsigma
    edge = torch.zeros_like(score).scatter_(1, x[:, None], 1 / edsig) + masked.double() * (1 - 1 / edsig)
    return stag * edge


def masked_chunks(x, mask_id, vocab_size):
    """The masked positions of x [B, L] as (batch, position) index pairs, in chunks of diffusion.CHUNK_ELEMS /
    vocab_size positions: a step_fn's [chunk, V] float work stays within a few hundred MB whatever the batch."""
    b, l = (x == mask_id).nonzero(as_tuple=True)
    rows = max(1, diffusion.CHUNK_ELEMS // vocab_size)
    return [(b[i:i + rows], l[i:i + rows]) for i in range(0, len(b), rows)]


def analytic_step(x, logits, t, s, u, mask_id, schedule='loglinear'):
    """diffusion.sample step_fn: draws x_s from analytic_probs in float64, by inverse CDF with the uniforms u [B, L].
    Only masked positions are computed: for unmasked ones analytic_probs is the one-hot of x (tested)."""
    x_new = x.clone()
    for bi, li in masked_chunks(x, mask_id, logits.shape[-1]):
        probs = analytic_probs(logits[bi, li], x[bi, li], t, s, mask_id, schedule)
        x_new[bi, li] = diffusion.draw_categorical(probs.log(), u[bi, li])
    return x_new


# -------------------------------------------------------------------- the reference's float32 sampler
def reference_step(generator):
    """A diffusion.sample step_fn that samples as the MDLM/SDTT reference does, kept only to compare with numbers
    sampled that way (SPEC §4): one joint draw per masked position over the real tokens (weights p (m(t) - m(s))) and
    MASK (weight m(s)), the argmax of weight / E with E = 1e-10 - log(U + 1e-10) and U float32 uniforms from
    generator (on the model's device). U stops at 1 - 2^-24, so E > 6e-8: a token whose weight is below ~6e-8 times
    MASK's is never drawn. The more steps, the smaller m(t) - m(s) and the more rare tokens starve: lower entropy and
    a flattering gen-PPL (Zheng et al. 2024: 31.2 instead of 126.1 at 2048 steps)."""
    def step(x, logits, t, s, u, mask_id, schedule='loglinear'):
        x_new = x.clone()
        m_t, m_s = diffusion.move_chance(torch.tensor([t, s], dtype=torch.float64), schedule).tolist()
        for bi, li in masked_chunks(x, mask_id, logits.shape[-1]):
            w = torch.softmax(logits[bi, li, :mask_id].float(), dim=-1) * (m_t - m_s)
            w = torch.cat([w, torch.full_like(w[:, :1], m_s)], dim=-1)  # MASK's weight at index mask_id
            e = 1e-10 - (torch.rand(w.shape, generator=generator, device=w.device) + 1e-10).log()
            x_new[bi, li] = (w / e).argmax(dim=-1)
        return x_new
    return step


# -------------------------------------------------------------------- the autoregressive baseline
@diffusion.in_eval_mode
@torch.no_grad()
def sample_ar(model, n_samples, seq_len, bos_id=None, add_bos=True, project_fn=None, seed=None, generator=None,
              device=None, verbose=False):
    """Ancestral sampling of the AR baseline (model.py causal=True, objective 'ar' of distill.py) with a KV cache, for
    comparing gen-PPL and latency with the diffusion samplers. Position 0 holds BOS (add_bos; bos_id defaults to
    model.meta['bos_id']); project_fn(x) is applied once to the all-MASK prior, and every position it sets is forced
    (a prompt). Position t is drawn from the logits of position t - 1 at temperature 1, over the real tokens only
    (the MASK column, the last id, is excluded), by float64 inverse CDF with one uniform per position, drawn upfront.
    The forced prefix common to the batch is fed in one forward; then one forward of the batch per position, each
    feeding only the newest token (earlier keys and values are in the cache).
    Returns (tokens [n_samples, seq_len] int64, nfe) with nfe the forward calls (the prefix one + one per token)."""
    cfg = model.config
    if not cfg.causal:
        raise ValueError('sample_ar needs a causal model (the AR baseline); diffusion models use diffusion.sample')
    device = torch.device(device or next(model.parameters()).device)
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(seed if seed is not None else diffusion.fresh_seed())
    cuda = device.type == 'cuda'
    autocast = torch.autocast('cuda', dtype=torch.bfloat16) if cuda else nullcontext()
    mask_id = cfg.vocab_size - 1
    x = diffusion.prior(model, n_samples, seq_len, mask_id, bos_id, add_bos, project_fn, device)
    forced = x != mask_id
    if not forced[:, 0].all():
        raise ValueError('autoregressive sampling needs a first token: BOS (add_bos with a bos_id) or a prompt')
    P = int(forced.all(0).long().cumprod(0).sum())  # length of the prefix forced in every row
    u = torch.rand(x.shape, dtype=torch.float64, device=device, generator=generator)
    cache = model.new_kv_cache(n_samples, dtype=torch.bfloat16 if cuda else next(model.parameters()).dtype)
    positions = range(P, seq_len)
    if verbose:
        from tqdm import tqdm
        positions = tqdm(positions, desc=f'sampling {n_samples}x{seq_len} autoregressively')
    nfe, start, new = 0, 0, x[:, :P]
    finite = torch.ones((), dtype=torch.bool, device=device)  # (checked once, at the end: no sync per token)
    for t in positions:  # feed positions start .. t - 1, draw position t
        with autocast:
            logits = model(new, cache=cache, start=start)[:, -1, :mask_id]
        nfe += 1
        x[:, t] = torch.where(forced[:, t], x[:, t], diffusion.draw_categorical(logits, u[:, t], finite=finite))
        start, new = t, x[:, t:t + 1]
    diffusion.check_finite(finite)
    return x, nfe


# -------------------------------------------------------------------- prompts, seeds, sample files
def load_prefixes(source, tok, n_prompts, prefix_len, cond_len, min_doc_len, split='test', bos=True):
    """SPEC §6: the first n_prompts documents of `source` with at least min_doc_len tokens, framed as [BOS] + tokens
    (bos=True) or as they are. Returns (prompts [n, prefix_len], references [n, cond_len], document indices: 0-based
    line of the .jsonl or row of the dataset)."""
    if local_or_dataset(source, 'cond_data'):
        docs = ((n - 1, r['text']) for n, r in read_jsonl(source, {'text': str}, strict=True,
                                                         what='a JSON object with a string field "text"'))
    else:
        try:
            import datasets
            docs = enumerate(ex['text'] for ex in datasets.load_dataset(source, split=split))
        except Exception as e:
            raise RuntimeError(f'cond_data {source!r} is not a local .jsonl file and could not be loaded as a Hugging '
                               f'Face dataset ({type(e).__name__}: {e}); offline, pass a .jsonl file') from e
    refs, idx = [], []
    for i, text in docs:
        ids = tok.encode(text)
        if len(ids) >= min_doc_len:
            refs.append(([tok.bos_token_id] * bos + ids)[:cond_len])
            idx.append(i)
            if len(refs) == n_prompts:
                break
    if len(refs) < n_prompts:
        raise ValueError(f'{source}: only {len(refs)} documents have >= {min_doc_len} tokens, but n_prompts={n_prompts}; '
                         'lower n_prompts or min_doc_len')
    refs = torch.tensor(refs)
    return refs[:, :prefix_len], refs, idx


def clamp_prefix(prefix):
    """project_fn that writes prefix [B, P] into the first P positions of every step's x [B, L]."""
    def project_fn(x):
        x[:, :prefix.shape[1]] = prefix
        return x
    return project_fn


def batch_seed(seed, i):
    """Seed of sample batch i: a function of the global batch index, not of the process that draws it."""
    return int(np.random.SeedSequence([seed, i]).generate_state(1)[0])


def save_samples(path, tokens, settings, texts, **arrays):
    """path.npz: tokens [n, L] int32, settings (JSON string) and any extra arrays; path.jsonl: one {"i", "text"} per
    sample. The new .npz (what evaluate.py reads, and what marks the output as there) is complete on disk as .npz.new
    before anything is replaced; then the old .npz goes, the .jsonl is replaced (atomically) and the .npz.new renamed:
    a crash never leaves an .npz beside a .jsonl of other samples, nor loses the new samples."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    write_atomic(path + '.npz.new', lambda f: np.savez(f, tokens=np.asarray(tokens, dtype=np.int32),
                                                        settings=np.array(json.dumps(settings, default=str)), **arrays))
    if os.path.exists(path + '.npz'):
        os.remove(path + '.npz')
    lines = ''.join(json.dumps({'i': i, 'text': t}) + '\n' for i, t in enumerate(texts))
    write_atomic(path + '.jsonl', lambda f: f.write(lines.encode()))
    os.replace(path + '.npz.new', path + '.npz')


def load_samples(path):
    """{'tokens': int64 [n, L], 'settings': dict, + the extra arrays (prompt_ids, ref_tokens, doc_idx, ...)}."""
    with np.load(path if path.endswith('.npz') else path + '.npz', allow_pickle=False) as z:
        out = {k: z[k] for k in z.files}
    out['tokens'] = out['tokens'].astype(np.int64)
    out['settings'] = json.loads(str(out['settings']))
    return out


# -------------------------------------------------------------------- CLI
def main(argv=None):
    c = SimpleNamespace(**configure({k: globals()[k] for k in _CONFIG_KEYS}, argv))
    config = dict(vars(c))
    check_choice('sampler', c.sampler, ('cached', *SAMPLERS))
    check_choice('mode', c.mode, ('uncond', 'cond_prefix'))
    check_choice('final_step', c.final_step, ('argmax', 'draw'))
    check_sizes(config, batch_size=1, n_samples=1, n_prompts=1, n_continuations=1,
                **{k: 1 for k in ('num_steps', 'seq_len') if config[k] is not None})
    if c.mode == 'cond_prefix' and (not c.cond_data or not 0 < c.prefix_len < c.cond_len <= c.min_doc_len):
        raise ValueError(f'mode=cond_prefix needs cond_data (a .jsonl file with a "text" field or an HF dataset name, '
                         f'got {c.cond_data!r}) and 0 < prefix_len < cond_len <= min_doc_len (every reference is '
                         f'cond_len tokens of a document; got {c.prefix_len}, {c.cond_len}, {c.min_doc_len})')
    rank, world = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    dev = c.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    check_device(dev)
    if world > 1:
        import torch.distributed as dist
        if dev == 'cuda':
            dev = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
            torch.cuda.set_device(dev)
        dist.init_process_group('nccl' if dev.startswith('cuda') else 'gloo')
    lm = load_model(c.init_from, c.revision, device=dev)
    tok = lm.tokenizer if lm.meta.get('tokenizer') else None  # checked now, not after sampling: a mismatch says so first
    if tok is None and (c.mode == 'cond_prefix' or c.prompt or c.prompt_file):
        raise ValueError(f'{lm.name}: the checkpoint names no tokenizer (meta.tokenizer): text prompts need one')
    block, causal = lm.backbone.config.block_size, lm.backbone.config.causal
    c.seq_len = c.seq_len or block
    c.num_steps = c.num_steps or lm.meta.get('num_sampling_steps') or 32
    config.update(seq_len=c.seq_len, num_steps=c.num_steps)
    if causal:  # the AR baseline samples autoregressively (sample_ar): no steps, no diffusion sampler
        config.update(num_steps=None, sampler='ar')
    L = c.cond_len if c.mode == 'cond_prefix' else c.seq_len
    if L > block:
        raise ValueError(f'{"cond_len" if c.mode == "cond_prefix" else "seq_len"}={L} exceeds the model block size {block}')
    if L == 1 and c.add_bos:
        raise ValueError('seq_len=1 leaves no position to sample after BOS: use seq_len >= 2 (or add_bos=False)')
    if not causal and c.num_steps > L and rank == 0:  # (allowed: gen-PPL against steps goes past L)
        print(f'warning: num_steps={c.num_steps} > {L} positions: most steps reveal nothing, and each still runs the '
              'model on the whole batch (--sampler=cached runs only the sequences a step changes)')

    n, prompts, extra, tag = c.n_samples, None, {}, ''
    if c.mode == 'cond_prefix':
        prefix, refs, idx = load_prefixes(c.cond_data, tok, c.n_prompts, c.prefix_len, c.cond_len,
                                          c.min_doc_len, c.cond_split, c.prefix_bos)
        n = c.n_prompts * c.n_continuations
        if rank == 0:
            print(f'cond_prefix: {c.n_prompts} prompts x {c.n_continuations} continuations = {n} samples of {L} tokens '
                  '(n_samples and seq_len are for uncond mode)')
        prompts = prefix.repeat_interleave(c.n_continuations, dim=0)  # prompt-major: rows j*K .. j*K+K-1
        extra = dict(prompt_ids=prefix, ref_tokens=refs, doc_idx=idx,
                     prompt_index=np.repeat(np.arange(c.n_prompts), c.n_continuations))
        source = json.dumps([c.cond_data, c.cond_split, c.min_doc_len, c.prefix_bos])  # which prompts: in the name
        tag = f'_p{c.prefix_len}x{c.n_continuations}_' + hashlib.sha1(source.encode()).hexdigest()[:6]
    elif c.prompt or c.prompt_file:
        if c.prompt:
            text = c.prompt
        else:
            with open(c.prompt_file) as f:
                text = f.read()
        ids = [tok.bos_token_id] + tok.encode(text)
        if len(ids) >= L:
            raise ValueError(f'the prompt has {len(ids)} tokens (with BOS), seq_len={L} leaves no room to generate')
        prompts, extra = torch.tensor([ids]).expand(n, -1), dict(prompt_ids=np.array([ids]))
        tag = '_prompt' + hashlib.sha1(text.encode()).hexdigest()[:8]
    kind = 'uncond' if c.mode == 'uncond' and prompts is None else 'cond'
    tag += '_nobos' if kind == 'uncond' and not c.add_bos else ''
    tag += '_drawlast' if c.final_step == 'draw' and not causal else ''
    name = re.sub(r'[^A-Za-z0-9._@-]+', '-', lm.name).strip('-') + \
        (f"_r{lm.meta['round']}" if lm.meta.get('round') is not None else '')
    how = 'ar' if causal else f'{c.sampler}_T{c.num_steps}'
    path = os.path.join(c.out_dir, 'samples', kind, f'{name}_{how}_L{L}_n{n}_s{c.seed}{tag}')
    lock = (os.path.dirname(path), f'.{os.path.basename(path)}.lock')  # one writer per sample file (rank 0 writes)
    if rank == 0:
        run_lock(*lock)
    if os.path.exists(path + '.npz') and not c.overwrite:
        raise FileExistsError(f'{path}.npz exists; pass --overwrite=True to replace it')
    if c.compile:
        lm.backbone.compile()

    # each process draws batches rank, rank + world, ...; batch i = rows [i*bs, (i+1)*bs) with seed batch_seed(seed, i)
    t0, mine, nfe, t_first = time.time(), [], 0.0, None
    n_batches = math.ceil(n / c.batch_size)
    for i in range(rank, n_batches, world):
        rows = slice(i * c.batch_size, min(n, (i + 1) * c.batch_size))
        b = rows.stop - rows.start
        proj = None if prompts is None else clamp_prefix(prompts[rows].to(lm.device))
        tb = time.time()
        x, f = lm.sample(b, c.num_steps, L, verbose=c.verbose, project_fn=proj, cache=c.sampler == 'cached',
                         seed=batch_seed(c.seed, i), sampler='ancestral' if c.sampler == 'cached' else c.sampler,
                         add_bos=c.add_bos, return_nfe=True, final_step=c.final_step)
        mine.append((i, x.cpu().numpy()))  # the .cpu() waits for the batch: the timing below is real
        nfe += f * b
        tb = time.time() - tb
        t_first = t_first or tb  # (one-off start-up in it: kernels, allocator, compilation)
        if c.verbose and rank == 0:
            print(f'batch {i + 1}/{n_batches}: {tb:.2f}s, {b * L / tb:,.0f} tokens/s, nfe {f:.1f}')
    parts = [(mine, nfe)]
    if world > 1:
        parts = [None] * world if rank == 0 else None
        dist.gather_object((mine, nfe), parts, dst=0)
    dt = time.time() - t0
    if rank == 0:
        batches = sorted((batch for p in parts for batch in p[0]), key=lambda batch: batch[0])
        tokens = np.concatenate([x for _, x in batches])
        nfe = sum(p[1] for p in parts) / n
        stats = dict(n_samples=n, seq_len=L, nfe=nfe, seconds=round(dt, 3), tokens_per_s=round(n * L / dt, 1),
                     seconds_per_batch=round(dt * world / n_batches, 3), seconds_first_batch=round(t_first or 0, 3),
                     world_size=world, device=str(lm.device))
        settings = {**config, **stats, 'model': lm.name, 'meta': lm.meta}
        texts = tok.batch_decode(tokens) if tok else [' '.join(map(str, r)) for r in tokens]
        save_samples(path, tokens, settings, texts, **extra)
        for i, t in enumerate(texts[:c.n_print]):
            print(f'---------- sample {i}\n{t}')
        print(f'{n} samples x {L} tokens in {dt:.2f}s ({n * L / dt:,.0f} tokens/s; the first batch, with the one-off '
              f'start-up, took {t_first or 0:.2f}s), NFE {nfe:.1f} per sequence '
              f'({"autoregressive, KV cache" if causal else f"{c.num_steps} steps, {c.sampler}"}) -> {path}.npz')
        print(json.dumps(stats))
        release_lock(*lock)
    if world > 1:
        dist.barrier()  # rank 0 is still writing the files: gloo aborts ("terminate called ...") if a peer leaves early
        dist.destroy_process_group()
    return path


if __name__ == '__main__':
    import sys
    try:
        main()
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError, FloatingPointError, WriteFailed) as e:
        sys.exit(f'sample.py: error: {e}')
