"""The DiT of MDLM (Sahoo et al. 2024) as SDTT uses it, and MDLM/SDTT's AR baseline (causal=True: causal attention,
plain pre-LN blocks), with checkpoint loading and saving. Parameter names are those of the published checkpoints minus
`backbone.` (a strict load_state_dict). The network returns raw logits [B, L, V]; SUBS is in diffusion.py, as in MDLM.
"""
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from fileio import _umask, clean_leftovers, temp_prefix, write_atomic, write_failed  # (others import write_atomic here)


@dataclass
class DiTConfig:
    vocab_size: int = 50258      # GPT-2's 50257 ids + the MASK id, which is always the last one
    block_size: int = 1024       # model_length: the longest sequence the model is trained on
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    cond_dim: int = 128
    dropout: float = 0.1
    time_conditioning: bool = False  # MDLM-OWT and all SDTT models: off (sigma is zeroed)
    causal: bool = False             # True: the reference AR baseline (causal attention, no sigma_map/adaLN)

SIZES = {'small': dict(n_layer=12, n_head=12, n_embd=768), 'medium': dict(n_layer=24, n_head=16, n_embd=1024),
         'large': dict(n_layer=24, n_head=16, n_embd=1536)}  # the MDLM/SDTT model sizes (SPEC §2)


class LayerNorm(nn.Module):
    """LayerNorm with a weight and no bias, always computed in fp32 (also under bf16 autocast)."""
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x.float(), self.weight.shape) * self.weight


class EmbeddingLayer(nn.Module):
    # a raw parameter rather than nn.Embedding: the published checkpoints call it `vocab_embed.embedding`
    def __init__(self, dim, vocab_size):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab_size, dim))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, idx):  # not self.embedding[idx]: its backward adds rows in a thread-dependent order
        return F.embedding(idx, self.embedding)


class TimestepEmbedder(nn.Module):
    """sigma -> 256-d sinusoid [cos | sin] -> MLP. The caller applies the final SiLU."""
    def __init__(self, cond_dim, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=sigma.device, dtype=torch.float32) / half)
        args = sigma.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class Rotary(nn.Module):
    """Rotate-half (GPT-NeoX, non-interleaved) rotary embedding of q and k, positions 0..L-1, base 10000."""
    def __init__(self, head_dim, base=10000):
        super().__init__()
        self.head_dim, self.base = head_dim, base
        self.register_buffer('inv_freq', self.frequencies('cpu'))  # persistent: the published checkpoints carry it

    def frequencies(self, device):
        return 1.0 / (self.base ** (torch.arange(0, self.head_dim, 2, device=device).float() / self.head_dim))

    def forward(self, seq_len, device):
        # a model cast whole to bf16: bf16 frequencies would put the angles of far positions off by up to 0.4 rad
        inv_freq = self.inv_freq if self.inv_freq.dtype == torch.float32 else self.frequencies(device)
        freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)  # [L, head_dim]
        return emb.cos(), emb.sin()


def apply_rotary(x, cos, sin):  # x [B, L, H, D], cos/sin [L, D]; in x's dtype (bf16 under autocast), as MDLM
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class DDiTBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg.n_embd
        self.n_head, self.causal = cfg.n_head, cfg.causal
        self.norm1 = LayerNorm(d)
        self.attn_qkv = nn.Linear(d, 3 * d, bias=False)  # rows laid out (3, heads, head_dim): [q | k | v]
        self.attn_out = nn.Linear(d, d, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)           # only on the two residual branches
        self.norm2 = LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate='tanh'), nn.Linear(4 * d, d))
        if not cfg.causal:  # the AR baseline's blocks are plain pre-LN: no modulation, gates fixed at 1
            self.adaLN_modulation = nn.Linear(cfg.cond_dim, 6 * d)

    def forward(self, x, cos, sin, c, kv=None, start=0):
        B, L, d = x.shape
        h = self.norm1(x)
        if c is not None:  # (c None: the AR baseline's plain pre-LN block, x + attn(LN1(x)), x + mlp(LN2(x)))
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
                self.adaLN_modulation(c)[:, None].chunk(6, dim=2)
            h = h * (1 + scale_msa) + shift_msa
        q, k, v = self.attn_qkv(h).view(B, L, 3, self.n_head, d // self.n_head).unbind(dim=2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, L, hd]
        if kv is not None:  # KV cache: append these L positions; SDPA's is_causal is top-left: a mask shifted by start
            kv[0][:, :, start:start + L], kv[1][:, :, start:start + L] = k, v
            k, v = kv[0][:, :, :start + L], kv[1][:, :, :start + L]
        mask = None if kv is None or L == 1 else torch.ones(L, start + L, dtype=torch.bool, device=x.device).tril(start)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal and kv is None)
        y = self.dropout(self.attn_out(y.transpose(1, 2).reshape(B, L, d)))
        x = x + (y if c is None else gate_msa * y)
        h = self.norm2(x) if c is None else self.norm2(x) * (1 + scale_mlp) + shift_mlp
        y = self.dropout(self.mlp(h))
        return x + (y if c is None else gate_mlp * y)


class DDitFinalLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm_final = LayerNorm(cfg.n_embd)
        self.linear = nn.Linear(cfg.n_embd, cfg.vocab_size)
        if not cfg.causal:  # (the AR baseline: linear(norm_final(x)))
            self.adaLN_modulation = nn.Linear(cfg.cond_dim, 2 * cfg.n_embd)

    def forward(self, x, c, positions=None):
        x = self.norm_final(x)
        if c is not None:
            shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=2)
            x = x * (1 + scale) + shift
        if positions is not None:  # only these rows of the flattened [B * L] positions: [M, V]
            x = x.flatten(0, 1).index_select(0, positions)
        return self.linear(x)


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        if cfg.n_head < 1 or cfg.n_embd % cfg.n_head or (cfg.n_embd // cfg.n_head) % 2:
            raise ValueError(f'n_embd={cfg.n_embd} must split into n_head={cfg.n_head} heads of an even size '
                             '(rotary embeddings rotate pairs of dimensions)')
        if cfg.causal and cfg.time_conditioning:
            raise ValueError('the AR baseline (causal=True) has no time conditioning: set time_conditioning=False')
        self.config = cfg
        self.vocab_embed = EmbeddingLayer(cfg.n_embd, cfg.vocab_size)
        if not cfg.causal:  # (the AR baseline has no time conditioning at all)
            self.sigma_map = TimestepEmbedder(cfg.cond_dim)
        self.rotary_emb = Rotary(cfg.n_embd // cfg.n_head)
        self.blocks = nn.ModuleList([DDiTBlock(cfg) for _ in range(cfg.n_layer)])
        self.output_layer = DDitFinalLayer(cfg)
        for name, p in self.named_parameters():  # adaLN and the output layer start at zero (DiT's adaLN-Zero)
            if 'adaLN' in name or name.startswith('output_layer.linear'):
                nn.init.zeros_(p)
        self.meta = {}  # tokenizer and provenance of a loaded checkpoint (see load_pretrained)

    def forward(self, idx, sigma=None, positions=None, cache=None, start=0):
        """idx [B, L], sigma [B] -> logits [B, L, V], or [M, V] at the flat positions [M] only (the output layer is a
        quarter of DiT-small's FLOPs). cache (new_kv_cache): idx are positions start .. start + L - 1."""
        B, L = idx.shape
        if cache is not None and not self.config.causal:
            raise ValueError('a KV cache needs a causal model (in a bidirectional one every token changes all keys)')
        if start + L > self.config.block_size:
            raise ValueError(f'sequence length {start + L} exceeds the model block size {self.config.block_size}')
        if sigma is None or not self.config.time_conditioning:  # as the published models: c is a learned constant
            sigma = torch.zeros(B, device=idx.device)
        x = self.vocab_embed(idx)
        c = None if self.config.causal else F.silu(self.sigma_map(sigma))
        cos, sin = self.rotary_emb(start + L, idx.device)  # the angles of positions start .. start + L - 1
        for i, block in enumerate(self.blocks):
            x = block(x, cos[start:], sin[start:], c, None if cache is None else cache[i], start)
        return self.output_layer(x, c, positions)

    def new_kv_cache(self, batch_size, dtype=torch.float32):
        """(keys, values) per layer, [B, n_head, block_size, head_dim], for forward(cache=); bf16 under autocast."""
        cfg = self.config
        shape = (batch_size, cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head)
        new = lambda: torch.zeros(shape, dtype=dtype, device=self.vocab_embed.embedding.device)
        return [(new(), new()) for _ in self.blocks]

    def num_params(self, non_embedding=False):
        n = sum(p.numel() for p in self.parameters())
        return n - self.vocab_embed.embedding.numel() if non_embedding else n

    def flops_per_token(self, seq_len, backward=True, head_fraction=1.0):
        """Matmul FLOPs per token (PaLM app. B): 6N + 12 l d L, forward 1/3; head_fraction: positions in the head."""
        n = self.num_params(non_embedding=True)  # the embedding is a lookup, the output layer is a matmul
        n -= (1 - head_fraction) * self.output_layer.linear.weight.numel()
        # the conditioning MLP and the adaLN layers run once per sequence, not per token
        n -= sum(p.numel() for name, p in self.named_parameters() if 'adaLN' in name or name.startswith('sigma_map'))
        f = 6 * n + 12 * self.config.n_layer * self.config.n_embd * seq_len
        return f if backward else f / 3


# ---------------------------------------------------------------------------------------------------------- checkpoints
# load_pretrained reads the MDLM layout (kuleshov-group/mdlm-owt: config.json {hidden_dim, n_blocks, ...} and
# model.safetensors, keys `backbone.<name>`), the SDTT layout (jdeschena/sdtt, a revision per model: a run config, the
# architecture under `model:`), ours (MDLM layout + `causal`, `meta`) and distill.py's ckpt.pt. DiTConfig field -> name:
_HUB_NAMES = dict(n_embd='hidden_dim', n_layer='n_blocks', n_head='n_heads', block_size='model_length')
_SDTT_NAMES = dict(n_embd='hidden_size', cond_dim='cond_dim', n_layer='n_blocks', n_head='n_heads', block_size='length',
                   dropout='dropout')
# check_config's rules, per field or else per type: (test, what a value must be). block_size <= 2**20: rotary tables,
# KV caches and samples are that long, so a larger one is a typo. A float a fork adds: any finite number.
_RULES = {bool: (lambda v: type(v) is bool, 'true or false'),
          int: (lambda v: type(v) is int and v >= 1, 'an integer >= 1'),
          float: (lambda v: type(v) in (int, float) and math.isfinite(v), 'a finite number'),
          'block_size': (lambda v: type(v) is int and 1 <= v <= 2 ** 20, f'an integer >= 1 and <= {2 ** 20}'),
          'dropout': (lambda v: type(v) in (int, float) and 0 <= v < 1, 'a number in [0, 1)')}


def check_config(args, names=None):
    """DiTConfig(**args) or one error naming each bad value as names[field] (bool() had made "false" True)."""
    bad = []
    for f in fields(DiTConfig):
        ok, want = _RULES.get(f.name) or _RULES.get(type(f.default), (None, None))
        if f.name in args and ok and not ok(args[f.name]):
            bad.append(f'{(names or {}).get(f.name, f.name)}={args[f.name]!r} (must be {want})')
    if bad:
        raise ValueError(f'bad values: {", ".join(bad)}')
    return DiTConfig(**args)


def config_from_json(cfg, vocab_size=None):
    """Either published config.json layout (or ours) -> a checked DiTConfig; vocab_size: from the weights if given."""
    sdtt = isinstance(cfg.get('model'), dict) and 'hidden_size' in cfg['model']  # an SDTT run config
    if not sdtt and 'hidden_dim' not in cfg:
        raise ValueError('config.json is neither the MDLM layout (hidden_dim, n_blocks, ...) nor the SDTT layout '
                         f'(model: {{hidden_size, ...}}); keys found: {sorted(cfg)[:20]}')
    m, prefix = (cfg['model'], 'model.') if sdtt else (cfg, '')
    layout = _SDTT_NAMES if sdtt else {f.name: _HUB_NAMES.get(f.name, f.name) for f in fields(DiTConfig)}
    missing = [prefix + layout[k] for k in ('cond_dim', 'n_layer', 'n_head', 'block_size') if layout[k] not in m]
    if missing:
        raise ValueError(f'config.json ({"SDTT" if sdtt else "MDLM"} layout) lacks {", ".join(missing)}')
    args = {k: m[name] for k, name in layout.items() if name in m}
    if sdtt:  # (SDTT's run config says time_conditioning at its top level)
        args['time_conditioning'] = cfg.get('time_conditioning', m.get('time_conditioning', False))
    args['vocab_size'] = vocab_size or m.get('vocab_size') or cfg.get('vocab_size')  # (None: an error naming it)
    return check_config(args, {k: prefix + name for k, name in layout.items()})


def weight_sizes(sd):
    """The sizes the weights fix (cond_dim: not in the AR network's), read before a network is allocated."""
    sizes = dict(n_layer=len({k.split('.')[1] for k in sd if k.startswith('blocks.')}))
    if 'vocab_embed.embedding' in sd:
        sizes['vocab_size'], sizes['n_embd'] = sd['vocab_embed.embedding'].shape
    if 'sigma_map.mlp.0.weight' in sd:
        sizes['cond_dim'] = sd['sigma_map.mlp.0.weight'].shape[0]
    return sizes


def strip_prefix(state_dict, prefix='backbone.'):
    """Strip every level of `backbone.` (SDTT's teacher_1M_sm, pushed from a wrapped hub model, likely has two)."""
    while any(k.startswith(prefix) for k in state_dict):
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return state_dict


def is_ar_state_dict(sd):
    """The reference AR network's weights (MDLM models/autoregressive.py): a DiT's without sigma_map or adaLN."""
    return 'blocks.0.attn_qkv.weight' in sd and not any(k.startswith('sigma_map.') or 'adaLN' in k for k in sd)


def load_state_dict_strict(model, state_dict, source='checkpoint'):  # an error naming every tensor that differs
    state_dict = strip_prefix(state_dict)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
    shapes = [f'{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}'
              for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        msg = [f'{source} does not match the model:'] + [f'  {what} tensors ({len(ks)}): {ks[:10]}' for what, ks in
               (('missing', missing), ('unexpected', unexpected), ('mis-shaped', shapes)) if ks]
        raise ValueError('\n'.join(msg))
    model.load_state_dict(state_dict, strict=True)
    return model


def check_device(device):
    """A clear error for a CUDA device where there is none (torch's is an AssertionError from deep inside a call)."""
    if str(device).startswith('cuda') and not torch.cuda.is_available():
        raise ValueError(f'device={device!r} but CUDA is not available here: pass --device=cpu')


def default_meta(vocab_size):
    """Special ids of a checkpoint that does not record them: GPT-2 (published models) or our byte tokenizer."""
    tokenizer, bos_id = {50258: ('gpt2', 50256), 258: ('byte', 256)}.get(vocab_size, (None, None))  # (EOS = BOS)
    return dict(tokenizer=tokenizer, bos_id=bos_id, eos_id=bos_id, mask_id=vocab_size - 1)


def local_or_hub(name_or_path):
    """The local path (~ expanded), else None for a hub id; a name only a local path can be fails here, not later."""
    path = os.path.expanduser(name_or_path)
    if os.path.exists(path):
        return path
    if path.endswith(('.pt', '.ckpt', '.safetensors')) or path.startswith(('.', '/', '~')) or path.count('/') > 1 \
            or os.path.isdir(path.split('/')[0]):  # (out/kld_smal, out/ a local directory: a typo, not a hub id)
        raise FileNotFoundError(f'no checkpoint at {name_or_path!r}: no such local file or directory (a name like '
                                'this is a local path, not a hub id)')
    return None


def _download(name_or_path, revision):
    """config.json and model.safetensors of a hub id (owner/name: gpt2-large is a transformers id, not a DiT)."""
    if '/' not in name_or_path:
        raise FileNotFoundError(f'no checkpoint at {name_or_path!r}: not a local path, nor the owner/name of a DiT')
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(name_or_path, revision=revision, allow_patterns=['config.json', 'model.safetensors'])
    except Exception as e:  # offline, unknown repo/revision, no huggingface_hub: every script reports it in one line
        raise FileNotFoundError(f'{name_or_path!r} is not a local path, and its hub download (revision {revision!r}) '
                                f'failed ({type(e).__name__}: {(str(e).splitlines() or [""])[0]}): train it first '
                                'or fix the path; offline, download config.json and model.safetensors and pass the '
                                'local directory') from e


def read_checkpoint(path, advice=''):
    """torch.load, weights only, mmap: a node's processes share its pages (a large model's ckpt.pt is ~17 GB)."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception as e:  # a truncated copy, a file of something else
        raise ValueError(f'{path} is not a readable checkpoint ({type(e).__name__}: {e}){advice}') from e


def load_pretrained(name_or_path, revision=None, device='cpu', use_ema=True):
    """A DiT in eval mode from a directory, a ckpt.pt (or its out_dir) or a hub id (config and weights: never remote
    code); model.meta: its tokenizer and special ids (and an SDTT student's round and steps)."""
    path = local_or_hub(name_or_path) or _download(name_or_path, revision)
    if os.path.isfile(os.path.join(path, 'ckpt.pt')) and not os.path.exists(os.path.join(path, 'model.safetensors')):
        path = os.path.join(path, 'ckpt.pt')  # a training out_dir
    model, meta = (_load_training_checkpoint if os.path.isfile(path) else _load_directory)(path, use_ema)
    model.meta = {**default_meta(model.config.vocab_size), **meta}
    if model.meta.get('mask_id') != model.config.vocab_size - 1:  # every sampler and loss takes the last id as MASK
        raise ValueError(f"{path}: meta mask_id {model.meta.get('mask_id')} is not the last id of the vocabulary "
                         f'({model.config.vocab_size - 1}); this code (as MDLM) needs MASK = vocab_size - 1')
    return model.to(device).eval()


def _load_training_checkpoint(path, use_ema):
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or 'model_args' not in ckpt or 'model' not in ckpt:
        raise ValueError(f'{path} is not a checkpoint of this project (no model_args/model); for an MDLM Lightning '
                         f'.ckpt use distill.py init_from, for published models pass the directory')
    try:
        model = DiT(check_config(ckpt['model_args']))
    except (TypeError, ValueError) as e:  # (TypeError: a key DiTConfig lacks, a checkpoint written by other code)
        raise ValueError(f'{path}: its model_args do not fit this DiTConfig: {e}') from e
    sd = ckpt['ema'] if use_ema and ckpt.get('ema') is not None else ckpt['model']
    return load_state_dict_strict(model, sd, source=path), ckpt.get('meta', {})


def _load_directory(path, use_ema):
    cfg_file, st_file = os.path.join(path, 'config.json'), os.path.join(path, 'model.safetensors')
    for f in (cfg_file, st_file):
        if not os.path.exists(f):
            raise FileNotFoundError(f'{f} is missing: a checkpoint directory holds config.json and model.safetensors')
    try:  # a damaged download or a hand-edited config: say which file, not a bare KeyError
        with open(cfg_file) as f:
            cfg = json.load(f)
        sd = strip_prefix(load_file(st_file))
        have = weight_sizes(sd)
        config = config_from_json(cfg, have.get('vocab_size'))
        bad = [f'{k}={getattr(config, k)} but the weights have {v}' for k, v in have.items() if v != getattr(config, k)]
        if bad:  # (n_embd=10**6 would ask for terabytes)
            raise ValueError(f'config.json does not match model.safetensors: {", ".join(bad)}')
        if is_ar_state_dict(sd):  # MDLM/SDTT's AR checkpoints need not say causal in their config
            config = replace(config, causal=True, time_conditioning=False)
    except json.JSONDecodeError as e:  # (a ValueError, but a damaged file, not a wrong layout)
        raise ValueError(f'{cfg_file} is not valid JSON ({e}); download it again') from e
    except ValueError as e:
        raise ValueError(f'{path}: {e}') from e
    except Exception as e:
        raise ValueError(f'{path}: config.json or model.safetensors is not readable ({type(e).__name__}: {e}); '
                         f'download it again') from e
    return load_state_dict_strict(DiT(config), sd, source=st_file), cfg.get('meta', {})


def save_pretrained(model, out_dir, meta=None):
    """config.json + model.safetensors in the MDLM hub layout (+ `causal`, `meta`), in a temporary directory that
    replaces out_dir only when complete (a crash between the two renames leaves the old copy in .tmp_*_old)."""
    config = dict(model_type='mdlm', **{_HUB_NAMES.get(k, k): v for k, v in asdict(model.config).items()},
                  meta={**model.meta, **(meta or {})})
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    clean_leftovers(parent)
    sd = {'backbone.' + k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = tempfile.mkdtemp(dir=parent, prefix=temp_prefix())  # (removed by the next writer if this one is killed)
    try:
        save_file(sd, os.path.join(tmp, 'model.safetensors'))
        with open(os.path.join(tmp, 'config.json'), 'w') as f:
            json.dump(config, f, indent=2)
        os.chmod(tmp, 0o777 & ~_umask())  # the permissions mkdir and open() give (mkdtemp, safetensors: owner only)
        os.chmod(os.path.join(tmp, 'model.safetensors'), 0o666 & ~_umask())
        if os.path.exists(out_dir):  # moved aside first, so that a crash never leaves neither
            os.replace(out_dir, tmp + '_old')
        os.replace(tmp, out_dir)
        shutil.rmtree(tmp + '_old', ignore_errors=True)
    except Exception as e:  # a full disk (safetensors raises its own error type)
        raise write_failed(out_dir, e) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
