"""sample.py: the release API (loaders, .sample, tokenizer), the analytic sampler, prompting, the CLI's files and
multi-process sampling. Tiny models on CPU; the hub is replaced by local directories (only the download is stubbed)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import diffusion  # noqa: E402
import sample  # noqa: E402
from model import DiT, DiTConfig, default_meta, save_pretrained  # noqa: E402


def tiny_dir(path, vocab_size, block_size=64, seed=0, causal=False):
    """A small DiT with random (not zero-initialised) output weights, saved like a published model."""
    torch.manual_seed(seed)
    model = DiT(DiTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32, cond_dim=16,
                          causal=causal))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    save_pretrained(model, str(path), meta=default_meta(vocab_size))
    return str(path)


@pytest.fixture(scope='module')
def byte_dir(tmp_path_factory):
    return tiny_dir(tmp_path_factory.mktemp('byte') / 'model', 258)


@pytest.fixture(scope='module')
def gpt2_dir(tmp_path_factory):
    return tiny_dir(tmp_path_factory.mktemp('gpt2') / 'model', 50258)


@pytest.fixture(scope='module')
def ar_dir(tmp_path_factory):
    return tiny_dir(tmp_path_factory.mktemp('ar') / 'model', 258, causal=True)


@pytest.fixture
def hub(monkeypatch, gpt2_dir):
    """The hub: every (repo, revision) resolves to the local gpt2-vocab model; the requests are recorded."""
    import huggingface_hub
    calls = []

    def snapshot_download(repo_id, revision=None, **kw):
        calls.append((repo_id, revision))
        return gpt2_dir
    monkeypatch.setattr(huggingface_hub, 'snapshot_download', snapshot_download)
    return calls


def test_loaders_resolve_repo_and_revision(hub, gpt2_dir):
    sample.load_mdlm_small()
    sample.load_mdlm_small(revision=None)
    lm = sample.load_small_student(loss='mse', round=2)
    sample.load_scaling_student(size='large', round=3)
    sample.load_scaling_teacher(size='md')
    sample.load_small_student()
    assert hub == [('jdeschena/sdtt', 'teacher_1M_sm'), ('kuleshov-group/mdlm-owt', None),
                   ('jdeschena/sdtt', 'baselines_mse_step_20000'), ('jdeschena/sdtt', 'scaling_400k_large_step_30000'),
                   ('jdeschena/sdtt', 'teacher_400k_md_step_400000'), ('jdeschena/sdtt', 'baselines_kld_step_70000')]
    assert lm.meta['round'] == 2 and lm.name == 'jdeschena/sdtt@baselines_mse_step_20000'
    assert isinstance(lm.backbone, DiT) and lm.tokenizer.name == 'gpt2' and lm.tokenizer.bos_token_id == 50256
    local = sample.load_small_student('tvd', 1, path=gpt2_dir)  # a local directory instead of the hub
    assert len(hub) == 6 and local.meta['round'] == 1
    assert local.to('cpu') is local and local.eval() is local
    for bad in (dict(loss='kl'), dict(loss='kld', round=8), dict(round=0), dict(round=True), dict(round=7.0)):
        with pytest.raises(ValueError, match='loss must be|round must be'):
            sample.load_small_student(**bad)
    for fn in (sample.load_scaling_student, sample.load_scaling_teacher):
        with pytest.raises(ValueError, match='size must be one of'):
            fn(size='small')


# The release API's contract: the calls its README makes (jdeschena/sdtt), written here so that the test needs nothing
# outside the repository; they run as they are from the repository root (sdtt.py).
RELEASE_CALLS = [
    """from sdtt import load_mdlm_small
mdlm_small = load_mdlm_small()""",
    """from sdtt import load_small_student
student = load_small_student(loss="kld", round=7)
student = load_small_student(loss="mse", round=2)
student = load_small_student(loss="tvd", round=1)""",
    """from sdtt import load_scaling_student
student = load_scaling_student(size="sm", round=7)
student = load_scaling_student(size="md", round=1)
student = load_scaling_student(size="large", round=3)""",
    """from sdtt import load_scaling_teacher
teacher = load_scaling_teacher(size="sm")
teacher = load_scaling_teacher(size="md")
teacher = load_scaling_teacher(size="large")""",
    """from sdtt import load_small_student
