"""Sample from a masked diffusion LM (MDLM, SDTT student or teacher) or the causal AR baseline (KV cache) into
out_dir/samples/{uncond,cond}/<settings>.npz and .jsonl; also the SDTT release's Python API (sdtt.py re-exports it).

    python sample.py --init_from=jdeschena/sdtt --revision=baselines_kld_step_70000 --num_steps=32 --n_samples=8
    python sample.py --init_from=out/kld_small --prompt="Today is a great day." --n_samples=4 --seq_len=128
    python sample.py --init_from=out/kld_small --mode=cond_prefix --cond_data=corpus/val.jsonl.gz
    torchrun --standalone --nproc_per_node=8 sample.py --init_from=out/kld_small --n_samples=1024 --batch_size=16
    python sample.py --init_from=out/ar_small --n_samples=1024   # a causal checkpoint: AR sampling, KV cache
"""
import hashlib
import json
import math
import os
import re
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import diffusion
from configurator import check_choice, check_sizes, config_keys, configure
from fileio import WriteFailed, local_or_dataset, read_jsonl, release_lock, run_lock
from model import check_device, load_pretrained, write_atomic
from prepare_data import get_tokenizer

# -------------------------------------------------------------------- settings (config file or --key=value)
init_from = 'kuleshov-group/mdlm-owt'  # a checkpoint file, a directory (ours, MDLM or SDTT layout) or a hub id
revision = ''             # hub revision, e.g. baselines_kld_step_70000 for jdeschena/sdtt
num_steps = None          # None: the checkpoint's meta num_sampling_steps (a student's or teacher's), else 32
n_samples = 8             # uncond mode: number of samples
batch_size = 8            # samples per forward batch (per process)
seq_len = None            # None: the model's block size (1024 for the published models)
sampler = 'ancestral'     # 'ancestral' | 'cached' (ancestral, runs only the sequences a step changes) | 'analytic'
                          # | 'ancestral_fp32' (the reference's float32 draws: flatters gen-PPL; for comparisons only)
final_step = 'argmax'     # still masked after the last step: 'argmax' (MDLM/SDTT) | 'draw' (DUO: a float64 draw)
seed = 1
prompt = ''               # uncond mode: every sample starts with BOS + this text
add_bos = True            # uncond mode: BOS at position 0, as training rows (False: all-MASK prior, as MDLM/SDTT/DUO)
mode = 'uncond'           # 'uncond' | 'cond_prefix' (SPEC §6 MAUVE protocol)
cond_data = ''            # cond_prefix: a .jsonl(.gz) file (field "text") or a Hugging Face dataset name
cond_split = 'test'       # split of the HF dataset
n_prompts = 8             # cond_prefix: number of documents (SPEC §6: 1024)
min_doc_len = 1024        # cond_prefix: only documents with at least this many tokens
prefix_bos = False        # cond_prefix: True frames documents as [BOS] + tokens (as training rows); False: SPEC §6
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
RELEASE_CHOICES = dict(loss=('kld', 'mse', 'tvd'), size=('sm', 'md', 'large'), round=tuple(range(1, 8)))
# name -> diffusion.sample's step_fn (None: ancestral) from a seeded generator; the script adds 'cached' (ancestral)
SAMPLERS = {'ancestral': lambda generator: None, 'analytic': lambda generator: analytic_step,
            'ancestral_fp32': lambda generator: reference_step(generator)}


