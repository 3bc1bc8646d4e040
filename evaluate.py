"""Evaluation of masked diffusion LMs (SPEC §6): gen-PPL with unigram entropy, MAUVE, LAMBADA, validation NELBO, plots.

    python evaluate.py --eval=genppl --samples=out/samples/uncond --judge=gpt2-large --plot
    python evaluate.py --eval=genppl --genppl_protocol=duo ...   # DUO's protocol (its Table 7), see gen_ppl
    python evaluate.py --eval=mauve --samples=out/samples/cond   # sample.py --mode=cond_prefix files
    python evaluate.py --eval=lambada,valppl --init_from=out/ckpt.pt --lambada_path=lambada.jsonl --data_dir=data/owt
    python evaluate.py --eval=lambada_ppl --init_from=kuleshov-group/mdlm-owt   # MDLM's LAMBADA perplexity (47.52)
    python evaluate.py --eval= --plot                  # only redraw out_dir/genppl.png from out_dir/eval.jsonl
    python evaluate.py --eval= --train_log=out/kld_small  # a run's loss and tokens/s -> out/kld_small/train.png
    torchrun --nproc_per_node=8 evaluate.py ...      # the work is sharded across ranks and gathered
Every evaluation appends one JSON line to out_dir/eval.jsonl."""
import functools
import glob
import json
import math
import os
import subprocess
import time
import zipfile
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from configurator import check_choice, check_sizes, config_keys, configure
from diffusion import SAMPLE_EPS, move_chance, nelbo_weight, sample_t, schedule_of, sigma
from fileio import WriteFailed, read_jsonl, write_failed
from model import local_or_hub, write_atomic
from prepare_data import frame_rows, get_tokenizer, load_meta, open_split
from sample import end_dist, init_dist, load_model, load_samples, read_texts

# ----------------------------------------------------------------------------------------------------- config
eval = 'genppl'         # comma list of genppl, mauve, lambada, lambada_ppl, valppl ('' with --plot: only the figure)
samples = ''            # genppl/mauve: a sample .npz of sample.py, a glob, or a directory (searched recursively)
judge = 'gpt2-large'    # genppl/mauve: HF causal LM id or local dir, or a project AR checkpoint (ckpt.pt / its dir)
judge_dtype = 'float32' # the judge's dtype (SDTT: fp32)
genppl_protocol = 'sdtt'  # genppl: 'sdtt' (per-sample mean NLL, ids as sampled) | 'duo' (DUO Table 7, see gen_ppl)
init_from = ''          # lambada/lambada_ppl/valppl: the model (a DiT checkpoint, directory or hub id; or a causal LM)
revision = ''           # hub revision of init_from (jdeschena/sdtt keeps one model per revision)
dtype = 'bfloat16'      # autocast dtype of init_from on CUDA ('float32': no autocast)
lambada_path = 'EleutherAI/lambada_openai'  # a jsonl with one {"text": ...} per line, or the HF dataset (test split)
n_t = 32                # lambada: t draws per passage for the NELBO perplexity
data_dir = ''           # valppl: a prepare_data.py directory with val.bin and meta.json
val_rows = 0            # valppl: evaluate the first val_rows rows (0: all)
val_draws = 4           # valppl/lambada_ppl: stratified t draws per row
mauve_seeds = 5         # mauve: k-means seeds 1..mauve_seeds (SDTT), mean and std reported
batch_size = 8          # sequences per forward (lambada/valppl: passages/rows x t draws)
seed = 0
out_dir = 'out'
plot = False            # draw out_dir/genppl.png from out_dir/eval.jsonl
train_log = ''          # comma list of distill.py runs (out_dir or log.jsonl): draw <run>/train.png (loss etc.)
device = 'cuda' if torch.cuda.is_available() else 'cpu'
compile = False
_CONFIG_KEYS = config_keys(globals())  # exactly the settings above
EVALS = ('genppl', 'mauve', 'lambada', 'lambada_ppl', 'valppl')


def _is_dit(name):
    """A project/MDLM/SDTT DiT (loaded by model.load_pretrained) rather than a transformers causal LM."""
    if not os.path.exists(name):
        return any(k in name.lower() for k in ('mdlm', 'sdtt'))  # a hub id: kuleshov-group/mdlm-owt, jdeschena/sdtt
    cfg_path = os.path.join(name, 'config.json')
    if os.path.isfile(name) or os.path.exists(os.path.join(name, 'ckpt.pt')) or not os.path.exists(cfg_path):
        return True  # a ckpt.pt, an out_dir, or a directory whose lack load_pretrained explains
    with open(cfg_path) as f:
        cfg = json.load(f)
    return cfg.get('model_type') == 'mdlm' or 'hidden_dim' in cfg or isinstance(cfg.get('model'), dict)


