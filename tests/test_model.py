"""The DiT: parameter layout, an independent re-computation of the forward, checkpoint round trips, SDPA speed."""
import dataclasses
import json
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import model as M
from model import SIZES, DiT, DiTConfig, EmbeddingLayer, load_pretrained, save_pretrained

CFG = dict(vocab_size=61, block_size=32, n_layer=2, n_head=4, n_embd=64, cond_dim=32, dropout=0.0)


def random_model(seed=0, **kw):
    torch.manual_seed(seed)
    m = DiT(DiTConfig(**{**CFG, **kw}))
    with torch.no_grad():  # adaLN and output are zero-initialised: randomise everything so the test sees them
        for n, p in m.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if 'norm' in n else 0.1) + (1.0 if 'norm' in n else 0.0))
    return m.eval()


def reference_forward(sd, cfg, idx, sigma, sdpa=False):
    """MDLM's DIT forward written out independently from a state dict: explicit softmax attention, rotary from its
    formula (rotate-half on q and k with angle pos * base^(-2i/d)), adaLN chunks in the published order."""
    d, H = cfg.n_embd, cfg.n_head
    hd = d // H
    B, L = idx.shape
    x = sd['vocab_embed.embedding'][idx]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)
    s = sigma if cfg.time_conditioning else torch.zeros(B)
    emb = torch.cat([torch.cos(s[:, None] * freqs), torch.sin(s[:, None] * freqs)], -1)
    c = F.linear(emb, sd['sigma_map.mlp.0.weight'], sd['sigma_map.mlp.0.bias'])
    c = F.silu(F.linear(F.silu(c), sd['sigma_map.mlp.2.weight'], sd['sigma_map.mlp.2.bias']))
    pos = torch.arange(L, dtype=torch.float64)
    theta = pos[:, None] * 10000.0 ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)[None]  # [L, hd/2]
    cos, sin = torch.cos(theta).float(), torch.sin(theta).float()

    def rot(v):  # v [B, L, H, hd]: pairs (i, i + hd/2) rotate by theta_i
        a, b = v[..., :hd // 2], v[..., hd // 2:]
        cc, ss = cos[None, :, None], sin[None, :, None]
        return torch.cat([a * cc - b * ss, b * cc + a * ss], -1)

    def ln(v, w):
        mu, var = v.mean(-1, keepdim=True), v.var(-1, unbiased=False, keepdim=True)
        return (v - mu) / torch.sqrt(var + 1e-5) * w

    for i in range(cfg.n_layer):
        p = lambda n: sd[f'blocks.{i}.{n}']
        mod = F.linear(c, p('adaLN_modulation.weight'), p('adaLN_modulation.bias'))[:, None]
        sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, dim=-1)
        h = ln(x, p('norm1.weight')) * (1 + sc1) + sh1
        qkv = (h @ p('attn_qkv.weight').T).view(B, L, 3, H, hd)
        q, k, v = rot(qkv[:, :, 0]), rot(qkv[:, :, 1]), qkv[:, :, 2]
        if sdpa:  # the plain SDPA version of the same network, for the speed comparison
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=cfg.causal).transpose(1, 2).reshape(B, L, d)
        else:
            att = torch.einsum('blhd,bmhd->bhlm', q, k) / math.sqrt(hd)
            if cfg.causal:
                att = att.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float('-inf'))
            y = torch.einsum('bhlm,bmhd->blhd', att.softmax(-1), v).reshape(B, L, d)
        x = x + g1 * (y @ p('attn_out.weight').T)
        h = ln(x, p('norm2.weight')) * (1 + sc2) + sh2
        h = F.linear(F.gelu(F.linear(h, p('mlp.0.weight'), p('mlp.0.bias')), approximate='tanh'),
                     p('mlp.2.weight'), p('mlp.2.bias'))
        x = x + g2 * h
    sh, sc = F.linear(c, sd['output_layer.adaLN_modulation.weight'], sd['output_layer.adaLN_modulation.bias'])[:, None].chunk(2, -1)
    h = ln(x, sd['output_layer.norm_final.weight']) * (1 + sc) + sh
    return F.linear(h, sd['output_layer.linear.weight'], sd['output_layer.linear.bias'])