# -------------------------------------------------------------------- the release API
class DiffusionLM(torch.nn.Module):
    """A DiT with its tokenizer, special ids (meta) and name; as `backbone`, state_dict() has the published keys."""
    def __init__(self, backbone, name='model'):
        super().__init__()
        self.backbone, self.name = backbone, name

    @property
    def meta(self):  # the backbone's, never a copy that could fall behind it
        return self.backbone.meta

    @property
    def device(self):
        return next(self.parameters()).device

    @property
    def tokenizer(self):
        name, vocab = self.meta.get('tokenizer'), self.backbone.config.vocab_size
        if name is None:
            raise ValueError(f'{self.name}: the checkpoint names no tokenizer (meta.tokenizer): text needs one')
        tok = get_tokenizer(name)
        if tok.vocab_size != vocab:
            raise ValueError(f'{self.name}: tokenizer {name} has {tok.vocab_size} ids, the model {vocab}')
        return tok

    def forward(self, idx, sigma=None):
        return self.backbone(idx, sigma)

    @torch.no_grad()
    def sample(self, n_samples, num_steps, seq_len=1024, verbose=False, project_fn=None, cache=False, seed=None,
               sampler='ancestral', add_bos=None, return_nfe=False, final_step='argmax'):
        """Token ids [n_samples, seq_len] (return_nfe: and forwards per sequence); project_fn(x) runs on the prior and
        after each step. add_bos None: the release's all-MASK prior (SPEC §4), BOS for a causal backbone (AR)."""
        check_choice('sampler', sampler, tuple(SAMPLERS))
        causal = self.backbone.config.causal
        add_bos = causal if add_bos is None else add_bos  # (BOS and MASK ids: the backbone's meta, as the samplers')
        if causal:
            out = sample_ar(self.backbone, n_samples, seq_len, add_bos=add_bos, project_fn=project_fn, seed=seed,
                            verbose=verbose)
        else:
            seed = diffusion.fresh_seed() if seed is None else seed
            step_fn = SAMPLERS[sampler](torch.Generator(self.device).manual_seed(seed))
            out = diffusion.sample(self.backbone, n_samples, num_steps, seq_len, add_bos=add_bos, project_fn=project_fn,
                                   cache=cache, seed=seed, verbose=verbose, step_fn=step_fn, final_step=final_step)
        return out if return_nfe else out[0]


def load_model(name_or_path, revision=None, device='cpu'):
    """Any checkpoint load_pretrained reads (a project ckpt.pt or out_dir, a saved or published directory, a hub id)."""
    backbone = load_pretrained(name_or_path, revision=revision or None, device=device)
    if not os.path.exists(name_or_path):
        return DiffusionLM(backbone, name_or_path + (f'@{revision}' if revision else ''))
    path = os.path.abspath(name_or_path)  # 'run/round_1_steps_32' (a ckpt.pt: its out_dir): the parent tells runs apart
    path = os.path.dirname(path) if os.path.isfile(path) else path
    return DiffusionLM(backbone, os.path.join(os.path.basename(os.path.dirname(path)), os.path.basename(path)))


def _load_release(revision, path, device, repo=HUB_SDTT, **choices):  # (path: a local copy of the model)
    for name, value in choices.items():
        check_choice(name, value, RELEASE_CHOICES[name])
    lm = load_model(path or repo, None if path else revision, device)
    lm.meta.setdefault('round', choices.get('round', 0))
    lm.meta.setdefault('source', path or lm.name)
    return lm


def load_mdlm_small(path=None, device='cpu', revision='teacher_1M_sm'):
    """MDLM small (1M steps): jdeschena/sdtt@teacher_1M_sm, or with revision=None the same model from mdlm-owt."""
    return _load_release(revision, path, device, HUB_SDTT if revision else HUB_MDLM)


def load_small_student(loss='kld', round=7, path=None, device='cpu'):
    """The students distilled from MDLM small with divergence `loss` (kld/mse/tvd), after `round` (1..7) rounds."""
    return _load_release(f'baselines_{loss}_step_{10000 * round}', path, device, loss=loss, round=round)


def load_scaling_student(size='sm', round=7, path=None, device='cpu'):
    """The students of the scaling experiments (teachers trained 400k steps), size sm/md/large, round 1..7."""
    return _load_release(f'scaling_400k_{size}_step_{10000 * round}', path, device, size=size, round=round)


def load_scaling_teacher(size='sm', path=None, device='cpu'):
    """The teachers of the scaling experiments (400k steps, not distilled), size sm/md/large."""
    return _load_release(f'teacher_400k_{size}_step_400000', path, device, size=size)