class LM:
    """A project DiT (kind 'diffusion'; 'causal': the AR baseline) or a transformers causal LM, to score text with."""

    def __init__(self, name, device='cpu', dtype='float32', revision='', compile=False):
        if not name:
            raise ValueError('no model given: set --judge (genppl/mauve) or --init_from (lambada/valppl)')
        name = local_or_hub(name) or name  # a missing local path fails here, not as a hub download
        self.name, self.device, amp = name, torch.device(device), getattr(torch, dtype)
        if _is_dit(name):
            dit = load_model(name, revision, device)
            self.model, self.tok, m, cfg = dit.backbone, dit.tokenizer, dit.meta, dit.backbone.config
            self.kind = 'causal' if cfg.causal else 'diffusion'
            self.tok_name, self.n_ctx, self.schedule = m['tokenizer'], cfg.block_size, schedule_of(m)
            self.bos, self.eos, self.mask, self.n_real = m['bos_id'], m['eos_id'], m['mask_id'], m['mask_id']
        else:
            try:
                from transformers import AutoModelForCausalLM
                model = AutoModelForCausalLM.from_pretrained(name, dtype=amp, trust_remote_code=False)
            except Exception as e:
                raise RuntimeError(f"could not load the causal LM {name!r} with transformers ({type(e).__name__}: "
                                   f"{(str(e).splitlines() or [''])[0]}); offline, pass a local directory") from e
            self.model, cfg = model.to(device).eval(), model.config
            self.kind, self.mask, self.n_real = 'causal', None, cfg.vocab_size
            self.n_ctx = getattr(cfg, 'n_positions', None) or getattr(cfg, 'max_position_embeddings', None) or 10**9
            if cfg.model_type == 'gpt2' and cfg.vocab_size == 50257:  # GPT-2's own ids: our offline tokenizer
                self.tok, self.tok_name = get_tokenizer('gpt2'), 'gpt2'
            else:  # encode() as the project tokenizer's: no BOS/EOS added
                from transformers import AutoTokenizer
                self.tok, self.tok_name = AutoTokenizer.from_pretrained(name, trust_remote_code=False), name
                self.tok.encode = functools.partial(self.tok.encode, add_special_tokens=False)
            self.eos = self.tok.eos_token_id
            self.bos = self.eos if self.tok.bos_token_id is None else self.tok.bos_token_id
        autocast = self.mask is not None and self.device.type == 'cuda' and amp != torch.float32  # a DiT on CUDA
        self.autocast = torch.autocast('cuda', dtype=amp) if autocast else nullcontext()
        self.fwd = torch.compile(self.model, dynamic=True) if compile else self.model

    @torch.no_grad()
    def logits(self, ids, t=None, attn=None, hidden=False, positions=None):
        """ids [B, L] -> (fp32 logits [B, L, n_real] (a DiT: [M, n_real] at flat positions), hidden state or None)."""
        h = {}
        with self.autocast:
            if self.mask is None:
                out = self.fwd(input_ids=ids, attention_mask=attn, output_hidden_states=hidden)
                lg, h['h'] = out.logits, out.hidden_states[-1] if hidden else None
            else:  # hidden: after the final LayerNorm, as GPT-2's; a hook is not in a compiled graph, so eager
                norm = self.model.output_layer.norm_final
                with norm.register_forward_hook(lambda m, i, o: h.update(h=o)) if hidden else nullcontext():
                    lg = (self.model if hidden else self.fwd)(ids, None if t is None else sigma(t, self.schedule),
                                                              positions)[..., :self.mask]
        return lg.float(), (h['h'].float() if hidden else None)


def _pad(seqs, device):
    """Right-pad 1-D id tensors with 0: causal models never see the padding from real positions."""
    pad = lambda xs: torch.nn.utils.rnn.pad_sequence(xs, batch_first=True).to(device)
    return pad(seqs), pad([torch.ones(len(s), dtype=torch.long) for s in seqs])  # (ids, attention mask)


def _rank_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _sharded(items, bs, desc, tokens_of, fn):
    """fn(batch) -> a result per item (on the device: no sync per batch), over this rank's share -> all, in order."""
    rank, world = _rank_world()
    idx, parts = list(items)[rank::world], []
    with tqdm(total=sum(map(tokens_of, idx)), desc=desc, unit='tok', unit_scale=True, disable=rank != 0) as bar:
        for b in range(0, len(idx), bs):
            parts.append(fn(idx[b: b + bs]))
            bar.update(sum(map(tokens_of, idx[b: b + bs])))
    vals = torch.cat(parts).double().cpu().numpy() if parts else np.empty(0)
    if not dist.is_initialized():
        return vals
    shares = [None] * world
    dist.all_gather_object(shares, list(zip(idx, vals)))
    return np.array([v for _, v in sorted((p for share in shares for p in share), key=lambda p: p[0])])


def read_samples(path):
    """sample.load_samples plus the checks: a non-empty integer [n_samples, seq_len] array and a known tokenizer."""
    try:
        s = load_samples(path)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # (a truncated copy: BadZipFile)
        raise ValueError(f'{path} is not a sample file of sample.py ({type(e).__name__}: {e})') from e
    t = s['tokens']
    if t.ndim != 2 or t.size == 0:
        raise ValueError(f'{path}: expected a non-empty array "tokens" [n_samples, seq_len], got shape {t.shape}')
    if not s['settings'].get('meta', {}).get('tokenizer'):
        raise ValueError(f'{path}: its settings name no tokenizer (settings.meta.tokenizer) to check or decode the ids')
    return s


def sample_files(spec):
    """A file, a glob, or a directory (all .npz below it) -> sorted paths; nothing found is an error."""
    pattern = os.path.join(spec, '**', '*.npz') if os.path.isdir(spec) else spec
    paths = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
    paths = [p for p in paths if p.endswith('.npz')] or paths  # (a glob also catches the .jsonl beside each .npz)
    if not paths:
        raise FileNotFoundError(f'no sample files at --samples={spec!r} (a .npz of sample.py, a glob, or a directory)')
    return sorted(paths)