import torch
model = load_small_student(loss="kld", round=7)
model.cuda()
tokens = model.sample(n_samples=8, num_steps=256, seq_len=1024, verbose=True)
uncond_text = model.tokenizer.batch_decode(tokens)
prompt = "Today is a great day. The sun is shining,"
prompt_tokens = model.tokenizer(prompt)["input_ids"]
prompt_tokens.insert(0, model.tokenizer.bos_token_id)
prompt_tokens = torch.tensor(prompt_tokens, device="cuda")
prompt_len = len(prompt_tokens)

def project_fn(x):
    x[:, :prompt_len] = prompt_tokens
    return x

tokens = model.sample(n_samples=8, num_steps=256, seq_len=1024, verbose=True, project_fn=project_fn)
cond_text = model.tokenizer.batch_decode(tokens)""",
]


def test_release_api_calls_run(hub, capsys):
    """The release README's calls (RELEASE_CALLS). To fit a CPU test, the device is cpu and the sizes shrink
    (256 steps x 1024 tokens -> 4 x 32); nothing else changes."""
    ns = {}  # one session, as a user's
    for code in RELEASE_CALLS:
        code = code.replace('model.cuda()', 'model.to("cpu")').replace('device="cuda"', 'device="cpu"')
        code = code.replace('num_steps=256', 'num_steps=4').replace('seq_len=1024', 'seq_len=32')
        exec(compile(code, 'release README', 'exec'), ns)
    for rev in ('scaling_400k_md_step_10000', 'teacher_1M_sm', 'teacher_400k_large_step_400000'):
        assert ('jdeschena/sdtt', rev) in hub
    assert ns['tokens'].shape == (8, 32) and ns['tokens'].dtype == torch.int64
    assert len(ns['uncond_text']) == 8 and all(isinstance(t, str) for t in ns['uncond_text'])
    prompt = '<|endoftext|>Today is a great day. The sun is shining,'
    assert all(t.startswith(prompt) for t in ns['cond_text'])
    assert (ns['tokens'][:, :ns['prompt_len']] == ns['prompt_tokens']).all()


def test_release_api_from_sdtt_with_the_releases_prior(hub):
    """`import sdtt` gives the release's loaders (the same functions as sample.py's); model.sample starts from an
    all-MASK prior (MDLM's _sample_prior, SDTT's add_bos=False): position 0 is the model's, not a forced BOS;
    add_bos=True forces it."""
    import sdtt
    assert sdtt.load_small_student is sample.load_small_student and sdtt.DiffusionLM is sample.DiffusionLM
    model = sdtt.load_small_student(loss='kld', round=7)
    model.to('cpu')
    tokens = model.sample(n_samples=8, num_steps=4, seq_len=32, verbose=True, seed=3)
    want, _ = diffusion.sample(model.backbone, 8, 4, 32, add_bos=False, seed=3)
    assert torch.equal(tokens, want) and (tokens[:, 0] != 50256).any()
    assert (model.sample(n_samples=8, num_steps=4, seq_len=32, add_bos=True, seed=3)[:, 0] == 50256).all()


def test_analytic_transition_equals_ancestral():
    """SEDD's score-based step and the ancestral step are the same distribution for the absorbing process."""
    g = torch.Generator().manual_seed(0)
    V, mask = 11, 10
    logits = 3 * torch.randn(40, V, generator=g)
    x = torch.where(torch.rand(40, generator=g) < 0.6, mask, torch.randint(0, mask, (40,), generator=g))
    ts, dt = diffusion.sampling_grid(8)
    for t in (ts[0], ts[3], ts[-1]):
        s = t - dt
        probs = sample.analytic_probs(logits, x, t, s, mask)
        m_t, m_s = diffusion.move_chance(torch.tensor(t, dtype=torch.float64)), diffusion.move_chance(torch.tensor(s, dtype=torch.float64))
        p = torch.softmax(logits[:, :mask].double(), -1)
        expected = torch.cat([p * (m_t - m_s) / m_t, torch.full((40, 1), float(m_s / m_t), dtype=torch.float64)], -1)
        expected = torch.where((x == mask)[:, None], expected, torch.nn.functional.one_hot(x, V).double())
        assert probs.dtype == torch.float64
        torch.testing.assert_close(probs, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('name', list(sample.SAMPLERS))
def test_every_sampler_follows_the_models_noise_schedule(name):
    """Each sampler's step from t to s leaves a masked position masked w.p. m(s)/m(t) of the schedule in the model's
    meta: the masked fraction the model sees at step k is m(t_k)/m(1)."""
    from test_diffusion import FixedModel, tail_probs
    ts = torch.linspace(1, 1e-5, 7, dtype=torch.float64)[:-1]
    for schedule in diffusion.NOISE_SCHEDULES:
        model = FixedModel(tail_probs().float())
        model.meta = {'noise_schedule': schedule}
        step_fn = sample.SAMPLERS[name](torch.Generator().manual_seed(0))
        x, _ = diffusion.sample(model, 32, 6, 128, mask_id=1000, seed=0, step_fn=step_fn)
        assert (x != 1000).all()
        expect = (diffusion.move_chance(ts, schedule) / diffusion.move_chance(ts[:1], schedule)).tolist()
        for seen, p in zip(model.seen, expect):
            assert abs((seen == 1000).double().mean().item() - p) < 4 * (p * (1 - p) / seen.numel()) ** 0.5 + 1e-9, \
                (schedule, p)


def test_cache_same_tokens_fewer_nfe(byte_dir):
    lm = sample.load_model(byte_dir)
    a, nfe_a = lm.sample(3, 128, 16, seed=3, return_nfe=True)
    b, nfe_b = lm.sample(3, 128, 16, seed=3, cache=True, return_nfe=True)
    assert torch.equal(a, b) and nfe_a == 128 and nfe_b <= 16  # 15 masked positions: at most 15 steps change one
    assert not (a == 257).any()
    with pytest.raises(ValueError, match='ancestral step'):  # the analytic step decides its reveals on the device
        lm.sample(3, 128, 16, seed=3, sampler='analytic', cache=True)


def recording_load(monkeypatch):
    """sample.main loads its model through load_model: record every input the network sees."""
    seen, load = [], sample.load_model

    def load_model(*a, **kw):
        lm = load(*a, **kw)
        lm.backbone.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
        return lm
    monkeypatch.setattr(sample, 'load_model', load_model)
    return seen


@pytest.mark.parametrize('sampler_name', ['ancestral', 'cached', 'analytic'])
def test_prompt_kept_at_every_step(byte_dir, tmp_path, monkeypatch, sampler_name):
    seen = recording_load(monkeypatch)
    path = sample.main([f'--init_from={byte_dir}', '--prompt=Hello, world', '--seq_len=32', '--num_steps=12',
                        '--n_samples=3', '--batch_size=2', f'--sampler={sampler_name}', f'--out_dir={tmp_path}'])
    prompt = torch.tensor([256] + list(b'Hello, world'))
    assert len(seen) >= 2 and all((x[:, :13] == prompt).all() for x in seen)
    out = sample.load_samples(path)
    assert '/cond/' in path and (out['tokens'][:, :13] == prompt.numpy()).all()
    assert (out['prompt_ids'] == prompt.numpy()).all() and out['settings']['sampler'] == sampler_name


def test_cli_sampler_cache_and_add_bos_reach_the_sampler(byte_dir, tmp_path):
    lm = sample.load_model(byte_dir)
    base = [f'--init_from={byte_dir}', '--seq_len=16', '--num_steps=64', '--n_samples=2', '--batch_size=2', '--seed=3',
            f'--out_dir={tmp_path}', '--n_print=0']
    api = lambda **kw: lm.sample(2, 64, 16, seed=sample.batch_seed(3, 0), **{'add_bos': True, **kw}).numpy()
    out = {s: sample.load_samples(sample.main(base + [f'--sampler={s}']))
           for s in ('ancestral', 'analytic', 'cached', 'ancestral_fp32')}
    for s in ('analytic', 'ancestral_fp32'):
        assert not np.array_equal(api(sampler=s), api())  # (the samplers draw differently from one seed)
        assert np.array_equal(out[s]['tokens'], api(sampler=s)) and out[s]['settings']['sampler'] == s
    assert np.array_equal(out['ancestral']['tokens'], api()) and np.array_equal(out['cached']['tokens'], api())
    assert out['ancestral']['settings']['nfe'] == 64 and out['cached']['settings']['nfe'] <= 15  # 15 masked positions
    nobos = sample.load_samples(sample.main(base + ['--add_bos=False']))
    assert np.array_equal(nobos['tokens'], api(add_bos=False)) and (nobos['tokens'][:, 0] != 256).any()
    path = sample.main(base + ['--final_step=draw'])
    drawn = sample.load_samples(path)
    assert path.endswith('_drawlast') and drawn['settings']['final_step'] == 'draw'
    assert np.array_equal(drawn['tokens'], api(final_step='draw'))


class FixedLogits(torch.nn.Module):
    """A 'denoiser' predicting token 0 w.p. 0.6 and token 1 w.p. 0.4 everywhere (MASK, id 2, excluded by the sampler)."""
    def forward(self, x, sigma):
        return torch.tensor([0.6, 0.4, 1.0]).log().expand(*x.shape, 3)


def test_final_step_argmax_or_draw():
    """Positions still masked after the last step: the argmax (MDLM/SDTT) or a float64 draw (DUO). One step stopping
    at t = 0.5 leaves each position masked w.p. m(0.5)/m(1) ~ 1/2; the same seed gives the same step, so the two runs
    differ exactly where the final draw gave token 1: ~0.4 of those positions, ~0.2 of all; the argmax never does."""
    kw = dict(n_samples=64, num_steps=1, seq_len=64, mask_id=2, add_bos=False, eps=0.5, seed=0, device='cpu')
    greedy, _ = diffusion.sample(FixedLogits(), **kw)
    drawn, _ = diffusion.sample(FixedLogits(), final_step='draw', **kw)
    differ = greedy != drawn
    assert (greedy[differ] == 0).all() and (drawn[differ] == 1).all()
    assert 0.17 < differ.double().mean() < 0.23
    with pytest.raises(ValueError, match="final_step must be 'argmax'"):
        diffusion.sample(FixedLogits(), final_step='greedy', **kw)


def test_reference_fp32_sampler_starves_rare_tokens_more_the_more_steps():
    """--sampler=ancestral_fp32 reproduces the reference's float32 joint draw (SPEC §4): at 8 steps it is unbiased,
    at 1024 steps the rare tokens (2e-5 each, 0.02 together: weight p dt ~ 2e-8 against MASK's ~1) get under half
    their share, where the float64 sampler gives them 0.02 (test_diffusion)."""
    from test_diffusion import FixedModel, tail_probs
    p = tail_probs().float()
    share = lambda x: (x >= 10).float().mean().item()
    x, _ = diffusion.sample(FixedModel(p), 256, 8, 64, mask_id=1000, seed=0,
                            step_fn=sample.reference_step(torch.Generator().manual_seed(0)))
    assert abs(share(x) - 0.02) < 0.0044 and abs((x == 0).float().mean().item() - 0.6) < 0.015  # +- 4 sigma
    x, _ = diffusion.sample(FixedModel(p), 32, 1024, 64, mask_id=1000, seed=0,
                            step_fn=sample.reference_step(torch.Generator().manual_seed(0)))
    assert (x != 1000).all() and share(x) < 0.0125  # (0.02 - 2.4 sigma at this size; measured 0.009)


def test_cond_prefix_mode(byte_dir, tmp_path, monkeypatch):
    docs = [('short %d ' % i) * 2 if i % 2 else ('document %d, long enough. ' % i) * 4 for i in range(8)]
    data = tmp_path / 'docs.jsonl'
    data.write_text(''.join(json.dumps({'text': d}) + '\n' for d in docs))
    seen = recording_load(monkeypatch)
    path = sample.main([f'--init_from={byte_dir}', '--mode=cond_prefix', f'--cond_data={data}', '--n_prompts=3',
                        '--min_doc_len=60', '--prefix_len=10', '--cond_len=24', '--n_continuations=2',
                        '--batch_size=4', '--num_steps=8', f'--out_dir={tmp_path}'])
    out = sample.load_samples(path)
    assert list(out['doc_idx']) == [0, 2, 4] and out['tokens'].shape == (6, 24)
    assert (out['settings']['n_samples'], out['settings']['seq_len']) == (6, 24)  # what the file holds
    refs = [list(docs[i].encode())[:24] for i in (0, 2, 4)]  # SPEC §6: document tokens, no BOS
    assert (out['ref_tokens'] == np.array(refs)).all() and (out['prompt_ids'] == out['ref_tokens'][:, :10]).all()
    prompts = torch.tensor(out['prompt_ids']).repeat_interleave(2, 0)
    assert list(out['prompt_index']) == [0, 0, 1, 1, 2, 2]
    assert (out['tokens'][:, :10] == prompts.numpy()).all()
    # every row the network sees (at every step; batches of 4 and 2 rows) starts with one of the prompts
    assert all((row[:10] == prompts).all(1).any() for x in seen for row in x)
    first = path  # the same settings but other prompts: another file (not "exists", nor overwritten)
    path = sample.main([f'--init_from={byte_dir}', '--mode=cond_prefix', f'--cond_data={data}', '--n_prompts=3',
                        '--min_doc_len=60', '--prefix_len=10', '--cond_len=24', '--n_continuations=2',
                        '--batch_size=4', '--num_steps=8', f'--out_dir={tmp_path}', '--prefix_bos=True'])
    assert path != first
    out = sample.load_samples(path)  # framed as training rows: BOS + document
    assert (out['ref_tokens'] == np.array([[256] + r[:23] for r in refs])).all()


def test_cond_prefix_documents_bad_lines_are_named(tmp_path):
    tok, path = sample.get_tokenizer('byte'), tmp_path / 'docs.jsonl'
    good = json.dumps({'text': 'a document long enough'}) + '\n'
    for bad, problem in [('{"text": "cut sh', 'not JSON'), ('[1]', 'not a JSON object but list'),
                         ('{"txt": "a typo"}', "no field 'text'"), ('{"text": 7}', "field 'text' is 7, not str")]:
        path.write_text(good + '\n' + bad + '\n' + good)  # (was: a bare traceback, no file or line)
        with pytest.raises(ValueError, match=f'{path}:3: .*{re.escape(problem)}'):
            sample.load_prefixes(str(path), tok, n_prompts=2, prefix_len=2, cond_len=4, min_doc_len=4)
    path.write_text(good + '\n' + good)
    assert sample.load_prefixes(str(path), tok, n_prompts=2, prefix_len=2, cond_len=4, min_doc_len=4)[2] == [0, 2]


def test_files_round_trip_and_overwrite(byte_dir, tmp_path, capsys):
    argv = [f'--init_from={byte_dir}', '--seq_len=24', '--num_steps=6', '--n_samples=3', '--batch_size=2',
            '--seed=5', f'--out_dir={tmp_path}']
    path = sample.main(argv)
    assert path.startswith(str(tmp_path / 'samples' / 'uncond'))
    out = sample.load_samples(path)
    assert out['tokens'].shape == (3, 24) and out['tokens'].dtype == np.int64
    st = out['settings']
    assert (st['num_steps'], st['seed'], st['sampler'], st['nfe'], st['meta']['tokenizer']) == (6, 5, 'ancestral', 6.0, 'byte')
    lines = [json.loads(l) for l in open(path + '.jsonl')]
    tok = sample.get_tokenizer('byte')
    assert [l['text'] for l in lines] == tok.batch_decode(out['tokens'])
    assert 'tokens/s' in capsys.readouterr().out
    with pytest.raises(FileExistsError, match='overwrite'):
        sample.main(argv)
    assert sample.main(argv + ['--overwrite=True']) == path
    assert not [f for f in os.listdir(os.path.dirname(path)) if f.startswith('.tmp') or f.endswith('.lock')]
    # another sample.py writing the same file: refused, naming it (the two used to interleave their writes)
    d, name = os.path.dirname(path), f'.{os.path.basename(path)}.lock'
    holder = subprocess.Popen([sys.executable, '-c', f'import fileio, time; fileio.run_lock({d!r}, {name!r}); '
                               'print(1, flush=True); time.sleep(60)'], cwd=ROOT, stdout=subprocess.PIPE)
    try:
        holder.stdout.readline()
        with pytest.raises(RuntimeError, match=f'is in use by pid {holder.pid}'):
            sample.main(argv + ['--overwrite=True'])
    finally:
        holder.kill()
        holder.wait()
    umask = os.umask(0)
    os.umask(umask)
    for ext in ('.npz', '.jsonl'):  # as open() creates files, not owner-only (mkstemp's temporary file)
        assert os.stat(path + ext).st_mode & 0o777 == 0o666 & ~umask
    again = sample.load_samples(path)
    assert (again['tokens'] == out['tokens']).all()  # same seed, same samples


def test_an_overwrite_cut_short_never_pairs_an_npz_with_other_samples_text(tmp_path, monkeypatch):
    path = str(tmp_path / 'x')
    sample.save_samples(path, np.zeros((2, 4)), {'seed': 1}, ['old 0', 'old 1'])
    real = sample.write_atomic

    def jsonl_fails(p, write):
        if p.endswith('.jsonl'):
            raise OSError('a kill between the two files')
        real(p, write)
    monkeypatch.setattr(sample, 'write_atomic', jsonl_fails)
    with pytest.raises(OSError):
        sample.save_samples(path, np.ones((2, 4)), {'seed': 2}, ['new 0', 'new 1'])
    texts = [json.loads(line)['text'] for line in open(path + '.jsonl')]
    # (was: the new .jsonl beside the old .npz when the .npz write failed; now no .npz, the new one staged)
    assert not os.path.exists(path + '.npz') or (texts[0] == 'old 0' and not sample.load_samples(path)['tokens'].any())
    with np.load(path + '.npz.new') as staged:
        assert json.loads(str(staged['settings'])) == {'seed': 2}


def test_global_seed_makes_unseeded_sampling_reproducible(byte_dir, ar_dir):
    """seed=None takes its seed from the global generator (as torch.manual_seed users expect) and leaves the stream
    reproducible after the call, instead of reseeding it at random."""
    for path in (byte_dir, ar_dir):
        lm = sample.load_model(path)
        runs = []
        for _ in range(2):
            torch.manual_seed(0)
            runs.append((lm.sample(2, 4, 16), torch.rand(3)))
        assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_two_runs_rounds_get_their_own_sample_files(tmp_path):
    """Every distill run writes round_{r}_steps_{n}/: the run directory is part of the sample file name."""
    paths = [sample.main([f'--init_from={tiny_dir(tmp_path / run / "round_1_steps_4", 258)}', '--seq_len=16',
                          '--num_steps=4', '--n_samples=1', f'--out_dir={tmp_path}', '--n_print=0'])
             for run in ('kld_run', 'mse_run')]
    assert [os.path.basename(p).split('_ancestral')[0] for p in paths] == ['kld_run-round_1_steps_4',
                                                                           'mse_run-round_1_steps_4']


def test_two_processes_equal_one(byte_dir, tmp_path):
    argv = [f'--init_from={byte_dir}', '--seq_len=24', '--num_steps=6', '--n_samples=5', '--batch_size=2',
            '--seed=7', '--device=cpu']
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers below: a matmul's sums can depend on the thread count (a flipped draw)
    try:
        one = sample.load_samples(sample.main(argv + [f'--out_dir={tmp_path / "one"}']))
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                        str(ROOT / 'sample.py'), *argv, f'--out_dir={tmp_path / "two"}'],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    files = list((tmp_path / 'two' / 'samples' / 'uncond').glob('*.npz'))
    assert len(files) == 1
    two = sample.load_samples(str(files[0]))
    assert two['settings']['world_size'] == 2 and np.array_equal(one['tokens'], two['tokens'])
    assert two['settings']['nfe'] == one['settings']['nfe']