# -------------------------------------------------------------------- the analytic (SEDD) and reference samplers
def analytic_probs(logits, x, t, s, mask_id, schedule='loglinear'):
    """float64 p(x_s | x_t) [N, V] by SEDD's Tweedie tau-leaping step (MDLM's `_analytic_update`): the concrete score,
    staggered by exp(dsigma), times exp(-dsigma Q)^T at x. With SUBS it equals the ancestral step (tested)."""
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


def fill_masked(x, logits, mask_id, draw):
    """x with draw(batch indices, positions) at its masked positions, CHUNK_ELEMS / V positions at a time (memory)."""
    x_new, (b, l) = x.clone(), (x == mask_id).nonzero(as_tuple=True)
    rows = max(1, diffusion.CHUNK_ELEMS // logits.shape[-1])
    for i in range(0, len(b), rows):
        x_new[b[i:i + rows], l[i:i + rows]] = draw(b[i:i + rows], l[i:i + rows])
    return x_new


def analytic_step(x, logits, t, s, u, mask_id, schedule='loglinear'):
    """step_fn: x_s from analytic_probs by inverse CDF at the masked positions (at the others it is x's one-hot)."""
    return fill_masked(x, logits, mask_id, lambda bi, li: diffusion.draw_categorical(
        analytic_probs(logits[bi, li], x[bi, li], t, s, mask_id, schedule).log(), u[bi, li]))


def reference_step(generator):
    """A step_fn drawing as the MDLM/SDTT reference (SPEC §4): argmax of weight / E, E = 1e-10 - log(U + 1e-10) with
    float32 U < 1 - 2^-24: a token under ~6e-8 of MASK's weight is never drawn (rare tokens starve). To compare only."""
    def step(x, logits, t, s, u, mask_id, schedule='loglinear'):
        m_t, m_s = diffusion.move_chance(torch.tensor([t, s], dtype=torch.float64), schedule).tolist()

        def draw(bi, li):
            w = torch.softmax(logits[bi, li, :mask_id].float(), dim=-1) * (m_t - m_s)
            w = torch.cat([w, torch.full_like(w[:, :1], m_s)], dim=-1)  # MASK's weight at index mask_id
            return (w / (1e-10 - (torch.rand(w.shape, generator=generator, device=w.device) + 1e-10).log())).argmax(-1)
        return fill_masked(x, logits, mask_id, draw)
    return step


# -------------------------------------------------------------------- the autoregressive baseline
@diffusion.in_eval_mode
@torch.no_grad()
def sample_ar(model, n_samples, seq_len, bos_id=None, add_bos=True, project_fn=None, seed=None, device=None,
              verbose=False):
    """The AR baseline's ancestral sampling with a KV cache, at temperature 1 by float64 inverse CDF -> (tokens, nfe).
    Position 0 holds BOS (add_bos); the positions project_fn sets in the all-MASK prior are forced (a prompt)."""
    if not model.config.causal:
        raise ValueError('sample_ar needs a causal model (the AR baseline); diffusion models use diffusion.sample')
    device = torch.device(device or next(model.parameters()).device)
    generator = torch.Generator(device=device).manual_seed(seed if seed is not None else diffusion.fresh_seed())
    cuda = device.type == 'cuda'
    mask_id = model.config.vocab_size - 1
    x = diffusion.prior(model, n_samples, seq_len, mask_id, bos_id, add_bos, project_fn, device)
    forced = x != mask_id
    if not forced[:, 0].all():
        raise ValueError('autoregressive sampling needs a first token: BOS (add_bos with a bos_id) or a prompt')
    P = int(forced.all(0).long().cumprod(0).sum())  # length of the prefix forced in every row
    u = torch.rand(x.shape, dtype=torch.float64, device=device, generator=generator)
    cache = model.new_kv_cache(n_samples, dtype=torch.bfloat16 if cuda else next(model.parameters()).dtype)
    start, new = 0, x[:, :P]
    finite = torch.ones((), dtype=torch.bool, device=device)  # (checked once, at the end: no sync per token)
    for t in tqdm(range(P, seq_len), f'sampling {n_samples}x{seq_len} autoregressively', disable=not verbose):
        with torch.autocast('cuda', dtype=torch.bfloat16, enabled=cuda):  # feed positions start .. t - 1, draw t
            logits = model(new, cache=cache, start=start)[:, -1, :mask_id]
        x[:, t] = torch.where(forced[:, t], x[:, t], diffusion.draw_categorical(logits, u[:, t], finite=finite))
        start, new = t, x[:, t:t + 1]
    diffusion.check_finite(finite)
    return x, seq_len - P  # one forward per drawn position


# -------------------------------------------------------------------- prompts, seeds, sample files
def read_texts(source, what, split='test'):
    """(index, text) of a .jsonl(.gz)'s lines (field "text") or an HF dataset split's rows; what: the setting's name."""
    if local_or_dataset(source, what):
        return ((n - 1, r['text']) for n, r in read_jsonl(source, {'text': str}, strict=True,
                                                         what='a JSON object with a string field "text"'))
    try:
        import datasets
        return enumerate(ex['text'] for ex in datasets.load_dataset(source, split=split))
    except Exception as e:
        raise RuntimeError(f'{what} {source!r} is not a local .jsonl file and could not be loaded as a Hugging Face '
                           f'dataset ({type(e).__name__}: {e}); offline, pass a .jsonl file') from e


def load_prefixes(source, tok, n_prompts, prefix_len, cond_len, min_doc_len, split='test', bos=True):
    """SPEC §6: the first n_prompts documents of `source` with at least min_doc_len tokens, framed as [BOS] + tokens
    (bos=True) or as they are. -> (prompts [n, prefix_len], references [n, cond_len], document indices)."""
    refs, idx = [], []
    for i, text in read_texts(source, 'cond_data', split):
        ids = tok.encode(text)
        if len(ids) >= min_doc_len:
            refs.append(([tok.bos_token_id] * bos + ids)[:cond_len])
            idx.append(i)
            if len(refs) == n_prompts:
                break
    if len(refs) < n_prompts:
        raise ValueError(f'{source}: only {len(refs)} documents have >= {min_doc_len} tokens, but '
                         f'n_prompts={n_prompts}; lower n_prompts or min_doc_len')
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
    """path.npz: tokens [n, L] int32, settings (JSON) and the extra arrays; path.jsonl: {"i", "text"} per sample. The
    old .npz goes only once the new one is complete: a crash never pairs an .npz with another run's .jsonl."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
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
    return {**out, 'tokens': out['tokens'].astype(np.int64), 'settings': json.loads(str(out['settings']))}


# -------------------------------------------------------------------- CLI
def init_dist(dev):
    """check_device; under torchrun also this rank's CUDA device and the process group -> (rank, world, device)."""
    check_device(dev)
    world = int(os.environ.get('WORLD_SIZE', 1))
    if world > 1:
        if dev.startswith('cuda'):
            dev = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
            torch.cuda.set_device(dev)
        dist.init_process_group('nccl' if dev.startswith('cuda') else 'gloo')
    return int(os.environ.get('RANK', 0)), world, dev


def end_dist():
    if dist.is_initialized():
        dist.barrier()  # rank 0 may still be writing files: gloo aborts ("terminate called ...") if a peer leaves early
        dist.destroy_process_group()


def check_settings(c):  # the checks that need no model
    check_choice('sampler', c.sampler, ('cached', *SAMPLERS))
    check_choice('mode', c.mode, ('uncond', 'cond_prefix'))
    check_choice('final_step', c.final_step, ('argmax', 'draw'))
    check_sizes(vars(c), batch_size=1, n_samples=1, n_prompts=1, n_continuations=1,
                **{k: 1 for k in ('num_steps', 'seq_len') if getattr(c, k) is not None})
    if c.mode == 'cond_prefix' and (not c.cond_data or not 0 < c.prefix_len < c.cond_len <= c.min_doc_len):
        raise ValueError(f'mode=cond_prefix needs cond_data (a .jsonl file or HF dataset; got {c.cond_data!r}) and 0 < '
                         f'prefix_len < cond_len <= min_doc_len (got {c.prefix_len}, {c.cond_len}, {c.min_doc_len})')


def prompts_of(c, tok, L, rank):
    """-> (n samples, prompt ids [n, P] or None, the extra arrays of the sample file, the file name's tag)."""
    if c.mode == 'cond_prefix':
        prefix, refs, idx = load_prefixes(c.cond_data, tok, c.n_prompts, c.prefix_len, c.cond_len,
                                          c.min_doc_len, c.cond_split, c.prefix_bos)
        n = c.n_prompts * c.n_continuations
        if rank == 0:  # (n_samples and seq_len are for uncond mode)
            print(f'cond_prefix: {c.n_prompts} prompts x {c.n_continuations} continuations = {n} samples of {L} tokens')
        extra = dict(prompt_ids=prefix, ref_tokens=refs, doc_idx=idx,
                     prompt_index=np.repeat(np.arange(c.n_prompts), c.n_continuations))
        source = json.dumps([c.cond_data, c.cond_split, c.min_doc_len, c.prefix_bos])  # which prompts: in the name
        tag = f'_p{c.prefix_len}x{c.n_continuations}_' + hashlib.sha1(source.encode()).hexdigest()[:6]
        return n, prefix.repeat_interleave(c.n_continuations, dim=0), extra, tag  # prompt-major: rows j*K .. j*K+K-1
    if not c.prompt:
        return c.n_samples, None, {}, '_nobos' if not c.add_bos else ''
    ids = [tok.bos_token_id] + tok.encode(c.prompt)
    if len(ids) >= L:
        raise ValueError(f'the prompt has {len(ids)} tokens (with BOS), seq_len={L} leaves no room to generate')
    tag = '_prompt' + hashlib.sha1(c.prompt.encode()).hexdigest()[:8]
    return c.n_samples, torch.tensor([ids]).expand(c.n_samples, -1), dict(prompt_ids=np.array([ids])), tag


def draw(lm, c, n, L, prompts, rank, world):
    """Batches rank, rank + world, ... (batch i: seed batch_seed(seed, i)) -> on rank 0 (tokens, mean NFE, t_first)."""
    mine, t_first, n_batches = [], None, math.ceil(n / c.batch_size)
    for i in range(rank, n_batches, world):
        rows = slice(i * c.batch_size, min(n, (i + 1) * c.batch_size))
        proj = None if prompts is None else clamp_prefix(prompts[rows].to(lm.device))
        tb = time.time()
        x, f = lm.sample(rows.stop - rows.start, c.num_steps, L, verbose=c.verbose, project_fn=proj,
                         cache=c.sampler == 'cached', seed=batch_seed(c.seed, i), add_bos=c.add_bos, return_nfe=True,
                         sampler='ancestral' if c.sampler == 'cached' else c.sampler, final_step=c.final_step)
        mine.append((i, x.cpu().numpy(), f * len(x)))  # the .cpu() waits for the batch: the timing below is real
        tb = time.time() - tb
        t_first = t_first or tb  # (one-off start-up in it: kernels, allocator, compilation)
        if c.verbose and rank == 0:
            print(f'batch {i + 1}/{n_batches}: {tb:.2f}s, {len(x) * L / tb:,.0f} tokens/s, nfe {f:.1f}')
    parts = [mine]
    if world > 1:
        parts = [None] * world if rank == 0 else None
        dist.gather_object(mine, parts, dst=0)
    if rank == 0:
        batches = sorted((batch for p in parts for batch in p), key=lambda batch: batch[0])
        return np.concatenate([x for _, x, _ in batches]), sum(f for _, _, f in batches) / n, t_first or 0


def main(argv=None):
    c = SimpleNamespace(**configure({k: globals()[k] for k in _CONFIG_KEYS}, argv))
    config = dict(vars(c))
    check_settings(c)
    rank, world, dev = init_dist(c.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    lm = load_model(c.init_from, c.revision, device=dev)
    # checked now, not after sampling; without a tokenizer the samples are written as token ids
    tok = lm.tokenizer if lm.meta.get('tokenizer') or c.mode == 'cond_prefix' or c.prompt else None
    block, causal = lm.backbone.config.block_size, lm.backbone.config.causal
    c.num_steps = c.num_steps or lm.meta.get('num_sampling_steps') or 32
    config.update(dict(num_steps=None, sampler='ar') if causal else dict(num_steps=c.num_steps))  # AR: no steps
    L = c.cond_len if c.mode == 'cond_prefix' else c.seq_len or block
    if L > block:
        raise ValueError(f'{"seq_len" if c.mode == "uncond" else "cond_len"}={L} exceeds the model block size {block}')
    if L == 1 and c.add_bos:
        raise ValueError('seq_len=1 leaves no position to sample after BOS: use seq_len >= 2 (or add_bos=False)')
    if not causal and c.num_steps > L and rank == 0:  # (allowed: gen-PPL against steps goes past L)
        print(f'warning: num_steps={c.num_steps} > {L} positions: most steps reveal nothing, and each still runs the '
              'model on the whole batch (--sampler=cached runs only the sequences a step changes)')
    n, prompts, extra, tag = prompts_of(c, tok, L, rank)
    tag += '_drawlast' if c.final_step == 'draw' and not causal else ''
    name = re.sub(r'[^A-Za-z0-9._@-]+', '-', lm.name).strip('-') + \
        (f"_r{lm.meta['round']}" if lm.meta.get('round') is not None else '')
    how = 'ar' if causal else f'{c.sampler}_T{c.num_steps}'
    path = os.path.join(c.out_dir, 'samples', 'uncond' if c.mode == 'uncond' and prompts is None else 'cond',
                        f'{name}_{how}_L{L}_n{n}_s{c.seed}{tag}')
    lock = (os.path.dirname(path), f'.{os.path.basename(path)}.lock')  # one writer per sample file (rank 0 writes)
    if rank == 0:
        run_lock(*lock)
    if os.path.exists(path + '.npz') and not c.overwrite:
        raise FileExistsError(f'{path}.npz exists; pass --overwrite=True to replace it')
    if c.compile:
        lm.backbone.compile()
    t0 = time.time()
    out = draw(lm, c, n, L, prompts, rank, world)
    dt = time.time() - t0
    if rank == 0:
        tokens, nfe, t_first = out
        stats = dict(n_samples=n, seq_len=L, nfe=nfe, seconds=round(dt, 3), tokens_per_s=round(n * L / dt, 1),
                     seconds_per_batch=round(dt * world / math.ceil(n / c.batch_size), 3),
                     seconds_first_batch=round(t_first, 3), world_size=world, device=str(lm.device))
        texts = tok.batch_decode(tokens) if tok else [' '.join(map(str, r)) for r in tokens]
        save_samples(path, tokens, {**config, **stats, 'model': lm.name, 'meta': lm.meta}, texts, **extra)
        for i, t in enumerate(texts[:c.n_print]):
            print(f'---------- sample {i}\n{t}')
        print(f'{"autoregressive, KV cache" if causal else f"{c.num_steps} steps, {c.sampler}"}: {n * L / dt:,.0f} '
              f'tokens/s -> {path}.npz {json.dumps(stats)}')
        release_lock(*lock)
    end_dist()
    return path


if __name__ == '__main__':
    import sys
    try:
        main()
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError, FloatingPointError, WriteFailed) as e:
        sys.exit(f'sample.py: error: {e}')