def _sample_ids(judge, tokens, tok_name):
    """-> (the tokenizer the samples' settings name, their ids as int64), checked against it; the judge is causal."""
    if judge.kind != 'causal':
        raise ValueError(f'the judge {judge.name} is a bidirectional diffusion model; use a causal LM or AR checkpoint')
    tok, tokens = get_tokenizer(tok_name), np.asarray(tokens, dtype=np.int64)
    bad = tokens[(tokens < 0) | (tokens >= tok.mask_token_id)]
    if len(bad):  # (GPT-2 ids labelled byte hold byte MASK ids too: the second message is the one that helps)
        what = 'MASK ids (unfinished samples)' if (bad == tok.mask_token_id).all() else \
            f'ids outside [0, {tok.mask_token_id}), so they were not written with it (another tokenizer?)'
        raise ValueError(f'samples contain {what} of the {tok_name!r} tokenizer their settings name: '
                         f'{sorted(set(bad.tolist()))[:5]}')
    return tok, tokens


def judge_inputs(judge, tokens, tok_name, n_prompt=0):
    """Sample ids -> (judge inputs, first[i] >= 1: the first position scored, after n_prompt forced ids)."""
    tok, tokens = _sample_ids(judge, tokens, tok_name)
    if tok_name == judge.tok_name:
        seqs, first = list(torch.from_numpy(tokens)), [max(1, n_prompt)] * len(tokens)
    else:  # another tokenizer: the text without BOS/EOS (SDTT's llama path), prompt and continuation apart
        text = lambda ids: tok.decode([i for i in ids if i not in (tok.bos_token_id, tok.eos_token_id)])
        rows = tokens.tolist()
        head = [judge.tok.encode(text(row[:n_prompt])) if n_prompt else [] for row in rows]
        seqs = [torch.tensor([judge.bos] + h + judge.tok.encode(text(row[n_prompt:]))) for h, row in zip(head, rows)]
        first = [1 + len(h) for h in head]
    short = sum(len(s) <= f for s, f in zip(seqs, first))
    if short:  # nothing to score: its mean NLL would be 0/0 and gen-PPL NaN
        raise ValueError(f'{short} of {len(seqs)} samples have no judge token to score after position 0 and '
                         f'{n_prompt} prompt ids: are they only BOS/EOS?')
    return seqs, first