def test_bad_input(byte_dir, tmp_path, capsys):
    base = [f'--init_from={byte_dir}', f'--out_dir={tmp_path}']
    with pytest.raises(ValueError, match='no room to generate'):
        sample.main(base + ['--seq_len=8', '--prompt=a prompt longer than eight bytes'])
    with pytest.raises(ValueError, match='exceeds the model block size 64'):
        sample.main(base + ['--seq_len=128'])
    with pytest.raises(ValueError, match='num_steps'):
        sample.main(base + ['--num_steps=0'])
    with pytest.raises(ValueError, match='seq_len=1 leaves no position to sample after BOS'):  # (was: BOS, exit 0)
        sample.main(base + ['--seq_len=1'])
    capsys.readouterr()
    sample.main(base + ['--seq_len=4', '--num_steps=20', '--n_samples=1'])  # (was: minutes without a word at 100000)
    assert 'warning: num_steps=20 > 4 positions: most steps reveal nothing' in capsys.readouterr().out
    with pytest.raises(ValueError, match="sampler must be one of"):
        sample.main(base + ['--sampler=ddim'])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match='CUDA is not available'):
            sample.main(base + ['--device=cuda'])
    lm = sample.load_model(byte_dir)
    with pytest.raises(ValueError, match='num_steps must be an integer >= 1'):
        lm.sample(2, 0, 16)
    with pytest.raises(ValueError, match='seq_len must be'):
        lm.sample(2, 4, 65)
    with pytest.raises(FileNotFoundError, match='no checkpoint'):
        sample.load_model(str(tmp_path / 'missing' / 'ckpt.pt'))
    junk = tmp_path / 'notes.pt'
    junk.write_text('not a checkpoint')
    with pytest.raises(ValueError, match='not a readable checkpoint'):
        sample.load_model(str(junk))
    with pytest.raises(ValueError, match='needs cond_data'):
        sample.main(base + ['--mode=cond_prefix'])
    with pytest.raises(ValueError, match='cond_len <= min_doc_len'):  # short documents: references of cond_len
        sample.main(base + ['--mode=cond_prefix', '--cond_data=x.jsonl', '--min_doc_len=5', '--cond_len=40'])
    with pytest.raises(ValueError, match='n_prompts'):
        sample.main(base + ['--mode=cond_prefix', '--cond_data=x.jsonl', '--n_prompts=0'])
    # a vocabulary that does not match the named tokenizer fails before sampling, not after it (nothing written)
    bad = tiny_dir(tmp_path / 'v300', 300)
    cfg = json.loads((tmp_path / 'v300' / 'config.json').read_text())
    cfg['meta'].update(tokenizer='byte', bos_id=256, eos_id=256)
    (tmp_path / 'v300' / 'config.json').write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match='tokenizer byte has 258 ids, the model 300'):
        sample.main([f'--init_from={bad}', f'--out_dir={tmp_path / "v300_out"}', '--verbose=True'])
    assert not (tmp_path / 'v300_out').exists()
    r = subprocess.run([sys.executable, str(ROOT / 'sample.py'), f'--init_from={tmp_path / "missing"}'],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 1 and 'sample.py: error: no checkpoint' in r.stderr


def naive_ar(model, x, forced, u, mask_id):
    """Autoregressive sampling without a cache: a full forward of the whole prefix for every position."""
    x = x.clone()
    for t in range(1, x.shape[1]):
        if not forced[:, t].all():
            logits = model(x[:, :t])[:, -1, :mask_id]
            x[:, t] = torch.where(forced[:, t], x[:, t], diffusion.draw_categorical(logits, u[:, t]))
    return x


def test_ar_kv_cache_sampling_equals_naive_loop(ar_dir):
    """With the same uniforms (one per position, drawn upfront from the seed), sampling with the KV cache gives
    exactly the tokens of the naive loop: unconditional, a prompt per row, and a position forced in one row only."""
    lm = sample.load_model(ar_dir)
    model, L, n = lm.backbone, 40, 4
    u = lambda seed: torch.rand((n, L), dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    prior = torch.full((n, L), 257)
    prior[:, 0] = 256
    x, nfe = sample.sample_ar(model, n, L, seed=3)
    assert x.dtype == torch.int64 and nfe == L - 1 and (x[:, 0] == 256).all() and not (x == 257).any()
    assert torch.equal(x, naive_ar(model, prior, prior != 257, u(3), 257))
    assert torch.equal(lm.sample(n, 123, L, seed=3), x)  # the release API dispatches (num_steps is ignored)
    prompts = torch.randint(0, 256, (n, 7))
    prompts[:, 0] = 256
    x, nfe = sample.sample_ar(model, n, L, project_fn=sample.clamp_prefix(prompts), seed=4)
    p = sample.clamp_prefix(prompts)(prior.clone())
    assert nfe == L - 7 and torch.equal(x[:, :7], prompts) and torch.equal(x, naive_ar(model, p, p != 257, u(4), 257))

    def one_row(x):  # position 5 of row 1 only: not a common prefix, forced inside the decoding loop
        x[1, 5] = ord('q')
        return x
    x, _ = sample.sample_ar(model, n, L, project_fn=one_row, seed=5)
    p = one_row(prior.clone())
    assert x[1, 5] == ord('q') and torch.equal(x, naive_ar(model, p, p != 257, u(5), 257))
    with pytest.raises(ValueError, match='needs a first token'):
        lm.sample(2, 4, 16, add_bos=False)
    with pytest.raises(ValueError, match='needs a causal model'):
        sample.sample_ar(DiT(DiTConfig(vocab_size=258, block_size=16, n_layer=1, n_head=2, n_embd=32)), 2, 16)


def test_ar_cli_writes_samples(ar_dir, tmp_path, capsys):
    argv = [f'--init_from={ar_dir}', '--seq_len=24', '--n_samples=3', '--batch_size=2', '--seed=5',
            '--num_steps=6', f'--out_dir={tmp_path}']
    path = sample.main(argv)
    assert os.path.basename(path) == 'ar0-model_ar_L24_n3_s5' and '/uncond/' in path
    out = sample.load_samples(path)
    assert out['tokens'].shape == (3, 24) and (out['tokens'][:, 0] == 256).all() and not (out['tokens'] == 257).any()
    st = out['settings']
    assert (st['sampler'], st['num_steps'], st['nfe'], st['meta']['tokenizer']) == ('ar', None, 23.0, 'byte')
    lines = [json.loads(l) for l in open(path + '.jsonl')]
    assert [l['text'] for l in lines] == sample.get_tokenizer('byte').batch_decode(out['tokens'])
    assert 'autoregressive, KV cache' in capsys.readouterr().out
    # batch i uses the seed batch_seed(seed, i), as for diffusion: the same rows from the Python API
    lm = sample.load_model(ar_dir)
    rows = [lm.sample(b, 1, 24, seed=sample.batch_seed(5, i)) for i, b in enumerate((2, 1))]
    assert np.array_equal(torch.cat(rows).numpy(), out['tokens'])
    path = sample.main(argv + ['--prompt=Hello'])  # the prompt is forced after BOS
    out = sample.load_samples(path)
    assert '/cond/' in path and (out['tokens'][:, :6] == np.array([256] + list(b'Hello'))).all()
    assert out['settings']['nfe'] == 24 - 6


def test_every_sampler_refuses_nan_logits(byte_dir, ar_dir, tmp_path):
    """A diverged model (NaN logits) must not pass for one that samples the last token everywhere."""
    for path, samplers in ((byte_dir, [*sample.SAMPLERS, 'cached']), (ar_dir, ['ancestral'])):
        lm = sample.load_model(path)
        lm.backbone.output_layer.linear.bias.data[5] = float('nan')
        for s in samplers:
            with pytest.raises(FloatingPointError, match='NaN/inf logits'):
                lm.sample(2, 4, 12, seed=0, cache=s == 'cached', sampler='ancestral' if s == 'cached' else s)
    r = subprocess.run([sys.executable, str(ROOT / 'sample.py'), f'--init_from={save_nan_model(byte_dir)}',
                        '--seq_len=12', '--num_steps=4', '--n_samples=2', '--n_print=0', f'--out_dir={tmp_path}'],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 1 and 'sample.py: error:' in r.stderr and 'NaN/inf' in r.stderr
    assert not list(tmp_path.rglob('*.npz'))  # no sample file written


def save_nan_model(path):
    m = sample.load_model(path).backbone
    m.output_layer.linear.bias.data[:] = float('inf')
    return save_pretrained(m, path + '_nan', meta=m.meta)


def test_sampling_runs_in_eval_mode_and_restores_train_mode(byte_dir, ar_dir):
    """Dropout off while sampling (MDLM's restore_model_and_sample), whatever mode the caller left the model in."""
    for path in (byte_dir, ar_dir):
        lm = sample.load_model(path)
        lm.backbone.config.dropout = 0.5
        for mod in lm.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.5
        want = lm.eval().sample(3, 6, 24, seed=1)
        assert torch.equal(lm.train().sample(3, 6, 24, seed=1), want) and lm.training and lm.backbone.training


def test_project_fn_that_forgets_to_return_is_named(byte_dir):
    lm = sample.load_model(byte_dir)

    def forgets(x):
        x[:, 1] = 65
    with pytest.raises(TypeError, match='project_fn must return the token tensor.*return x'):
        lm.sample(2, 4, 12, seed=0, project_fn=forgets)


def test_cli_defaults_come_from_the_checkpoint(tmp_path):
    """No --seq_len / --num_steps: the model's block size and a student's own step count (a round directory's meta),
    not 1024 tokens (more than a tiny model's block) and 32 steps."""
    torch.manual_seed(0)
    m = DiT(DiTConfig(vocab_size=258, block_size=24, n_layer=1, n_head=2, n_embd=32, cond_dim=16))
    student = save_pretrained(m, str(tmp_path / 'run' / 'round_2_steps_4'), meta=dict(default_meta(258), round=2,
                                                                                     num_sampling_steps=4))
    s = sample.load_samples(sample.main([f'--init_from={student}', '--n_samples=2', f'--out_dir={tmp_path}',
                                         '--n_print=0']))
    assert s['tokens'].shape == (2, 24) and (s['settings']['num_steps'], s['settings']['seq_len']) == (4, 24)
    teacher = save_pretrained(m, str(tmp_path / 'teacher'), meta=default_meta(258))  # no step count of its own
    assert sample.load_samples(sample.main([f'--init_from={teacher}', '--n_samples=1', f'--out_dir={tmp_path}',
                                            '--n_print=0']))['settings']['num_steps'] == 32