PUBLISHED_NAMES = ['vocab_embed.embedding', 'sigma_map.mlp.0.weight', 'sigma_map.mlp.0.bias', 'sigma_map.mlp.2.weight',
                   'sigma_map.mlp.2.bias', 'rotary_emb.inv_freq', 'blocks.0.norm1.weight', 'blocks.0.attn_qkv.weight',
                   'blocks.0.attn_out.weight', 'blocks.0.norm2.weight', 'blocks.0.mlp.0.weight', 'blocks.0.mlp.0.bias',
                   'blocks.0.mlp.2.weight', 'blocks.0.mlp.2.bias', 'blocks.0.adaLN_modulation.weight',
                   'blocks.0.adaLN_modulation.bias', 'output_layer.norm_final.weight', 'output_layer.linear.weight',
                   'output_layer.linear.bias', 'output_layer.adaLN_modulation.weight', 'output_layer.adaLN_modulation.bias']


def test_parameter_names_shapes_and_counts():
    m = DiT(DiTConfig(**{**CFG, 'n_layer': 1}))
    sd = m.state_dict()
    assert sorted(sd) == sorted(PUBLISHED_NAMES)
    d, V, c = CFG['n_embd'], CFG['vocab_size'], CFG['cond_dim']
    assert sd['blocks.0.attn_qkv.weight'].shape == (3 * d, d)
    assert sd['blocks.0.adaLN_modulation.weight'].shape == (6 * d, c)
    assert sd['output_layer.linear.weight'].shape == (V, d)
    assert sd['rotary_emb.inv_freq'].shape == (d // CFG['n_head'] // 2,)
    # zero-initialised adaLN and output layer (training from scratch)
    assert m.output_layer.linear.weight.abs().sum() == 0 and m.blocks[0].adaLN_modulation.weight.abs().sum() == 0
    # MDLM small has 169.6M parameters (SPEC §2)
    small = DiT(DiTConfig(n_layer=12, n_head=12, n_embd=768, cond_dim=128, vocab_size=50258))
    assert abs(small.num_params() / 1e6 - 169.6) < 0.1


@pytest.mark.parametrize('time_conditioning', [False, True])
def test_forward_matches_independent_reference(time_conditioning):
    m = random_model(time_conditioning=time_conditioning)
    idx = torch.randint(0, CFG['vocab_size'], (3, 20))
    sigma = torch.rand(3) * 3
    with torch.no_grad():
        out = m(idx, sigma)
        ref = reference_forward(m.state_dict(), m.config, idx, sigma)
    assert out.shape == (3, 20, CFG['vocab_size'])
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    if not time_conditioning:  # sigma is ignored (zeroed) exactly as the published models expect
        torch.testing.assert_close(m(idx, sigma * 0 + 5.0), out)


def reference_ar_forward(sd, n_head, idx):
    """MDLM's AR network (models/autoregressive.py) written out independently from a state dict, in float64: plain
    pre-LN blocks x + attn(LN1(x)), x + mlp(LN2(x)) with causal softmax attention and rotary q/k (complex rotation of
    the pairs (i, i + hd/2)), then linear(LN(x)). No sigma, no modulation."""
    sd = {k: v.double() for k, v in sd.items()}
    B, L = idx.shape
    d = sd['vocab_embed.embedding'].shape[1]
    hd = d // n_head
    n_layer = len({k.split('.')[1] for k in sd if k.startswith('blocks.')})
    x = sd['vocab_embed.embedding'][idx]
    angle = torch.arange(L, dtype=torch.float64)[:, None] / 10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    turn = torch.polar(torch.ones_like(angle), angle)  # [L, hd/2]: e^{i pos theta_j}

    def rope(v):  # [B, L, H, hd]: (v_j + i v_{j + hd/2}) * e^{i pos theta_j}
        z = torch.complex(v[..., :hd // 2], v[..., hd // 2:]) * turn[None, :, None]
        return torch.cat([z.real, z.imag], -1)

    def norm(v, w):
        return F.layer_norm(v, (d,), eps=1e-5) * w

    future = torch.ones(L, L, dtype=torch.bool).triu(1)
    for i in range(n_layer):
        w = lambda n: sd[f'blocks.{i}.{n}']
        q, k, v = (norm(x, w('norm1.weight')) @ w('attn_qkv.weight').T).view(B, L, 3, n_head, hd).unbind(2)
        q, k = rope(q), rope(k)
        att = (torch.einsum('bqhd,bkhd->bhqk', q, k) / hd ** 0.5).masked_fill(future, float('-inf')).softmax(-1)
        x = x + torch.einsum('bhqk,bkhd->bqhd', att, v).reshape(B, L, d) @ w('attn_out.weight').T
        h = F.gelu(norm(x, w('norm2.weight')) @ w('mlp.0.weight').T + w('mlp.0.bias'), approximate='tanh')
        x = x + h @ w('mlp.2.weight').T + w('mlp.2.bias')
    return norm(x, sd['output_layer.norm_final.weight']) @ sd['output_layer.linear.weight'].T + sd['output_layer.linear.bias']


# the parameter names of MDLM's AR network (models/autoregressive.py; SDTT's ar_orig.py), one block
REFERENCE_AR_NAMES = ['vocab_embed.embedding', 'rotary_emb.inv_freq', 'blocks.0.norm1.weight', 'blocks.0.attn_qkv.weight',
                      'blocks.0.attn_out.weight', 'blocks.0.norm2.weight', 'blocks.0.mlp.0.weight', 'blocks.0.mlp.0.bias',
                      'blocks.0.mlp.2.weight', 'blocks.0.mlp.2.bias', 'output_layer.norm_final.weight',
                      'output_layer.linear.weight', 'output_layer.linear.bias']


def test_ar_baseline_is_the_reference_network():
    """causal=True builds MDLM/SDTT's AR network: its parameter names in its order (that of the EMA shadow_params of
    a Lightning checkpoint), its size at 'small' (embedding + 12 (12 d^2 + 7 d) + d + (d + 1) V: 7.4M fewer than the
    DiT's adaLN and sigma_map), and a forward equal to an independent float64 re-computation."""
    m = DiT(DiTConfig(**{**CFG, 'n_layer': 1, 'causal': True}))
    assert list(m.state_dict()) == REFERENCE_AR_NAMES
    assert [n for n, _ in m.named_parameters()] == [n for n in REFERENCE_AR_NAMES if n != 'rotary_emb.inv_freq']
    assert m.output_layer.linear.weight.abs().sum() == 0  # zero-initialised head, as the reference's
    d, V = 768, 50258
    small = DiT(DiTConfig(vocab_size=V, causal=True, **SIZES['small']))
    assert small.num_params() == V * d + 12 * (12 * d * d + 7 * d) + d + (d + 1) * V  # 162,246,482
    assert DiT(DiTConfig(vocab_size=V, **SIZES['small'])).num_params() - small.num_params() == 7_380_736
    m = random_model(causal=True, n_layer=3)
    idx = torch.randint(0, CFG['vocab_size'], (3, 20))
    with torch.no_grad():
        out = m(idx)
    torch.testing.assert_close(out.double(), reference_ar_forward(m.state_dict(), CFG['n_head'], idx),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match='no time conditioning'):
        DiT(DiTConfig(**{**CFG, 'causal': True, 'time_conditioning': True}))


def test_bidirectional_vs_causal():
    m = random_model()
    idx = torch.randint(0, CFG['vocab_size'], (1, 16))
    idx2 = idx.clone()
    idx2[0, -1] = (idx[0, -1] + 1) % CFG['vocab_size']
    with torch.no_grad():
        assert not torch.allclose(m(idx)[0, 0], m(idx2)[0, 0])  # the first position sees the last
        mc = random_model(causal=True)
        torch.testing.assert_close(mc(idx)[0, :-1], mc(idx2)[0, :-1])  # causal: it does not


def test_embedding_backward_is_deterministic_with_threads():
    """Multi-threaded CPU training is reproducible: the embedding's gradient sums repeated rows in a fixed order
    (indexing the parameter instead, an accumulating index_put, gave different sums from run to run here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        emb = EmbeddingLayer(64, 258)
        idx, w = torch.randint(0, 20, (16, 128)), torch.randn(16, 128, 64)  # many repeated rows
        grads = []
        for _ in range(5):
            emb.zero_grad()
            (emb(idx) * w).sum().backward()
            grads.append(emb.embedding.grad.clone())
        assert all(torch.equal(grads[0], g) for g in grads[1:])
    finally:
        torch.set_num_threads(n)


def test_too_long_input_raises():
    m = random_model()
    with pytest.raises(ValueError, match='block size'):
        m(torch.zeros(1, CFG['block_size'] + 1, dtype=torch.long))


def test_kv_cache_logits_equal_full_forward():
    """Decoding with the KV cache (a prefix of 5, then one token at a time, with a chunk of 3 at start > 0 in the
    middle, which needs the shifted causal mask) gives, at every new position, the logits of a full forward over the
    prefix up to that position."""
    m = random_model(causal=True)
    L = CFG['block_size']
    idx = torch.randint(0, CFG['vocab_size'], (3, L))
    cache, start = m.new_kv_cache(3), 0
    with torch.no_grad():
        for n in [5, 1, 1, 3] + [1] * (L - 10):
            out = m(idx[:, start:start + n], cache=cache, start=start)
            for i in range(n):  # the logits of position start + i from a forward of everything up to it
                full = m(idx[:, :start + i + 1])[:, -1]
                torch.testing.assert_close(out[:, i], full, rtol=1e-5, atol=1e-5)
            start += n
        assert start == L
        with pytest.raises(ValueError, match='block size'):  # the cache holds block_size positions
            m(idx[:, :1], cache=cache, start=L)


def test_kv_cache_needs_causal_model():
    m = random_model()
    with pytest.raises(ValueError, match='KV cache needs a causal model'):
        m(torch.zeros(2, 4, dtype=torch.long), cache=m.new_kv_cache(2))


def _write_published(tmp_path, m, layout):
    sd = {'backbone.' + k: v.contiguous() for k, v in m.state_dict().items()}
    c = m.config
    if layout == 'mdlm':
        cfg = dict(model_type='mdlm', hidden_dim=c.n_embd, cond_dim=c.cond_dim, n_blocks=c.n_layer, n_heads=c.n_head,
                   model_length=c.block_size, vocab_size=c.vocab_size, dropout=0.1, time_conditioning=c.time_conditioning)
    else:  # SDTT: a whole run config, architecture under `model`
        cfg = dict(mode='train', time_conditioning=c.time_conditioning, parameterization=dict(num_distill_steps=2),
                   model=dict(name='small', type='ddit', hidden_size=c.n_embd, cond_dim=c.cond_dim, length=c.block_size,
                              n_blocks=c.n_layer, n_heads=c.n_head, scale_by_sigma=True, dropout=0.1))
    d = tmp_path / layout
    d.mkdir()
    save_file(sd, str(d / 'model.safetensors'))
    (d / 'config.json').write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize('layout', ['mdlm', 'sdtt'])
@pytest.mark.parametrize('causal', [False, True])
def test_load_published_layouts(tmp_path, layout, causal):
    """Both hub layouts, of the DiT and of the reference AR network (whose config need not say causal: its weights
    do, without sigma_map and adaLN), load strictly and compute the same logits."""
    m = random_model(causal=causal)
    d = _write_published(tmp_path, m, layout)
    m2 = load_pretrained(str(d))
    assert not m2.training and m2.config.block_size == CFG['block_size'] and m2.config.dropout == 0.1
    assert m2.config.causal == causal
    idx = torch.randint(0, CFG['vocab_size'], (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(m2(idx), m(idx), rtol=0, atol=0)


BAD_VALUES = {bool: ['false', 'yes', 1, None], int: ['2', 2.0, 0, True, None], float: ['0.1', 1.5, True, None]}
_SDTT_NAMES = dict(n_embd='hidden_size', n_layer='n_blocks', n_head='n_heads', block_size='length')


def _set_field(cfg, layout, field, value):
    """Set DiTConfig field in a config.json dict of layout; returns the name an error should give it."""
    if layout == 'sdtt' and field not in ('time_conditioning', 'causal'):  # (the architecture is under `model`)
        cfg['model'][_SDTT_NAMES.get(field, field)] = value
        return 'model.' + _SDTT_NAMES.get(field, field)
    cfg[M._HUB_NAMES.get(field, field)] = value
    return M._HUB_NAMES.get(field, field)


@pytest.mark.parametrize('layout', ['mdlm', 'sdtt'])
def test_config_json_values_are_type_checked_naming_the_field(tmp_path, layout):
    """Every field of DiTConfig, wrong in a hand-edited config.json: "causal": "false" used to become True through
    bool() (an MDLM sampled left to right, exit 0), "n_heads": "2" a bare TypeError. Now an error names the field."""
    d = _write_published(tmp_path, random_model(), layout)
    good = json.loads((d / 'config.json').read_text())
    checked = 0
    for f in dataclasses.fields(DiTConfig):
        if f.name == 'vocab_size' or (layout == 'sdtt' and f.name == 'causal'):
            continue  # (vocab_size is read from the weights; the SDTT layout has no causal)
        for bad in BAD_VALUES[type(f.default)]:
            cfg = json.loads(json.dumps(good))
            name = _set_field(cfg, layout, f.name, bad)
            (d / 'config.json').write_text(json.dumps(cfg))
            with pytest.raises(ValueError, match=re.escape(f'{name}={bad!r} (must be ')):
                load_pretrained(str(d))
            checked += 1
    assert checked >= 24
    # sizes beyond the weights: refused before a network of that size is allocated (it would ask for terabytes)
    for field, value, msg in [('n_embd', 10 ** 6, 'n_embd=1000000 but the weights have 64'),
                              ('n_layer', 10 ** 5, 'n_layer=100000 but the weights have 2'),
                              ('cond_dim', 7, 'cond_dim=7 but the weights have 32'),
                              ('block_size', 2 ** 40, f'={2 ** 40} (must be an integer >= 1 and <= {2 ** 20})')]:
        cfg = json.loads(json.dumps(good))
        _set_field(cfg, layout, field, value)
        (d / 'config.json').write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match=re.escape(msg)):
            load_pretrained(str(d))


def test_sdtt_layout_double_prefix_no_vocab_size_time_conditioning(tmp_path):
    """SDTT's teacher_1M_sm (pushed from a wrapped model) has `backbone.backbone.` keys; its run config has no
    vocab_size (read from the weights) and says time_conditioning at the top level."""
    m = random_model(time_conditioning=True)
    d = _write_published(tmp_path, m, 'sdtt')
    sd = {'backbone.' + k: v for k, v in load_file(str(d / 'model.safetensors')).items()}
    save_file(sd, str(d / 'model.safetensors'))
    m2 = load_pretrained(str(d))
    assert m2.config.vocab_size == CFG['vocab_size'] and m2.config.time_conditioning
    idx, sig = torch.randint(0, CFG['vocab_size'], (2, 24)), torch.tensor([0.3, 2.0])
    with torch.no_grad():
        torch.testing.assert_close(m2(idx, sig), m(idx, sig), rtol=0, atol=0)


def test_save_pretrained_writes_the_published_mdlm_layout(tmp_path):
    m = random_model(time_conditioning=True)
    d = save_pretrained(m, str(tmp_path / 'tc'))
    keys = load_file(os.path.join(d, 'model.safetensors')).keys()
    assert keys and all(k.startswith('backbone.') and not k.startswith('backbone.backbone.') for k in keys)
    cfg = json.load(open(os.path.join(d, 'config.json')))
    c = m.config
    assert {'model_type': 'mdlm', 'hidden_dim': c.n_embd, 'cond_dim': c.cond_dim, 'n_blocks': c.n_layer,
            'n_heads': c.n_head, 'model_length': c.block_size, 'vocab_size': c.vocab_size,
            'time_conditioning': True}.items() <= cfg.items()
    m2 = load_pretrained(d)
    x, s = torch.randint(0, c.vocab_size, (2, 16)), torch.tensor([0.1, 3.0])
    with torch.no_grad():
        torch.testing.assert_close(m2(x, s), m(x, s), rtol=0, atol=0)


def test_a_field_a_fork_adds_to_ditconfig_survives_save_and_load(tmp_path, monkeypatch):
    import dataclasses
    import model as M

    @dataclasses.dataclass
    class Forked(DiTConfig):
        logit_softcap: float = 0.0
    monkeypatch.setattr(M, 'DiTConfig', Forked)  # (as if the field were written into model.py's DiTConfig)
    m = DiT(Forked(**CFG, logit_softcap=30.0))
    back = load_pretrained(save_pretrained(m, str(tmp_path / 'forked')))
    assert back.config == m.config and back.config.logit_softcap == 30.0  # was: the default 0.0, without a word


def test_save_pretrained_round_trip_and_meta(tmp_path):
    m = random_model(causal=True)
    m.meta = dict(tokenizer='byte', bos_id=256, eos_id=256, mask_id=60)
    out = save_pretrained(m, str(tmp_path / 'ck'), meta=dict(round=3))
    save_pretrained(m, out, meta=dict(round=3))  # overwriting an existing directory works and leaves no temporary directories
    assert sorted(os.listdir(tmp_path)) == ['ck']
    umask = os.umask(0o022)  # the permissions mkdir/open give (were owner-only: a shared run directory unreadable)
    try:
        save_pretrained(m, out, meta=dict(round=3))
    finally:
        os.umask(umask)
    assert [os.stat(os.path.join(out, *p)).st_mode & 0o777 for p in ([], ['config.json'], ['model.safetensors'])] == \
        [0o755, 0o644, 0o644]
    m2 = load_pretrained(out)
    assert m2.config == m.config and m2.meta['round'] == 3 and m2.meta['tokenizer'] == 'byte'
    idx = torch.randint(0, CFG['vocab_size'], (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(m2(idx), m(idx), rtol=0, atol=0)


def test_project_training_checkpoint(tmp_path):
    from dataclasses import asdict
    m, ema = random_model(0), random_model(1)
    torch.save(dict(model_args=asdict(m.config), model=m.state_dict(), ema=ema.state_dict(), meta={'round': 2}),
               tmp_path / 'ckpt.pt')
    idx = torch.randint(0, CFG['vocab_size'], (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(str(tmp_path))(idx), ema(idx))  # EMA weights by default
        torch.testing.assert_close(load_pretrained(str(tmp_path / 'ckpt.pt'), use_ema=False)(idx), m(idx))


def test_load_errors_name_the_problem(tmp_path):
    m = random_model()
    d = _write_published(tmp_path, m, 'mdlm')
    sd = {'backbone.' + k: v for k, v in m.state_dict().items() if k != 'blocks.1.norm2.weight'}
    sd['backbone.extra.weight'] = torch.zeros(2)
    sd['backbone.blocks.0.attn_out.weight'] = torch.zeros(3, 3)
    save_file(sd, str(d / 'model.safetensors'))
    with pytest.raises(ValueError) as e:
        load_pretrained(str(d))
    msg = str(e.value)
    assert 'blocks.1.norm2.weight' in msg and 'extra.weight' in msg and 'blocks.0.attn_out.weight' in msg
    os.remove(d / 'config.json')
    with pytest.raises(FileNotFoundError, match='config.json'):
        load_pretrained(str(d))
    with pytest.raises(FileNotFoundError):
        load_pretrained(str(tmp_path / 'nope' / 'ckpt.pt'))
    (tmp_path / 'junk.pt').write_bytes(b'not a checkpoint')
    with pytest.raises(ValueError, match='not a readable checkpoint'):
        load_pretrained(str(tmp_path / 'junk.pt'))
    # a damaged download and a config with a key missing: ValueErrors that name the directory
    good = save_pretrained(m, str(tmp_path / 'good'))
    (tmp_path / 'good' / 'model.safetensors').write_bytes(b'\x00' * 16)
    with pytest.raises(ValueError, match='good.*not readable'):
        load_pretrained(good)
    good = save_pretrained(m, str(tmp_path / 'good'))
    cfg = json.loads((tmp_path / 'good' / 'config.json').read_text())
    del cfg['cond_dim']
    (tmp_path / 'good' / 'config.json').write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="good.*cond_dim"):
        load_pretrained(good)
    (tmp_path / 'good' / 'config.json').write_text('{"hidden_dim": 32,')  # cut short
    with pytest.raises(ValueError, match='not valid JSON.*download it again'):
        load_pretrained(good)
    # a project checkpoint written by other code (a model_args key DiTConfig lacks): a ValueError naming the file
    from dataclasses import asdict
    torch.save(dict(model_args={**asdict(m.config), 'bias': False}, model=m.state_dict()), tmp_path / 'other.pt')
    with pytest.raises(ValueError, match="other.pt: its model_args.*bias"):
        load_pretrained(str(tmp_path / 'other.pt'))
    # a meta whose MASK is not the last id would be sampled wrongly: refused
    with pytest.raises(ValueError, match='mask_id 200'):
        load_pretrained(save_pretrained(m, str(tmp_path / 'badmask'), meta=dict(mask_id=200)))


def test_mistyped_local_path_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, 'snapshot_download', lambda *a, **k: pytest.fail('sent to the hub'))
    (tmp_path / 'out').mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match='out/kld_smal'):
        load_pretrained('out/kld_smal')
    for name in ('scrach', 'gpt2-large'):  # a DiT's hub id is owner/name (gpt2-large would download 3 GB, then fail)
        with pytest.raises(FileNotFoundError, match='owner/name of a DiT'):
            load_pretrained(name)


def test_home_relative_path_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv('HOME', str(tmp_path))  # (bash leaves --init_from=~/x as it is)
    save_pretrained(random_model(), str(tmp_path / 'tiny'))
    assert load_pretrained('~/tiny').config.n_layer == CFG['n_layer']


def test_model_cast_to_bf16_keeps_float32_rotary_angles():
    m = random_model()
    cos, sin = m.rotary_emb(1024, 'cpu')
    cos16, sin16 = m.to(torch.bfloat16).rotary_emb(1024, 'cpu')  # inv_freq rounded to bf16 by the cast
    assert m.rotary_emb.inv_freq.dtype == torch.bfloat16
    torch.testing.assert_close(cos16, cos, rtol=0, atol=1e-6)  # bf16 frequencies: off by up to ~0.4 at position 1023
    torch.testing.assert_close(sin16, sin, rtol=0, atol=1e-6)


def test_hub_id_offline_fails_fast_with_advice(monkeypatch):
    import huggingface_hub
    calls = {}

    def fake_download(repo_id, revision=None, **kw):
        calls.update(repo_id=repo_id, revision=revision, **kw)
        raise OSError('network is unreachable')
    monkeypatch.setattr(huggingface_hub, 'snapshot_download', fake_download)
    with pytest.raises(FileNotFoundError, match='pass the local directory'):
        load_pretrained('jdeschena/sdtt', revision='baselines_kld_step_70000')
    assert calls['repo_id'] == 'jdeschena/sdtt' and calls['revision'] == 'baselines_kld_step_70000'
    assert set(calls['allow_patterns']) == {'config.json', 'model.safetensors'}  # never code