def windows(seq, first, n_ctx, bos):
    """A judge input -> [(window, first scored position in it)]: a strided pass, each position from `first` scored
    once, after BOS and >= n_ctx - n_ctx // 2 - 1 tokens of context. (The reference truncates: the tail unscored.)"""
    if n_ctx < 2 and len(seq) > n_ctx:
        raise ValueError(f'a judge context of {n_ctx} token(s) cannot score a longer text')
    out, done = [], first
    while done < len(seq):  # (a sequence that fits: one window, itself)
        end = min(len(seq), max(done + n_ctx // 2, n_ctx))
        begin = max(0, end - n_ctx)  # then window position j >= 1 holds seq[begin + j]
        win = seq[:end] if begin == 0 else torch.cat([torch.as_tensor([bos], dtype=seq.dtype), seq[begin + 1:end]])
        out.append((win, done - begin))
        done = end
    return out


def unigram_entropy(tokens):
    """Entropy (nats) of the token ids within each sample: [N, L] -> [N] (sorted rows: counts of the runs of ids)."""
    s = np.sort(np.asarray(tokens), axis=1)
    N, L = s.shape
    start = np.concatenate([np.ones((N, 1), dtype=bool), s[:, 1:] != s[:, :-1]], 1)
    p = np.bincount(np.cumsum(start.ravel()) - 1) / L  # one count per run, runs in row order
    return -np.bincount(np.repeat(np.arange(N), start.sum(1)), weights=p * np.log(p), minlength=N)


def judge_pass(judge, seqs, batch_size=8, hidden=False, valid=None):
    """Per sequence: [NLL sum, count] at the positions 1..n-1 valid[i] marks, or (hidden) its final token's state."""
    longest = max(len(s) for s in seqs)
    if longest > judge.n_ctx:  # (gen_ppl cuts windows; MAUVE's features of a truncated text would be another's)
        raise ValueError(f'a judge input is {longest} tokens long, more than the context of {judge.name} '
                         f'({judge.n_ctx}); use a judge with a longer context or shorter texts')

    def batch(idx):
        ids, attn = _pad([seqs[i] for i in idx], judge.device)
        lg, h = judge.logits(ids, attn=attn, hidden=hidden)
        if hidden:
            return h[torch.arange(len(idx)), attn.sum(1) - 1]
        nll = F.cross_entropy(lg[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction='none').view(len(idx), -1)
        w = _pad([valid[i] for i in idx], judge.device)[0].double()  # [B, longest - 1], as nll (j + 1 predicted at j)
        return torch.stack([(nll.double() * w).sum(1), w.sum(1)], 1)
    return _sharded(range(len(seqs)), batch_size, f'judge {judge.name}', lambda i: len(seqs[i]), batch)


def duo_judge_inputs(judge, tokens, tok_name, group):
    """DUO's record_generative_perplexity: retokenized (BOS/EOS: the judge's EOS), cut to the sample length, EOS-padded
    per group (a sampling batch), in judge-context rows -> (rows, valid: 1.. but EOS after the first, owner)."""
    tok, tokens = _sample_ids(judge, tokens, tok_name)
    L, eos, seqs = tokens.shape[1], judge.eos, []
    for row in tokens:
        ids, start = [], 0
        for cut in [*np.flatnonzero(np.isin(row, (tok.bos_token_id, tok.eos_token_id))), L]:
            ids += judge.tok.encode(tok.decode(row[start:cut].tolist())) if cut > start else []
            ids += [eos] if cut < L else []
            start = cut + 1
        seqs.append(ids[:L])
    parts = []
    for g in range(0, len(seqs), group):
        longest = max(len(s) for s in seqs[g:g + group])
        for i, s in enumerate(seqs[g:g + group], g):
            for r in torch.tensor(s + [eos] * (longest - len(s)), dtype=torch.long).split(judge.n_ctx):
                parts.append((r, (((r == eos).cumsum(0) == 1) | (r != eos))[1:], i))
    rows, valid, owner = zip(*parts)
    return rows, valid, np.array(owner)


def gen_ppl(judge, tokens, tok_name, batch_size=8, n_prompt=0, protocol='sdtt'):
    """Gen-PPL and mean unigram entropy (SPEC §6). 'sdtt': exp(mean over samples of each one's mean NLL), positions
    after the n_prompt forced ids; 'duo' (DUO Table 7): exp(total NLL / scored tokens), lower on the same samples."""
    if protocol == 'duo':
        if n_prompt:
            raise ValueError("protocol='duo' scores unconditional samples only (DUO's protocol has no prompts)")
        rows, valid, owner = duo_judge_inputs(judge, tokens, tok_name, batch_size)
        per_row = judge_pass(judge, rows, batch_size, valid=valid)
        total, count = per_row[:, 0].sum(), per_row[:, 1].sum()
        sums, counts = (np.bincount(owner, weights=per_row[:, k], minlength=len(tokens)) for k in (0, 1))
        if count == 0:
            raise ValueError('no token to score under the DUO protocol (samples of EOS only?)')
        nll_mean, per_sample = total / count, [round(float(a / b), 6) if b else None for a, b in zip(sums, counts)]
        extra = dict(n_scored=int(count))
    else:
        seqs, first = judge_inputs(judge, tokens, tok_name, n_prompt)
        parts = [(i, *w) for i, (s, f) in enumerate(zip(seqs, first)) for w in windows(s, f, judge.n_ctx, judge.bos)]
        scored = [torch.arange(1, len(w)) >= f for _, w, f in parts]  # positions f.. of each window
        per_row = judge_pass(judge, [p[1] for p in parts], batch_size, valid=scored)
        owner, mean, count = np.array([p[0] for p in parts]), per_row[:, 0] / per_row[:, 1], per_row[:, 1]
        nll = np.bincount(owner, weights=mean * count) / np.bincount(owner, weights=count)  # each sample's mean
        nll_mean, per_sample = nll.mean(), [round(float(x), 6) for x in nll]  # (in order: paired comparisons)
        extra = dict(nll_std=nll.std(), n_windowed=int(sum(len(s) > judge.n_ctx for s in seqs)))
    ent = unigram_entropy(np.asarray(tokens)[:, n_prompt:])
    return dict(gen_ppl=math.exp(nll_mean), nll_mean=nll_mean, **extra, entropy=ent.mean(), entropy_std=ent.std(),
                n_samples=len(tokens), seq_len=tokens.shape[1], n_prompt=n_prompt, protocol=protocol,
                retokenized=protocol == 'duo' or tok_name != judge.tok_name, nll_per_sample=per_sample)


def closer(ref, a, b):
    """nll_per_sample of three files (teacher@N, teacher@n, student@n) -> (gain = |d_a| - |d_b|, gain / s.e.), d = log
    gen-PPL - ref's (> 0: b closer); s.e. paired (shared seeds) of sign(d_a) (a_i - ref_i) - sign(d_b) (b_i - ref_i)."""
    ref, a, b = (np.asarray(x, dtype=np.float64) for x in (ref, a, b))
    if not len(ref) == len(a) == len(b) > 1:
        raise ValueError(f'closer needs files of the same number of samples (> 1), got {len(ref)}, {len(a)}, {len(b)}')
    g = np.sign(a.mean() - ref.mean()) * (a - ref) - np.sign(b.mean() - ref.mean()) * (b - ref)
    gain, se = float(g.mean()), g.std(ddof=1) / math.sqrt(len(g))
    if se == 0:  # every g_i equal (e.g. identical files)
        return gain, math.copysign(math.inf, gain) if gain else 0.0
    return gain, float(gain / se)


def mauve_score(p_features, q_features, seeds=5, scaling=5.0):
    """MAUVE (mauve-text) of p = references, q = samples over k-means seeds 1..seeds, scaling 5, as SDTT."""
    try:
        import mauve
    except ImportError as e:
        raise ImportError('MAUVE needs the mauve-text package: pip install mauve-text') from e
    scores = [mauve.compute_mauve(p_features=np.asarray(p_features), q_features=np.asarray(q_features), seed=s,
                                  mauve_scaling_factor=scaling, device_id=-1, verbose=False).mauve
              for s in range(1, seeds + 1)]
    return dict(mauve=float(np.mean(scores)), mauve_std=float(np.std(scores)), mauve_per_seed=scores)


def read_lambada(path):
    """Passages from a local jsonl ({"text": ...} per line, the OpenAI file) or an HF dataset id (test split)."""
    texts = [t for _, t in read_texts(path, 'lambada_path')]
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or ' ' not in t.strip()]
    if not texts or bad:
        raise ValueError(f'{path}: {len(texts)} passages, {len(bad)} without a last word to predict (first: {bad[:3]})')
    return texts


def _draws(keys, n_t, L, seed, eps):
    """Per item: n_t stratified times and [n_t, L] uniforms seeded by (seed, item): the same for any batching."""
    g, ts, us = torch.Generator(), [], []
    for k in keys:
        g.manual_seed(seed * 1_000_003 + int(k))
        ts.append(sample_t(n_t, 'cpu', eps, g))
        us.append(torch.rand(n_t, L, generator=g))
    return torch.cat(ts), torch.cat(us)


def _nelbo(lm, x0, maskable, keys, n_t, seed, eps):
    """MDLM NELBO (nats) of each row of x0 [B, L] over n_t t draws, only `maskable` tokens masked."""
    B, L = x0.shape
    t, u = (v.to(x0.device) for v in _draws(keys, n_t, L, seed, eps))
    x0r = x0.repeat_interleave(n_t, 0)
    hit = maskable.repeat_interleave(n_t, 0) & (u < move_chance(t, lm.schedule)[:, None])
    keep = hit.any(1).nonzero().squeeze(1)  # rows with a mask: the others need no forward
    pairs = torch.cat([torch.where(hit, lm.mask, x0r)[keep], x0r[keep]], 1)  # (x_t, x0) of each row with a mask
    timed = getattr(lm.model.config, 'time_conditioning', False)  # untimed: one forward per distinct (x_t, x0)
    pairs, inv = (pairs, torch.arange(len(keep), device=x0.device)) if timed else \
        torch.unique(pairs, dim=0, return_inverse=True)
    pos = (pairs[:, :L] == lm.mask).flatten().nonzero().squeeze(1)  # the masked positions: the only ones with a loss
    lg, _ = lm.logits(pairs[:, :L], t[keep] if timed else None, positions=pos)
    nll = F.cross_entropy(lg, pairs[:, L:].flatten()[pos], reduction='none').double()
    per_pattern = torch.zeros(len(pairs), dtype=torch.float64, device=x0.device).index_add_(0, pos // L, nll)
    loss = torch.zeros(B * n_t, dtype=torch.float64, device=x0.device)
    loss[keep] = per_pattern[inv] * nelbo_weight(t[keep], lm.schedule).double()
    return loss.view(B, n_t).mean(1)


def lambada_inputs(lm, texts):
    """BOS + context cut on the left to fit + last word (+ EOS for a DiT) -> (id lists, word spans, number cut)."""
    seqs, spans, n_trunc, diffusion = [], [], 0, lm.kind == 'diffusion'
    for text in texts:
        ctx, word = text.rsplit(' ', 1)
        c, w = lm.tok.encode(ctx), lm.tok.encode(' ' + word)
        keep = lm.n_ctx - len(w) - 1 - diffusion  # room for BOS (+ EOS)
        if keep < 0:
            raise ValueError(f'a LAMBADA target of {len(w)} tokens does not fit the context of {lm.name} ({lm.n_ctx})')
        n_trunc += len(c) > keep
        c = c[max(0, len(c) - keep):]
        seqs.append([lm.bos] + c + w + ([lm.eos] if diffusion else []))
        spans.append((1 + len(c), 1 + len(c) + len(w)))
    return seqs, spans, n_trunc


def lambada(lm, texts, n_t=32, seed=0, batch_size=8):
    """SDTT's LAMBADA (SPEC §6): accuracy and exp(mean NLL per last word, with its space). DiT: all target tokens
    masked, argmax from one forward, NLL the NELBO over n_t draws with the context clamped; causal LM: greedy, exact."""
    diffusion = lm.kind == 'diffusion'
    seqs, spans, n_trunc = lambada_inputs(lm, texts)
    order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i]), i))  # a DiT sees padding: forward one length

    def batch(items):  # (in length order: the groups of one length, concatenated, are items)
        res = []
        for L in sorted({len(seqs[i]) for i in items}):
            grp = [i for i in items if len(seqs[i]) == L]
            x0 = torch.tensor([seqs[i] for i in grp], device=lm.device)
            tgt = torch.tensor([[spans[i][0] <= j < spans[i][1] for j in range(L)] for i in grp], device=lm.device)
            if diffusion:  # the output layer only at the target positions
                t = torch.full((len(grp),), SAMPLE_EPS, device=lm.device)
                lg, _ = lm.logits(x0.masked_fill(tgt, lm.mask), t, positions=tgt.flatten().nonzero().squeeze(1))
                correct = (x0.masked_scatter(tgt, lg.argmax(-1)) == x0).all(1)  # (lg: tgt's positions in order)
                nll = _nelbo(lm, x0, tgt, grp, n_t, seed, SAMPLE_EPS)
            else:  # logits at position p predict token p + 1
                lg, y, tgt = lm.logits(x0)[0][:, :-1], x0[:, 1:], tgt[:, 1:]
                correct = ((lg.argmax(-1) == y) | ~tgt).all(1)
                nll = (F.cross_entropy(lg.flatten(0, 1), y.flatten(), reduction='none').view_as(y) * tgt).sum(1)
            res.append(torch.stack([correct.double(), nll.double(), tgt.sum(1).double()], 1))
        return torch.cat(res)
    res = _sharded(order, max(1, batch_size // n_t) if diffusion else batch_size, f'LAMBADA {lm.name}',
                   lambda i: len(seqs[i]), batch)
    if n_trunc and _rank_world()[0] == 0:  # (a tiny model's 128-token block cuts nearly every passage)
        print(f'warning: {n_trunc} of {len(texts)} LAMBADA contexts were cut on the left to fit the {lm.n_ctx}-token '
              f'context of {lm.name}: not comparable with a full-context evaluation')
    return dict(lambada_acc=res[:, 0].mean(), lastword_ppl=math.exp(res[:, 1].mean()), nll_per_word=res[:, 1].mean(),
                nll_per_token=res[:, 1].sum() / res[:, 2].sum(), n_words=len(res), n_target_tokens=int(res[:, 2].sum()),
                n_truncated=n_trunc, n_t=n_t if diffusion else None, kind=lm.kind)


def _rows_nelbo(lm, rows, draws, seed, batch_size, desc):
    """Mean per-token NELBO of a DiT over rows [n, L], all positions maskable, `draws` t >= 1e-3 (MDLM's) a row."""
    if lm.kind != 'diffusion':
        raise ValueError(f'{desc} needs a diffusion DiT; {lm.name} is {lm.kind}')
    if rows.shape[1] > lm.n_ctx:
        raise ValueError(f'{desc}: rows of {rows.shape[1]} tokens, more than the block size of {lm.name} ({lm.n_ctx})')

    def batch(idx):
        x0 = torch.from_numpy(np.asarray(rows[idx], dtype=np.int64)).to(lm.device)
        return _nelbo(lm, x0, torch.ones_like(x0, dtype=torch.bool), idx, draws, seed, 1e-3)
    return _sharded(range(len(rows)), max(1, batch_size // draws), f'{desc} {lm.name}', lambda i: rows.shape[1],
                    batch).sum() / rows.size


def val_ppl(lm, data_dir, n_rows=0, draws=4, seed=0, batch_size=8):
    """exp(mean per-token NELBO) of a DiT on the first n_rows (0: all) rows of data_dir/val.bin."""
    meta = load_meta(data_dir)
    if lm.kind != 'diffusion' or meta['tokenizer'] != lm.tok_name or meta['vocab_size'] != lm.mask + 1:
        raise ValueError(f"valppl needs a diffusion DiT of the data's vocabulary ({meta['tokenizer']}, "
                         f"V={meta['vocab_size']}); {lm.name} is {lm.kind} with {lm.tok_name} ids")
    rows = open_split(data_dir, 'val')[:n_rows or None]
    nelbo = _rows_nelbo(lm, rows, draws, seed, batch_size, 'val NELBO')
    return dict(val_nelbo=nelbo, val_ppl=math.exp(nelbo), n_rows=len(rows), n_tokens=rows.size, draws=draws)


def lambada_rows(texts, tok, L, bos, eos):
    """MDLM's LAMBADA rows: its lambada_detokenizer ('\\n' + stripped, curly double quotes straight), + EOS each, then
    wrap=True: rows BOS + L - 2 + EOS -> (rows, tokens dropped; MDLM drops a rest per 1000 passages: fewer rows)."""
    ids = [i for t in texts for i in [*tok.encode('\n' + t.replace('\u201c', '"').replace('\u201d', '"').strip()), eos]]
    rows, rest = frame_rows(np.array(ids, dtype=np.int64), L, bos, eos)
    return rows, len(rest)


def lambada_ppl(lm, texts, draws=4, seed=0, batch_size=8):
    """MDLM's LAMBADA perplexity (ppl_eval, wrap=True; anchor 47.52): exp(per-token NELBO) of the wrapped passages."""
    rows, dropped = lambada_rows(texts, lm.tok, lm.n_ctx, lm.bos, lm.eos)
    if not len(rows):
        raise ValueError(f'{len(texts)} passages make less than one row of {lm.n_ctx} tokens')
    nelbo = _rows_nelbo(lm, rows, draws, seed, batch_size, 'LAMBADA NELBO')
    return dict(lambada_ppl=math.exp(nelbo), nelbo=nelbo, n_passages=len(texts), n_rows=len(rows),
                n_tokens=rows.size, n_dropped=dropped, draws=draws)


def git_commit():
    try:
        return subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=os.path.dirname(os.path.abspath(__file__)),
                              capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_record(jsonl, what, metrics, config, settings, source):
    """Append one evaluation to eval.jsonl."""
    meta = settings.get('meta') or {}
    rec = dict(eval=what, time=time.strftime('%Y-%m-%dT%H:%M:%S'), commit=git_commit(), model=settings.get('model'),
               round=meta.get('round'), num_steps=settings.get('num_steps'), sampler=settings.get('sampler'),
               nfe=settings.get('nfe'), source=source, metrics=metrics, settings=settings, config=config)
    os.makedirs(os.path.dirname(jsonl) or '.', exist_ok=True)
    line = json.dumps(rec, default=lambda o: o.item() if hasattr(o, 'item') else str(o)) + '\n'
    try:
        with open(jsonl, 'a+b') as f:  # after a line cut short by a kill, start a new one (or this record is lost too)
            torn = f.seek(0, os.SEEK_END) > 0 and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b'\n'
            f.write((('\n' if torn else '') + line).encode())
    except OSError as e:  # a full disk
        raise write_failed(jsonl, e, kept='the records before are intact') from e


# the fields the readers of eval.jsonl use (write_record writes them all)
RECORD = dict(eval=str, model=(str, type(None)), num_steps=(int, type(None)), settings=dict, config=dict, metrics=dict)


def read_records(jsonl, need=RECORD, keep=None):
    """eval.jsonl's records (or log.jsonl's: need={'step': int}) with the fields of need; others are warned of."""
    return [rec for _, rec in read_jsonl(jsonl, need, keep=keep)]


def _pyplot():
    import matplotlib  # (an extra: only the plots need it)
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def _save_figure(fig, png):
    write_atomic(png, lambda f: fig.savefig(f, dpi=120, format='png'))
    _pyplot().close(fig)
    return png


def plot_genppl(jsonl, png):
    """SDTT's figure: gen-PPL and entropy against steps, a line per model/round (+ judge, length, sampler if varied)."""
    if not os.path.exists(jsonl):
        raise FileNotFoundError(f'no {jsonl} to plot: run --eval=genppl (with the same --out_dir) first')
    prompted = lambda s: s.get('mode') == 'cond_prefix' or s.get('prompt') or s.get('prompt_file')
    need = {**RECORD, 'metrics': dict(gen_ppl=(int, float), entropy=(int, float), seq_len=int)}
    recs = [r for r in read_records(jsonl, need, keep=lambda r: r.get('eval') == 'genppl')
            if r['num_steps'] and not prompted(r['settings'])]
    if not recs:
        raise ValueError(f'no genppl records of unconditional samples in {jsonl}: run --eval=genppl first')
    what = lambda r: (str(r['config'].get('judge')) + (' duo' if r['metrics'].get('protocol') == 'duo' else ''),
                      r['metrics']['seq_len'], str(r.get('sampler')))  # (whole judge paths: two ckpt.pt are two)
    varies = [len({what(r)[k] for r in recs}) > 1 for k in range(3)]
    lines = {}
    for r in recs:
        key = (str(r['model']), -1 if r.get('round') is None else r['round'],
               *[w if v else '' for w, v in zip(what(r), varies)])
        lines.setdefault(key, {})[r['num_steps']] = (r['metrics']['gen_ppl'], r['metrics']['entropy'])
    from matplotlib.ticker import FuncFormatter, NullLocator
    fig, axes = _pyplot().subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    for (model, rnd, jdg, L, sampler), pts in sorted(lines.items()):
        label = ' '.join(filter(None, (model, rnd >= 0 and f'round {rnd}', jdg and f'[{jdg}]', L and f'L={L}',
                                       sampler)))
        steps, ys = zip(*sorted(pts.items()))
        for ax, y in zip(axes, zip(*ys)):
            ax.plot(steps, y, marker='o', label=label)
    plain, ticks = FuncFormatter(lambda v, _: f'{v:g}'), sorted({s for pts in lines.values() for s in pts})
    titles = ('gen-PPL' + ('' if varies[0] else f" (judge: {recs[-1]['config'].get('judge')})"),
              'entropy of the samples')
    for ax, name, title in zip(axes, ('generative perplexity', 'unigram entropy (nats)'), titles):
        ax.set_xscale('log', base=2)
        ax.set(xticks=ticks, xlabel='sampling steps', ylabel=name, title=title)
        ax.xaxis.set(major_formatter=plain, minor_locator=NullLocator())
        ax.grid(True, which='both', alpha=0.3)
    axes[0].set_yscale('log')
    axes[0].yaxis.set(major_formatter=plain, minor_formatter=plain)
    axes[1].legend(fontsize=8, loc='best')
    return _save_figure(fig, png)


def plot_training(log_path):
    """A distill.py log.jsonl: loss and tokens/s against steps, round ends marked -> train.png beside the log."""
    log_path = os.path.join(log_path, 'log.jsonl') if os.path.isdir(log_path) else log_path
    if not os.path.exists(log_path):
        raise FileNotFoundError(f'no {log_path}: --train_log takes a distill.py out_dir (or its log.jsonl)')
    recs = read_records(log_path, need={'step': int})
    train = [r for r in recs if 'loss' in r]
    val_key = next((k for r in recs for k in r if k.startswith('val_') and k != 'val_ppl'), None)
    val = [r for r in recs if val_key in r]
    if not train:
        raise ValueError(f'{log_path} has no training records yet (one every log_interval steps)')
    fig, (ax, ax_speed) = _pyplot().subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    dot = '.' if len(train) == 1 else None  # (a line through one point is not drawn)
    steps = [r['step'] for r in train]
    ax.plot(steps, [r['loss'] for r in train], lw=1, marker=dot, label='training loss (mean since last log)')
    if val:
        ax.plot([r['step'] for r in val], [r[val_key] for r in val], 'o-', label=f'{val_key} (EMA weights)')
    if all(r['loss'] > 0 for r in train) and all(r[val_key] > 0 for r in val):
        ax.set_yscale('log')
    ax_speed.plot(steps, [r['tokens_per_s'] for r in train], marker=dot)
    mfu = sorted(r['mfu'] for r in train)[len(train) // 2]
    ax_speed.set(xlabel='step', ylabel='tokens/s', title=f'throughput (median MFU {100 * mfu:.1f}%)', ylim=(0, None))
    ax_speed.grid(True, alpha=0.3)
    ends = [(r['step'], r['round_done']) for r in recs if 'round_done' in r] or [  # an older log: a round's last step
        (p['step'], r['round']) for p, r in zip(train, train[1:]) if (r.get('round') or 0) > (p.get('round') or 0)]
    for step, rnd in ends:
        for a in (ax, ax_speed):
            a.axvline(step, color='gray', ls=':', lw=1)
        ax.annotate(f'round {rnd} saved', (step, 1), xycoords=('data', 'axes fraction'), fontsize=8, rotation=90,
                    va='top', ha='right', color='gray')
    ax.set(xlabel='step', ylabel='loss', title=os.path.basename(os.path.dirname(os.path.abspath(log_path))))
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=8, loc='lower right' if ends else 'best')  # (SDTT's loss grows round by round; labels on top)
    return _save_figure(fig, os.path.join(os.path.dirname(log_path), 'train.png'))


def report(c, what, metrics, settings, source):
    """Rank 0: append the record to out_dir/eval.jsonl and print its metrics (not the per-sample lists)."""
    if _rank_world()[0] == 0:
        write_record(os.path.join(c.out_dir, 'eval.jsonl'), what, metrics, vars(c), settings, source)
        print(f'{what} {source}: ' + json.dumps({k: v for k, v in metrics.items() if not isinstance(v, list)},
                                                default=float))


def eval_samples(c, evals, dev):
    paths = sample_files(c.samples)  # (before the judge: a typo should not cost a gpt2-large load first)
    judge_lm, n_cond = LM(c.judge, dev, c.judge_dtype, compile=c.compile), 0
    for path in paths:
        s = read_samples(path)
        settings, tok_name = s['settings'], s['settings']['meta']['tokenizer']
        n_prompt = s['prompt_ids'].shape[1] if 'prompt_ids' in s else 0  # forced ids: BOS + the prompt
        if 'genppl' in evals:
            try:
                report(c, 'genppl', gen_ppl(judge_lm, s['tokens'], tok_name, c.batch_size, n_prompt,
                                            c.genppl_protocol), settings, path)
            except ValueError as e:  # which of the files
                raise ValueError(f'{path}: {e}') from e
        if 'mauve' in evals and settings.get('mode') == 'cond_prefix':
            n_cond += 1
            if 'ref_tokens' not in s:
                raise ValueError(f'{path} holds no ref_tokens (the documents of its prompts): write it with sample.py')
            q, p = (judge_pass(judge_lm, judge_inputs(judge_lm, s[k], tok_name)[0], c.batch_size,
                               hidden=True) for k in ('tokens', 'ref_tokens'))
            if _rank_world()[0] == 0:
                report(c, 'mauve', {**mauve_score(p, q, c.mauve_seeds), 'n_samples': len(q), 'n_refs': len(p)},
                       settings, path)
    if 'mauve' in evals and not n_cond:
        raise ValueError(f'--eval=mauve needs sample files of sample.py --mode=cond_prefix; none in {paths[:3]}')


def main(argv=None):
    c = SimpleNamespace(**configure({k: globals()[k] for k in _CONFIG_KEYS}, argv))
    evals = [e.strip() for e in c.eval.split(',') if e.strip()]
    if set(evals) - set(EVALS) or not (evals or c.plot or c.train_log):
        raise ValueError(f'--eval must be a comma list of {", ".join(EVALS)} (or empty with --plot or --train_log), '
                         f'got {c.eval!r}')
    if 'valppl' in evals and not c.data_dir:
        raise ValueError('--eval=valppl needs --data_dir: a prepare_data.py output directory (val.bin, meta.json)')
    check_sizes(vars(c), val_rows=0, n_t=1, val_draws=1, batch_size=1, mauve_seeds=1)  # (val_rows 0: all rows)
    for key in ('dtype', 'judge_dtype'):
        check_choice(key, getattr(c, key), ('float32', 'bfloat16', 'float16'))
    check_choice('genppl_protocol', c.genppl_protocol, ('sdtt', 'duo'))
    rank, _, dev = init_dist(c.device)  # torchrun: every rank scores its share, results are gathered
    if 'genppl' in evals or 'mauve' in evals:
        eval_samples(c, evals, dev)
    if {'lambada', 'lambada_ppl', 'valppl'} & set(evals):
        lm = LM(c.init_from, dev, c.dtype, c.revision, c.compile)
        settings = dict(model='@'.join(filter(None, (c.init_from, c.revision))), meta=getattr(lm.model, 'meta', {}))
        texts = read_lambada(c.lambada_path) if {'lambada', 'lambada_ppl'} & set(evals) else None
        runs = dict(lambada=lambda: lambada(lm, texts, c.n_t, c.seed, c.batch_size),
                    lambada_ppl=lambda: lambada_ppl(lm, texts, c.val_draws, c.seed, c.batch_size),
                    valppl=lambda: val_ppl(lm, c.data_dir, c.val_rows, c.val_draws, c.seed, c.batch_size))
        for what in (w for w in runs if w in evals):  # (in this order)
            report(c, what, runs[what](), settings, c.data_dir if what == 'valppl' else c.lambada_path)
    if c.plot and rank == 0:
        print(f"plot -> {plot_genppl(os.path.join(c.out_dir, 'eval.jsonl'), os.path.join(c.out_dir, 'genppl.png'))}")
    for run in filter(None, map(str.strip, c.train_log.split(',') if rank == 0 else [])):
        print(f'plot -> {plot_training(run)}')
    end_dist()


if __name__ == '__main__':
    import sys
    try:
        main()
    except (FileNotFoundError, ValueError, RuntimeError, ImportError, WriteFailed) as e:
        sys.exit(f'evaluate.py: error: {e}')
