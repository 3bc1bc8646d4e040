"""distill.py: SDTT targets and divergences, rounds, exact resume after kill -9, DDP == one process, mdlm/ar training."""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import diffusion as D
import distill
from model import DiT, DiTConfig, load_pretrained, save_pretrained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V, MASK, L = 258, 257, 32
TINY = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--cond_dim=32', f'--block_size={L}', '--batch_size=4',
        '--global_batch_size=8', '--warmup_iters=5', '--eval_iters=1', '--eval_interval=1000', '--device=cpu']


def write_data(d, vocab_size=V, tokenizer='byte', n_train=128, n_val=16):
    """A toy repetitive corpus in the prepare_data layout: [BOS] a b c a b c ... [EOS], random phase."""
    rng = np.random.default_rng(0)
    os.makedirs(d, exist_ok=True)
    for split, n in (('train', n_train), ('val', n_val)):
        rows = ((np.arange(L)[None] + rng.integers(0, 3, (n, 1))) % 3 + 97).astype(np.uint16)
        rows[:, 0] = rows[:, -1] = 256
        rows.tofile(os.path.join(d, f'{split}.bin'))
    meta = dict(tokenizer=tokenizer, vocab_size=vocab_size, bos_id=256, eos_id=256, mask_id=vocab_size - 1, row_len=L,
                n_train_rows=n_train, n_val_rows=n_val)
    with open(os.path.join(d, 'meta.json'), 'w') as f:
        json.dump(meta, f)
    return d


def read_log(out_dir, key='loss'):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return {r["step"]: r[key] for r in (json.loads(l) for l in f if l.endswith("\n")) if key in r}


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    # tiny models: one thread is faster, and on a busy machine 2 spinning OpenMP threads are 30x slower
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return write_data(str(tmp_path_factory.mktemp('data')))


@pytest.fixture(scope='module')
def teacher_dir(data, tmp_path_factory):
    """A tiny MDLM trained for 40 steps: the teacher of the sdtt tests (and the mdlm learning test)."""
    out = str(tmp_path_factory.mktemp('mdlm'))
    distill.main(TINY + ['--objective=mdlm', '--init_from=scratch', f'--data_dir={data}', f'--out_dir={out}',
                         '--max_iters=40', '--learning_rate=3e-3', '--log_interval=5'])
    return out


def sdtt_args(data, teacher_dir, out, *extra):
    return TINY + ['--objective=sdtt', f'--init_from={teacher_dir}', f'--data_dir={data}', f'--out_dir={out}',
                   '--learning_rate=1e-3', '--log_interval=1', *extra]


def random_dit(seed=0):
    torch.manual_seed(seed)
    m = DiT(DiTConfig(vocab_size=V, block_size=L, n_layer=2, n_head=2, n_embd=32, cond_dim=32, dropout=0.0))
    for p in m.parameters():  # the zero-initialised output/adaLN layers would give uniform predictions
        torch.nn.init.normal_(p, std=0.3)
    return m.eval()


# --------------------------------------------------------------------------------------------- targets, divergences
def test_teacher_equal_student_and_k1_gives_zero_kld():
    m = random_dit()
    torch.manual_seed(1)
    x0 = torch.randint(0, 256, (4, L))
    b = distill.draw_noise(x0, 'sdtt', MASK, 1e-5, 1 / 64, K=1)
    target = distill.teacher_targets(m, b, 1, MASK)
    logits = m(b['xt'], D.sigma(b['t']), b['pos'])
    assert logits.shape == (len(b['pos']), V) and len(b['pos']) == (b['xt'] == MASK).sum()
    ls, lt = distill.real_log_probs(logits, MASK), distill.real_log_probs(target, MASK)
    for name in distill.DIVERGENCES:
        assert distill.sdtt_divergence(ls, lt, name).abs() < 1e-5, name
    # K=2: the teacher moves, the loss is positive, and nothing is NaN (the mask column and carried-over tokens)
    torch.manual_seed(2)
    b2 = distill.draw_noise(x0, 'sdtt', MASK, 1e-5, 0.2, K=2)
    loss = distill.training_loss(distill.Objective(m, 'sdtt', MASK), b2, m, 2, MASK)
    loss.backward()
    assert loss > 1e-4 and all(torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.parametrize('schedule', list(D.NOISE_SCHEDULES))
def test_losses_at_the_masked_positions_equal_the_full_formulas(schedule):
    """The output layer runs only at the masked positions: the same losses and gradients as on full [B, L, V] logits
    (the NELBO weighted by the schedule given)."""
    x0 = torch.randint(0, 256, (4, L), generator=torch.Generator().manual_seed(0))
    for objective in ('mdlm', 'sdtt'):
        torch.manual_seed(3)
        b = distill.draw_noise(x0, objective, MASK, 1e-3, 0.05, K=2, schedule=schedule)
        xt, t, pos = b['xt'], b['t'], b['pos']
        target = torch.randn(len(pos), V) if objective == 'sdtt' else None  # the teacher's logits
        grads = []
        for fast in (True, False):
            m = random_dit()
            if fast:
                loss = distill.Objective(m, objective, MASK, schedule=schedule)(x0, xt, t, pos, target)
            else:
                logits = m(xt, D.sigma(t))
                assert torch.allclose(m(xt, D.sigma(t), pos), logits.flatten(0, 1)[pos], atol=1e-5)
                if objective == 'mdlm':
                    loss = D.mdlm_loss(logits, x0, xt, t, MASK, schedule=schedule)
                else:  # reverse KL averaged over the positions masked in x_t, on the full tensor
                    ls, masked = distill.real_log_probs(logits, MASK), xt == MASK
                    lt = torch.zeros_like(ls)
                    lt.view(-1, MASK)[pos] = distill.real_log_probs(target, MASK)
                    loss = ((ls.exp() * (ls - lt)).sum(-1) * masked).sum() / masked.sum()
            loss.backward()
            grads.append((loss.detach(), [p.grad for p in m.parameters()]))
        (l1, g1), (l2, g2) = grads
        torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
        for a, c in zip(g1, g2):
            torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(shutil.which('g++') is None and shutil.which('c++') is None, reason='inductor on CPU needs a C++ compiler')
def test_compiled_objective_and_teacher_match_eager():
    """compile=True runs the teacher and the student's network + loss as compiled graphs whose number of
    masked positions M changes every step (compiled once, for a dynamic M): same losses and gradients."""
    torch._dynamo.reset()
    m = random_dit()
    eager = distill.Objective(m, 'sdtt', MASK), m
    compiled = torch.compile(eager[0]), torch.compile(eager[1])
    sizes = set()
    for i in range(3):
        torch.manual_seed(10 + i)
        b = distill.draw_noise(torch.randint(0, 256, (4, L)), 'sdtt', MASK, 1e-3, 0.05, 2)
        sizes.add(len(b['pos']))
        out = []
        for objective_fn, teacher in (eager, compiled):
            m.zero_grad()
            loss = distill.training_loss(objective_fn, b, teacher, 2, MASK)
            loss.backward()
            out.append((loss.detach(), [p.grad.clone() for p in m.parameters()]))
        torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-4, atol=1e-7)
        for a, c in zip(out[0][1], out[1][1]):
            torch.testing.assert_close(a, c, rtol=1e-3, atol=1e-6)
    assert len(sizes) == 3  # three different M, all through the compiled graphs


def test_divergence_formulas():
    g = torch.Generator().manual_seed(0)
    ls, lt = torch.log_softmax(torch.randn(5, 9, generator=g), -1), torch.log_softmax(torch.randn(5, 9, generator=g), -1)
    ps, pt = ls.exp(), lt.exp()
    expected = dict(kld=(ps * (ls - lt)).sum(-1), kl_fwd=(pt * (lt - ls)).sum(-1), mse=((ls - lt) ** 2).sum(-1) / 10,
                    tvd=(ls - lt).abs().sum(-1), tvd_true=0.5 * (ps - pt).abs().sum(-1))
    for name, per_position in expected.items():  # averaged over the positions
        torch.testing.assert_close(distill.sdtt_divergence(ls, lt, name), per_position.mean())
        assert distill.sdtt_divergence(ls, lt, name) > 0


@pytest.mark.parametrize('name', list(distill.DIVERGENCES))
def test_every_divergence_is_zero_at_the_teacher_positive_elsewhere_and_pulls_the_student_to_it(name):
    """For every entry of the table: 0 where the student equals the teacher, > 0 elsewhere, and following its gradient
    (Adam on the student's logits) brings the student's distribution close to the teacher's (in total variation)."""
    g = torch.Generator().manual_seed(0)
    lt = torch.log_softmax(2 * torch.randn(6, 9, generator=g), -1)
    z0 = 2 * torch.randn(6, 9, generator=g)
    assert distill.sdtt_divergence(lt.clone(), lt, name).abs() < 1e-6
    d = distill.DIVERGENCES[name](torch.log_softmax(z0, -1), lt)  # per position
    assert d.shape == (6,) and (d > 1e-3).all(), d
    z = z0.clone().requires_grad_()
    opt = torch.optim.Adam([z], lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        distill.sdtt_divergence(torch.log_softmax(z, -1), lt, name).backward()
        opt.step()
    tv = lambda z: 0.5 * (torch.softmax(z, -1) - lt.exp()).abs().sum(-1)
    assert (tv(z.detach()) < 0.25 * tv(z0)).all(), (tv(z0), tv(z.detach()))


def test_ar_objective_is_next_token_cross_entropy():
    torch.manual_seed(0)
    net = DiT(DiTConfig(vocab_size=V, block_size=L, n_layer=1, n_head=2, n_embd=16, cond_dim=8, dropout=0, causal=True))
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x0 = torch.randint(0, MASK, (3, L))
    ref = F.cross_entropy(net(x0[:, :-1])[..., :MASK].flatten(0, 1), x0[:, 1:].flatten())
    torch.testing.assert_close(distill.Objective(net, 'ar', MASK)(x0), ref)


class FakeTeacher(torch.nn.Module):
    """Deterministic: call k puts (almost) all mass on token (5k + position) mod 257; records its inputs. Its raw MASK
    logit is the largest (as an untrained one can be): SUBS gives MASK probability 0, so no draw may pick it."""
    def __init__(self):
        super().__init__()
        self.calls = []

    @staticmethod
    def logits(x, k):
        tok = (5 * k + torch.arange(x.shape[1])) % MASK
        logits = torch.zeros(*x.shape, V).scatter_(-1, tok.expand_as(x)[..., None], 40.0)
        logits[..., MASK] = 60.0
        return logits

    def forward(self, x, sigma, positions):
        self.calls.append((x.clone(), sigma.clone()))
        return self.logits(x, len(self.calls) - 1).flatten(0, 1)[positions]


@pytest.mark.parametrize('schedule', list(D.NOISE_SCHEDULES))
def test_targets_follow_the_spec_on_a_hand_built_teacher(schedule):
    B, n, K, dt = 2, 4096, 3, 0.05
    torch.manual_seed(0)
    x0 = torch.randint(0, 256, (B, n))
    b = distill.draw_noise(x0, 'sdtt', MASK, 1e-5, dt, K, schedule=schedule)
    t, xt, pos = b['t'], b['xt'], b['pos']
    assert (t > K * dt).all(), t  # (this seed: every teacher step is a full one, no clamping at the end)
    teacher = FakeTeacher()
    target = distill.real_log_probs(distill.teacher_targets(teacher, b, K, MASK, schedule=schedule), MASK)
    xs = [c[0] for c in teacher.calls]
    assert len(xs) == K and torch.equal(xs[0], xt)
    for k in range(K):  # teacher step k runs at t - k dt
        torch.testing.assert_close(teacher.calls[k][1], D.sigma(t - k * dt, schedule))
    # everything below at the M positions masked in x_t (flat indices pos), the only ones with a target
    step_logp = [distill.real_log_probs(FakeTeacher.logits(x, k), MASK).flatten(0, 1)[pos] for k, x in enumerate(xs)]
    xm = [x.flatten()[pos] for x in xs]
    row = pos // n
    for k in range(K - 1):
        revealed = (xm[k] == MASK) & (xm[k + 1] != MASK)
        # revealed tokens are draws from the teacher's prediction of step k (here deterministic)
        assert torch.equal(xm[k + 1][revealed], ((5 * k + pos % n) % MASK)[revealed])
        # ... and their target is the teacher's full distribution of step k
        assert torch.equal(target[revealed], step_logp[k][revealed])
        # reveal probability 1 - m(s)/m(t_k) per masked position
        tk = t - k * dt
        p = 1 - D.move_chance(tk - dt, schedule) / D.move_chance(tk, schedule)
        still = torch.bincount(row, xm[k] == MASK, B)
        frac = torch.bincount(row, revealed, B) / still
        assert ((frac - p).abs() < 5 * (p * (1 - p) / still).sqrt()).all(), (frac, p)  # (a schedule with small m(t)
        # masks few tokens: at 4 sigma one seed of 300 fails for m = t^2; unbiased, measured)
    still = xm[-1] == MASK  # not revealed before the last step: the last step's distribution
    assert torch.equal(target[still], step_logp[-1][still])
    assert torch.equal(xs[-1][xt != MASK], xt[xt != MASK])  # unmasked tokens never change


def test_reference_time_grid():
    t = torch.tensor([0.5, 0.9, 1e-4], dtype=torch.float64)
    intended = distill.teacher_times(t, 0.1, 2)
    torch.testing.assert_close(intended, torch.tensor([[0.5, 0.9, 1e-4], [0.4, 0.8, 1e-5]], dtype=torch.float64))
    ref = distill.teacher_times(t, 0.1, 2, reference_grid=True)
    # t*space + (1 - t)*t_end with space = [1, 0] and t_end = t - K dt, clamped at 1e-5
    expected = torch.tensor([[0.5 + 0.5 * 0.3, 0.9 + 0.1 * 0.7, 1e-5], [0.5 * 0.3, 0.1 * 0.7, 1e-5]], dtype=torch.float64)
    torch.testing.assert_close(ref, expected)
    # so the reference's first step reveals a factor ~1/(2 - t) fewer tokens: dt / t_0 vs dt / t
    assert abs(ref[0, 0] / intended[0, 0] - (2 - 0.5)) < 0.3


# --------------------------------------------------------------------------------------------- training runs
@pytest.mark.parametrize('objective', list(distill.OBJECTIVES))
def test_every_objective_trains_validates_saves_and_resumes(data, teacher_dir, tmp_path, objective):
    out = str(tmp_path / objective)
    init = teacher_dir if objective == 'sdtt' else 'scratch'
    args = TINY + [f'--objective={objective}', f'--init_from={init}', f'--data_dir={data}', f'--out_dir={out}',
                   '--log_interval=1', '--eval_interval=2']
    assert distill.main(args + ['--max_iters=2']) == 0
    assert distill.main(args + ['--max_iters=3', '--init_from=resume']) == 0
    losses, val = read_log(out), read_log(out, distill.OBJECTIVES[objective])
    assert sorted(losses) == [1, 2, 3] and sorted(val) == [2, 3] and all(map(math.isfinite, [*losses.values(), *val.values()]))
    model = load_pretrained(out)
    assert model.meta['objective'] == objective and model.meta['step'] == 3


def test_cosine_schedule_is_recorded_and_followed_by_sdtt(data, teacher_dir, tmp_path):
    with pytest.raises(ValueError, match=r"keeps its own .*noise_schedule='cosine' \(the model: 'loglinear'\)"):
        distill.main(sdtt_args(data, teacher_dir, str(tmp_path / 'x'), '--noise_schedule=cosine', '--max_iters=1'))
    teacher = str(tmp_path / 'cosine')
    distill.main(TINY + ['--objective=mdlm', '--init_from=scratch', f'--data_dir={data}', f'--out_dir={teacher}',
                         '--max_iters=2', '--noise_schedule=cosine'])
    assert load_pretrained(teacher).meta['noise_schedule'] == 'cosine'
    out = str(tmp_path / 'sdtt')
    distill.main(sdtt_args(data, teacher, out, '--max_iters=2', '--round_every=2', '--teacher_num_steps=16'))
    assert load_pretrained(os.path.join(out, 'round_1_steps_8')).meta['noise_schedule'] == 'cosine'
    assert torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)['config']['noise_schedule'] == 'cosine'


def test_mdlm_and_ar_losses_go_down(data, teacher_dir, tmp_path):
    mdlm = read_log(teacher_dir)
    assert mdlm[40] < 0.5 * mdlm[5], mdlm
    assert read_log(teacher_dir, 'val_nelbo')[40] < 2.0
    distill.main(TINY + ['--objective=ar', '--init_from=scratch', f'--data_dir={data}', f'--out_dir={tmp_path}',
                         '--max_iters=30', '--learning_rate=3e-3', '--log_interval=5'])
    ar = read_log(str(tmp_path))
    assert ar[30] < 0.5 * ar[5], ar
    assert load_pretrained(str(tmp_path)).config.causal  # the AR judge loads like any other checkpoint


def test_warmup_clipping_ema_and_sdtt_defaults(data, teacher_dir, tmp_path, monkeypatch):
    clips, noise_args = [], []
    clip, draw_noise = torch.nn.utils.clip_grad_norm_, distill.draw_noise
    monkeypatch.setattr(torch.nn.utils, 'clip_grad_norm_', lambda p, max_norm, *a, **k: (clips.append(max_norm),
                                                                                          clip(p, max_norm, *a, **k))[1])
    monkeypatch.setattr(distill, 'draw_noise', lambda *a: (noise_args.append(a), draw_noise(*a))[1])
    out = str(tmp_path / 'warm')
    distill.main(sdtt_args(data, teacher_dir, out, '--max_iters=3', '--warmup_iters=5', '--grad_clip=0.5'))
    assert clips == [0.5] * 3
    lrs = read_log(out, 'lr')
    assert [lrs[s] for s in (1, 2, 3)] == pytest.approx([1e-3 * s / 6 for s in (1, 2, 3)])  # linear warm-up, 5 steps
    # SDTT's lowest training t is 1e-5 (MDLM's: 1e-3), on the intended teacher grid
    assert {(a[3], a[6]) for a in noise_args} == {(1e-5, False)}
    # EMA with warm-up as MDLM's ema.py: the first update decays by min(0.9999, 2/11): ema = 2/11 start + 9/11 model
    out = str(tmp_path / 'one')
    distill.main(sdtt_args(data, teacher_dir, out, '--max_iters=1'))
    ck = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    for k, v in ck['model'].items():
        torch.testing.assert_close(ck['ema'][k], 2 / 11 * ck['teacher'][k] + 9 / 11 * v, rtol=1e-5, atol=1e-6)


def test_rounds_double_dt_copy_the_student_and_stop(data, teacher_dir, tmp_path):
    out = str(tmp_path)
    # teacher 16 steps, K=2: rounds give students of 8 and 4 steps; a third (2 < 4 steps) is not started
    distill.main(sdtt_args(data, teacher_dir, out, '--max_iters=100', '--round_every=3', '--teacher_num_steps=16',
                           '--min_num_sampling_steps=4', '--ckpt_interval=100'))
    dts = read_log(out, 'dt')
    dt0 = (1 - 1e-5) / 16
    assert sorted(dts) == [1, 2, 3, 4, 5, 6]  # stopped at the end of round 2
    assert read_log(out, 'round_done') == {3: 1, 6: 2}  # (evaluate.plot_training's round boundaries)
    assert [dts[s] for s in (1, 3, 4, 6)] == pytest.approx([dt0, dt0, 2 * dt0, 2 * dt0])
    assert sorted(os.listdir(out)) == ['ckpt.pt', 'log.jsonl', 'round_1_steps_8', 'round_2_steps_4']
    ckpt = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    assert ckpt['step'] == 6 and ckpt['round'] == 2 and ckpt['dt'] == pytest.approx(4 * dt0)
    for k, v in ckpt['model'].items():  # the last boundary copied the raw student into the teacher
        assert torch.equal(ckpt['teacher'][k], v), k
    original = load_pretrained(teacher_dir)
    assert not torch.equal(ckpt['teacher']['blocks.0.attn_qkv.weight'], original.state_dict()['blocks.0.attn_qkv.weight'])
    student = load_pretrained(os.path.join(out, 'round_1_steps_8'))
    assert student.meta['round'] == 1 and student.meta['num_sampling_steps'] == 8 and student.meta['mask_id'] == MASK
    tokens, nfe = D.sample(student, 2, student.meta['num_sampling_steps'], L, seed=0)
    assert tokens.shape == (2, L) and (tokens != MASK).all()


@pytest.mark.parametrize('K', [2, 3, 4])
def test_rounds_follow_k(data, teacher_dir, tmp_path, K):
    """K teacher steps per student step: round r trains with dt = (1 - 1e-5) / n * K^r and writes the student that
    samples with n / K^r steps (its directory name and meta); a step count K^r does not divide is an error."""
    n, out = K ** 3, str(tmp_path / 'run')
    args = ('--round_every=2', '--min_num_sampling_steps=1', f'--num_distill_steps={K}', '--max_iters=100')
    with pytest.raises(ValueError, match=rf'divisible by {K}\^3 = {K ** 3} \(e\.g\. {K ** 3}, {2 * K ** 3}\)'):
        distill.main(sdtt_args(data, teacher_dir, out, *args, f'--teacher_num_steps={n + 1}'))
    assert not os.path.exists(out)
    distill.main(sdtt_args(data, teacher_dir, out, *args, f'--teacher_num_steps={n}'))
    dts, dt0 = read_log(out, 'dt'), (1 - 1e-5) / n
    assert sorted(dts) == [1, 2, 3, 4, 5, 6]  # 3 rounds of 2 steps: the students sample with K^2, K, 1 steps
    for step, dt in dts.items():
        assert dt == pytest.approx(dt0 * K ** ((step - 1) // 2), rel=1e-12), step
    assert read_log(out, 'next_dt') == pytest.approx({2: dt0 * K, 4: dt0 * K ** 2, 6: dt0 * K ** 3}, rel=1e-12)
    rounds = sorted(d for d in os.listdir(out) if d.startswith('round_'))
    assert rounds == [f'round_{r}_steps_{K ** (3 - r)}' for r in (1, 2, 3)]
    for r, d in enumerate(rounds, 1):
        meta = load_pretrained(os.path.join(out, d)).meta
        assert (meta['round'], meta['num_sampling_steps'], meta['num_distill_steps']) == (r, K ** (3 - r), K)


def test_round_directory_holds_the_ema_weights_and_round_options(data, teacher_dir, tmp_path):
    out = str(tmp_path / 'plain')
    distill.main(sdtt_args(data, teacher_dir, out, '--max_iters=2', '--round_every=2', '--teacher_num_steps=16'))
    ck = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)  # saved at the boundary
    student = load_pretrained(os.path.join(out, 'round_1_steps_8')).state_dict()
    assert any(not torch.equal(ck['ema'][k], ck['model'][k]) for k in ck['model'])  # (else this proves nothing)
    for k, v in student.items():  # the published students are EMA weights
        assert torch.equal(v, ck['ema'][k].float()), k
    assert ck['optimizer']['state'] and ck['ema_updates'] == 2
    # teacher_from_ema: student and teacher restart from the EMA; reset_optimizer_each_round clears AdamW's moments
    out = str(tmp_path / 'options')
    distill.main(sdtt_args(data, teacher_dir, out, '--max_iters=2', '--round_every=2', '--teacher_num_steps=16',
                           '--teacher_from_ema=True', '--reset_optimizer_each_round=True'))
    ck = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    assert ck['round'] == 1 and ck['ema_updates'] == 0 and ck['optimizer']['state'] == {}
    distill.main(sdtt_args(data, teacher_dir, out, '--max_iters=4', '--round_every=2', '--teacher_num_steps=16',
                           '--min_num_sampling_steps=4', '--teacher_from_ema=True', '--reset_optimizer_each_round=True',
                           '--init_from=resume'))
    lrs = read_log(out, 'lr')  # a reset optimiser warms up again (as the reference's new LR scheduler), across a resume
    assert [lrs[s] for s in (3, 4)] == pytest.approx([1e-3 / 6, 2e-3 / 6])
    for k in ck['model']:
        assert torch.equal(ck['model'][k], ck['ema'][k]) and torch.equal(ck['teacher'][k], ck['ema'][k]), k


def test_resume_drops_the_log_lines_of_steps_it_redoes(data, tmp_path, capsys):
    out = str(tmp_path / 'run')
    args = TINY + ['--objective=mdlm', '--init_from=scratch', f'--data_dir={data}', f'--out_dir={out}', '--log_interval=1']
    distill.main(args + ['--max_iters=3'])
    with open(os.path.join(out, 'log.jsonl'), 'a') as f:  # steps 4 and 5 of a run killed after its step-3 checkpoint
        f.write(json.dumps(dict(step=4, loss=123.0)) + '\n' + json.dumps(dict(step=5, loss=123.0)) + '\n{"step": 6, "lo')
    with open(os.path.join(out, 'log.jsonl')) as f:
        lines = f.readlines()
    with open(os.path.join(out, 'log.jsonl'), 'w') as f:  # and hand edits: each used to stop the resume
        f.writelines(lines[:1] + ['not json\n', '[1, 2]\n', '{"loss": 1.0}\n', '{"step": "2"}\n'] + lines[1:])
    capsys.readouterr()
    distill.main(args + ['--max_iters=5', '--init_from=resume'])
    logged = [r for r in map(json.loads, open(os.path.join(out, 'log.jsonl'))) if 'loss' in r]
    assert [r['step'] for r in logged] == [1, 2, 3, 4, 5] and 123.0 not in [r['loss'] for r in logged]
    warning = capsys.readouterr().out
    assert f"{out}/log.jsonl: 5 line(s) left out" in warning and 'line 2: not JSON' in warning, warning
    assert "line 5: field 'step' is '2', not int" in warning and 'line 11: not JSON' in warning


def test_resumed_run_logs_what_an_uninterrupted_run_logs(data, tmp_path, monkeypatch):
    """Log windows end at checkpoints: resumed from the step-6 checkpoint after a crash in step 7 (no save, as kill -9),
    the step-8 line averages the same steps as without the crash, though ckpt_interval 3 is no multiple of
    log_interval 4."""
    args = TINY + ['--objective=mdlm', '--init_from=scratch', f'--data_dir={data}', '--max_iters=8', '--log_interval=4',
                   '--ckpt_interval=3']
    distill.main(args + [f'--out_dir={tmp_path / "ref"}'])
    calls, loss = [], distill.training_loss

    def crash_in_step_7(*a, **k):  # 2 micro-batches per step
        calls.append(1)
        if len(calls) == 13:
            raise RuntimeError('simulated crash')
        return loss(*a, **k)
    monkeypatch.setattr(distill, 'training_loss', crash_in_step_7)
    with pytest.raises(RuntimeError, match='simulated crash'):
        distill.main(args + [f'--out_dir={tmp_path / "cut"}'])
    monkeypatch.setattr(distill, 'training_loss', loss)
    distill.main(args + [f'--out_dir={tmp_path / "cut"}', '--init_from=resume'])
    ref, cut = read_log(tmp_path / 'ref'), read_log(tmp_path / 'cut')
    assert sorted(ref) == [3, 4, 6, 8] and ref == cut


def test_sdtt_run_that_ends_with_its_rounds_logs_and_validates_its_last_steps(data, teacher_dir, tmp_path):
    out = tmp_path / 'run'
    distill.main(sdtt_args(data, teacher_dir, str(out), '--max_iters=100', '--round_every=3', '--teacher_num_steps=16',
                           '--min_num_sampling_steps=4', '--log_interval=4', '--eval_interval=4'))
    assert sorted(read_log(out)) == [3, 4, 6] and sorted(read_log(out, 'val_distill_loss')) == [4, 6]  # stops at 6


def test_validation_rows_and_noise_are_the_same_at_every_evaluation(data, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.optim.AdamW, 'step', lambda self, *a, **k: None)  # the weights never change
    out = str(tmp_path / 'run')
    distill.main(TINY + ['--objective=mdlm', '--init_from=scratch', f'--data_dir={data}', f'--out_dir={out}',
                         '--max_iters=4', '--eval_interval=2', '--eval_iters=2'])
    vals = read_log(out, 'val_nelbo')
    assert sorted(vals) == [2, 4] and vals[2] == vals[4]


def test_flops_accounting_matches_a_flop_counter():
    """model.flops_per_token and step_flops (MFU) against torch's FlopCounterMode, matmuls as run."""
    from torch.utils.flop_counter import FlopCounterMode
    B, K = 2, 3
    x = torch.randint(0, MASK, (B, L))
    att = 4 * 2 * 32 * L * B * L  # attention's two matmuls in a forward (4 l d L per token): not counted on CPU SDPA
    m = random_dit()
    for pos in (None, torch.arange(0, B * L, 3)):  # the output layer everywhere, at a third of the positions
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            m(x, torch.zeros(B), *(() if pos is None else (pos,)))
        frac = 1 if pos is None else len(pos) / (B * L)
        assert fc.get_total_flops() + att == pytest.approx(m.flops_per_token(L, False, frac) * B * L, rel=0.02)
    torch.manual_seed(0)
    b = distill.draw_noise(x, 'sdtt', MASK, 1e-5, 0.05, K)
    student, teacher = random_dit(1).train(), random_dit(2)
    with FlopCounterMode(display=False) as fc:  # the student's forward + backward and the K teacher forwards
        distill.training_loss(distill.Objective(student, 'sdtt', MASK), b, teacher, K, MASK).backward()
    assert fc.get_total_flops() + (3 + K) * att == pytest.approx(distill.step_flops(student, teacher, b, K), rel=0.02)


def test_resume_after_kill_equals_uninterrupted(data, teacher_dir, tmp_path):
    args = ['--max_iters=1000000', '--round_every=8', '--teacher_num_steps=1024', '--ckpt_interval=4']
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}

    def launch(out, *extra):
        return subprocess.Popen([sys.executable, 'distill.py', *sdtt_args(data, teacher_dir, out, *args, *extra)],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ref, cut = str(tmp_path / 'ref'), str(tmp_path / 'cut')
    p_ref = launch(ref)  # uninterrupted: 7 rounds of 8 steps (1024 -> 8 steps), then it stops by itself
    p = launch(cut)
    deadline = time.time() + 60
    while max(read_log(cut) if os.path.exists(os.path.join(cut, 'log.jsonl')) else {}, default=0) < 14:
        assert p.poll() is None and time.time() < deadline, p.stderr.read().decode()
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL)  # kill -9 between checkpoints (every 4 steps and at round ends)
    p.wait()
    killed_at = max(read_log(cut))
    assert killed_at < 56
    p = launch(cut, '--init_from=resume')
    assert p.wait() == 0, p.stderr.read().decode()
    assert p_ref.wait() == 0, p_ref.stderr.read().decode()
    a, b = read_log(ref), read_log(cut)
    assert sorted(a) == list(range(1, 57)) and a == b  # every step once, bit-identical losses
    ca = torch.load(os.path.join(ref, 'ckpt.pt'), weights_only=True)
    cb = torch.load(os.path.join(cut, 'ckpt.pt'), weights_only=True)
    for key in ('model', 'ema', 'teacher'):
        for k in ca[key]:
            assert torch.equal(ca[key][k], cb[key][k]), (key, k)


def test_a_second_run_into_the_same_out_dir_is_refused_until_the_first_ends(data, tmp_path):
    """Two runs with one out_dir used to both exit 0, their log lines interleaved (10, 10, 20, 20, ...) and ckpt.pt
    whichever saved last: the second is refused, naming the first (here a process holding the run lock as a
    distill.py does; tests/test_fileio.py: a kill -9 frees it), and runs once the first has ended."""
    out = str(tmp_path / 'run')
    args = TINY + ['--objective=mdlm', '--init_from=scratch', f'--data_dir={data}', f'--out_dir={out}', '--max_iters=2',
                   '--log_interval=1']
    first = subprocess.Popen([sys.executable, '-c', f'import fileio, time; fileio.run_lock({out!r}); '
                              'print(1, flush=True); time.sleep(60)'], cwd=ROOT, stdout=subprocess.PIPE)
    try:
        first.stdout.readline()
        with pytest.raises(distill.RunLocked, match=re.escape(f'{out} is in use by pid {first.pid} (-c)')):
            distill.main(args)
    finally:
        first.kill()
        first.wait()
    assert distill.main(args) == 0 and sorted(read_log(out)) == [1, 2]
    assert not os.path.exists(os.path.join(out, '.lock'))  # released at the end of main()


def test_ctrl_c_saves_and_logs_the_steps_since_the_last_log_line(data, teacher_dir, tmp_path, monkeypatch):
    out, calls = str(tmp_path / 'run'), []
    loss = distill.training_loss

    def ctrl_c_in_step_3(*a, **k):  # 2 micro-batches per step: the 5th call is in step 3
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return loss(*a, **k)
    monkeypatch.setattr(distill, 'training_loss', ctrl_c_in_step_3)
    status = distill.main(sdtt_args(data, teacher_dir, out, '--max_iters=8', '--log_interval=5', '--ckpt_interval=5'))
    assert status == 130  # 128 + SIGINT: a stopped run is not a success (e2e.py, `a && b` must not go on)
    assert sorted(read_log(out)) == [3]  # the loss of steps 1-3 is logged, not dropped
    assert torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)['step'] == 3
    monkeypatch.setattr(distill, 'training_loss', loss)
    assert distill.main(sdtt_args(data, teacher_dir, out, '--max_iters=8', '--log_interval=5',
                                  '--init_from=resume')) == 0
    assert sorted(read_log(out)) == [3, 5, 8]


def test_ddp_two_processes_equal_one(data, teacher_dir, tmp_path):
    one, two = str(tmp_path / 'one'), str(tmp_path / 'two')
    common = ['--max_iters=4', '--round_every=2', '--teacher_num_steps=64', '--eval_interval=2', '--eval_iters=3']
    distill.main(sdtt_args(data, teacher_dir, one, *common))  # 1 process, 2 accumulation steps of 4
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                        'distill.py', *sdtt_args(data, teacher_dir, two, *common)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = read_log(one), read_log(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for s in a:
        assert a[s] == pytest.approx(b[s], rel=1e-4), (s, a[s], b[s])
    # validation: the same rows and noise on any number of processes (3 batches: one rank does 2, the other 1)
    va, vb = read_log(one, 'val_distill_loss'), read_log(two, 'val_distill_loss')
    assert sorted(va) == sorted(vb) == [2, 4]
    for s in va:
        assert va[s] == pytest.approx(vb[s], rel=1e-4), (s, va[s], vb[s])
    ca = torch.load(os.path.join(one, 'ckpt.pt'), weights_only=True)
    cb = torch.load(os.path.join(two, 'ckpt.pt'), weights_only=True)
    assert ca['round'] == cb['round'] == 2
    for k in ca['model']:
        torch.testing.assert_close(ca['model'][k], cb['model'][k], rtol=1e-4, atol=1e-5)


def _parent(pid):
    try:
        with open(f'/proc/{pid}/stat') as f:
            return int(f.read().rsplit(')', 1)[1].split()[1])  # (the name in parentheses may hold spaces)
    except (OSError, ValueError, IndexError):
        return None  # gone meanwhile


@pytest.mark.skipif(not os.path.isdir('/proc'), reason='finds the workers through /proc (Linux)')
def test_ddp_signal_to_one_rank_stops_all_saves_and_reports_it(data, teacher_dir, tmp_path):
    out = str(tmp_path / 'run')
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    p = subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                          'distill.py', *sdtt_args(data, teacher_dir, out, '--max_iters=100000', '--round_every=100000',
                                                   '--log_interval=2', '--ckpt_interval=0')],
                         cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not os.path.exists(os.path.join(out, 'log.jsonl')) or not read_log(out):
        assert p.poll() is None and time.time() < deadline, p.stderr.read()
        time.sleep(0.05)
    workers = [int(d) for d in os.listdir('/proc') if d.isdigit() and _parent(d) == p.pid]  # torchrun's workers
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGTERM)  # one rank only: the other learns it at the next log step
    err = p.communicate(timeout=60)[1]
    assert p.returncode != 0  # torchrun: a worker failed (it exits 1)
    codes = re.findall(r'exitcode\s*:\s*(-?\d+)', err)
    # 128 + SIGTERM from the ranks that exit by themselves (not 130: SIGINT); torchrun may terminate the last one
    # (-15) once the first has exited, after the checkpoint (rank 0 saves before the final barrier)
    assert '143' in codes and set(codes) <= {'143', '-15'}, err[-2000:]
    ck = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    assert ck['step'] == max(read_log(out))  # saved at the step they stopped, and logged


def test_mdlm_lightning_checkpoint_teacher(tmp_path, monkeypatch):
    m = random_dit()
    params = [p.detach() + 1 for p in m.parameters()]
    ck = {'state_dict': {'backbone.' + k: v for k, v in m.state_dict().items()},
          'ema': {'decay': 0.9999, 'num_updates': 5, 'shadow_params': params}}
    torch.save(ck, tmp_path / 'weights.ckpt')
    t = distill.load_lightning_ckpt(str(tmp_path / 'weights.ckpt'), n_head=2, block_size=L, time_conditioning=False)
    assert (t.config.n_layer, t.config.n_embd, t.config.cond_dim, t.config.vocab_size) == (2, 32, 32, V)
    for p, e in zip(t.parameters(), params):  # the EMA weights, mapped by parameter order
        assert torch.equal(p, e)
    omegaconf = type(sys)('omegaconf')  # stands for the OmegaConf config pickled in its hyper_parameters
    omegaconf.DictConfig = type('DictConfig', (), {'__module__': 'omegaconf'})
    monkeypatch.setitem(sys.modules, 'omegaconf', omegaconf)
    torch.save({**ck, 'hyper_parameters': {'config': omegaconf.DictConfig()}}, tmp_path / 'full.ckpt')
    with pytest.raises(ValueError, match=r"(?s)refuses its pickled hyper-parameters \(omegaconf.DictConfig\).*"
                                         r"keep only the weights once.*weights_only=False"):
        distill.load_lightning_ckpt(str(tmp_path / 'full.ckpt'), n_head=2, block_size=L, time_conditioning=False)
    # a file that would run code on loading: named, and no advice to load it anyway (it used to get the one-liner)
    torch.save({**ck, 'hyper_parameters': RunsCode()}, tmp_path / 'evil.ckpt')
    with pytest.raises(ValueError, match='evil.ckpt pickles posix.system, which no MDLM Lightning checkpoint') as e:
        distill.load_lightning_ckpt(str(tmp_path / 'evil.ckpt'), n_head=2, block_size=L, time_conditioning=False)
    assert 'python -c' not in str(e.value)
    (tmp_path / 'random.ckpt').write_bytes(os.urandom(1000))
    with pytest.raises(ValueError, match='random.ckpt is not a torch checkpoint') as e:
        distill.load_lightning_ckpt(str(tmp_path / 'random.ckpt'), n_head=2, block_size=L, time_conditioning=False)
    assert 'python -c' not in str(e.value)


class RunsCode:
    def __reduce__(self):
        return os.system, ('echo this ran',)


def test_mdlm_lightning_checkpoint_of_the_ar_baseline(tmp_path):
    """MDLM's AR checkpoints (models/autoregressive.py, the reference's names) load strictly as the causal network,
    EMA by parameter order, and sample/score like the source."""
    torch.manual_seed(0)
    m = DiT(DiTConfig(vocab_size=V, block_size=L, n_layer=2, n_head=2, n_embd=32, dropout=0.0, causal=True))
    params = [torch.randn_like(p) for p in m.parameters()]
    ck = {'state_dict': {'backbone.' + k: v for k, v in m.state_dict().items()},
          'ema': {'decay': 0.9999, 'num_updates': 5, 'shadow_params': params}}
    torch.save(ck, tmp_path / 'ar.ckpt')
    t = distill.load_lightning_ckpt(str(tmp_path / 'ar.ckpt'), n_head=2, block_size=L, time_conditioning=False)
    assert t.config.causal and not t.config.time_conditioning and (t.config.n_layer, t.config.n_embd) == (2, 32)
    for p, e in zip(t.parameters(), params, strict=True):
        assert torch.equal(p, e)


# --------------------------------------------------------------------------------------------- bad input
def test_loaded_and_resumed_models_keep_their_architecture_and_the_config_says_so(data, teacher_dir, tmp_path, capsys):
    out = str(tmp_path / 'run')
    # the teacher is TINY's 2 x 32: another width asked for is an error, not a setting ignored without a word
    with pytest.raises(ValueError, match=r'keeps its own architecture, but n_embd=64 \(the model: 32\)'):
        distill.main(sdtt_args(data, teacher_dir, out, '--n_embd=64', '--max_iters=1'))
    args = [a for a in sdtt_args(data, teacher_dir, out, '--dropout=0.0') if not a.startswith(('--n_layer', '--n_embd'))]
    distill.main(args + ['--max_iters=2'])  # (n_layer, n_embd left at their defaults 12 and 768: the teacher's count)
    ck = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    assert (ck['config']['n_layer'], ck['config']['n_embd']) == (2, 32)  # what it trains, not the unused defaults
    with pytest.raises(ValueError, match=r'n_layer=3 \(the model: 2\)'):
        distill.main(args + ['--init_from=resume', '--max_iters=3', '--n_layer=3'])
    capsys.readouterr()
    distill.main(args + ['--init_from=resume', '--max_iters=3', '--dropout=0.2'])  # dropout: as for a loaded model
    assert 'resuming with other dropout' in capsys.readouterr().out
    assert torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)['model_args']['dropout'] == 0.2
    # any setting but those that change only where a run goes or what it reports warns (no hand-kept list to extend)
    distill.main(args + ['--init_from=resume', '--max_iters=4', '--dropout=0.2', '--log_interval=2', '--eval_iters=2'])
    assert 'resuming with other' not in capsys.readouterr().out
    distill.main(args + ['--init_from=resume', '--max_iters=5', '--dropout=0.2', '--ema_decay=0.5'])
    assert 'resuming with other ema_decay than' in capsys.readouterr().out
    # a student of round r as the teacher of a new run: its meta says how many steps it samples with
    student = load_pretrained(teacher_dir)
    student.meta.update(num_sampling_steps=16, round=2)
    save_pretrained(student, str(tmp_path / 'round_2_steps_16'))
    distill.main(sdtt_args(data, str(tmp_path / 'round_2_steps_16'), str(tmp_path / 'again'), '--max_iters=1',
                           '--teacher_num_steps=64'))
    assert 'distilled to sample with 16 steps (its meta), teacher_num_steps=64' in capsys.readouterr().out


def test_resume_warns_when_the_data_was_prepared_again(data, tmp_path, capsys):
    moved = str(tmp_path / 'data')
    shutil.copytree(data, moved)
    args = TINY + ['--objective=mdlm', '--init_from=scratch', f'--data_dir={moved}', f'--out_dir={tmp_path / "run"}']
    distill.main(args + ['--max_iters=1'])
    meta = json.load(open(os.path.join(moved, 'meta.json')))
    for split in ('train', 'val'):  # prepared again with --row_len=16: other rows, another number of them
        rows = np.fromfile(os.path.join(moved, f'{split}.bin'), np.uint16).reshape(-1, 16)
        rows.tofile(os.path.join(moved, f'{split}.bin'))
        meta[f'n_{split}_rows'] = len(rows)
    json.dump({**meta, 'row_len': 16}, open(os.path.join(moved, 'meta.json'), 'w'))
    capsys.readouterr()
    distill.main(args + ['--max_iters=2', '--init_from=resume'])
    assert (f'warning: resuming with other {moved} re-prepared: row_len 16 (the run: 32), {moved} re-prepared: '
            f'n_train_rows 256 (the run: 128) than') in capsys.readouterr().out


def test_bad_input_gets_clear_errors(data, teacher_dir, tmp_path, monkeypatch):
    out = str(tmp_path / 'run')
    with pytest.raises(ValueError, match=re.escape(f'divergence must be one of {list(distill.DIVERGENCES)}')):
        distill.main(sdtt_args(data, teacher_dir, out, '--divergence=no_such_divergence', '--max_iters=1'))
    for eps in ('1.5', '0', 'abc'):
        with pytest.raises(ValueError, match='lowest training t must be a number in'):
            distill.main(sdtt_args(data, teacher_dir, out, f'--sampling_eps={eps}', '--max_iters=1'))
    with pytest.raises(ValueError, match='not divisible'):
        distill.main(sdtt_args(data, teacher_dir, out, '--global_batch_size=6'))
    for bad in ('--round_every=0', '--log_interval=0', '--batch_size=0', '--num_distill_steps=0',
                '--teacher_num_steps=0', '--max_iters=-1', '--n_layer=0', '--learning_rate=-1.0', '--grad_clip=-1.0',
                '--weight_decay=-0.1', '--warmup_iters=-1'):  # (learning_rate=-1 was torch's message from AdamW)
        with pytest.raises(ValueError, match=r'impossible sizes: ' + bad[2:] + r' \(must be >= '):
            distill.main(sdtt_args(data, teacher_dir, out, bad))
    for bad in ('--beta2=1.0', '--beta1=1.5', '--ema_decay=1.01'):
        with pytest.raises(ValueError, match=r'betas must be in \[0, 1\), ema_decay in \[0, 1\]'):
            distill.main(sdtt_args(data, teacher_dir, out, bad))
    only_meta = str(tmp_path / 'only_meta')  # (was a bare "[Errno 2] No such file or directory")
    os.makedirs(only_meta)
    shutil.copy(os.path.join(data, 'meta.json'), only_meta)
    with pytest.raises(FileNotFoundError, match=f'{only_meta}/train.bin is missing .*--out_dir={only_meta}'):
        distill.main(sdtt_args(only_meta, teacher_dir, out))
    with pytest.raises(ValueError, match='first student would sample with 3 < min_num_sampling_steps=8 steps'):
        distill.main(sdtt_args(data, teacher_dir, out, '--teacher_num_steps=6'))  # (was: exit 0, nothing trained)
    with pytest.raises(ValueError, match='split into n_head=3 heads'):
        distill.main(TINY + ['--objective=mdlm', '--init_from=scratch', f'--data_dir={data}', f'--out_dir={out}',
                             '--n_head=3'])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match='CUDA is not available'):
            distill.main(sdtt_args(data, teacher_dir, out, '--device=cuda'))
    with pytest.raises(ValueError, match='compile_mode'):
        distill.main(sdtt_args(data, teacher_dir, out, '--compile_mode=reduce-overhead'))
    gpt2_data = write_data(str(tmp_path / 'gpt2'), vocab_size=50258, tokenizer='gpt2', n_train=8, n_val=8)
    with pytest.raises(ValueError, match='tokenized with gpt2'):
        distill.main(sdtt_args(gpt2_data, teacher_dir, out))
    with pytest.raises(FileNotFoundError):
        distill.main(sdtt_args(data, str(tmp_path / 'nothing_here'), out))
    with pytest.raises(FileNotFoundError, match='no such file'):  # not "torch.load refuses it"
        distill.main(sdtt_args(data, str(tmp_path / 'nothing_here.ckpt'), out))
    distill.main(sdtt_args(data, teacher_dir, out, '--max_iters=2'))
    with pytest.raises(FileExistsError, match='resume'):  # never overwrite a run by accident
        distill.main(sdtt_args(data, teacher_dir, out, '--max_iters=2'))
    # resuming with other optimiser settings uses them (optimizer.load_state_dict would restore the saved ones)
    distill.main(sdtt_args(data, teacher_dir, out, '--max_iters=3', '--init_from=resume', '--weight_decay=0.5',
                           '--beta2=0.9'))
    group = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)['optimizer']['param_groups'][0]
    assert group['weight_decay'] == 0.5 and tuple(group['betas']) == (0.9, 0.9)
    before = open(os.path.join(out, 'ckpt.pt'), 'rb').read()
    with pytest.raises(ValueError, match="objective='sdtt', not 'mdlm'"):  # (an mdlm run has no teacher to resume)
        distill.main(sdtt_args(data, teacher_dir, out, '--init_from=resume', '--objective=mdlm'))
    cut = str(tmp_path / 'cut')
    os.makedirs(cut)
    with open(os.path.join(cut, 'ckpt.pt'), 'wb') as f:
        f.write(before[:len(before) // 2])  # a truncated copy
    with pytest.raises(ValueError, match='not a readable checkpoint'):
        distill.main(sdtt_args(data, teacher_dir, cut, '--init_from=resume'))
    monkeypatch.setattr(distill, 'training_loss', lambda *a, **k: torch.tensor(float('nan'), requires_grad=True))
    with pytest.raises(FloatingPointError, match='non-finite.*; no checkpoint yet'):  # (not "the last good ... is kept")
        distill.main(sdtt_args(data, teacher_dir, str(tmp_path / 'nan_at_once'), '--max_iters=5', '--log_interval=2'))
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(FloatingPointError, match='non-finite'):
        distill.main(sdtt_args(data, teacher_dir, out, '--max_iters=5', '--init_from=resume', '--ckpt_interval=1',
                               '--log_interval=2'))
    assert open(os.path.join(out, 'ckpt.pt'), 'rb').read() == before  # the last good checkpoint is kept
    # the caller's Ctrl-C / SIGTERM handlers are back after the error (else its next Ctrl-C only sets a flag)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers

    sent = []

    def nan_then_ctrl_c(*a, **k):  # a NaN, then Ctrl-C before the next log step: still an error, not "saved"
        if not sent:  # (a second Ctrl-C aborts at once)
            sent.append(os.kill(os.getpid(), signal.SIGINT))
        return torch.tensor(float('nan'), requires_grad=True)
    monkeypatch.setattr(distill, 'training_loss', nan_then_ctrl_c)
    with pytest.raises(FloatingPointError, match='non-finite'):
        distill.main(sdtt_args(data, teacher_dir, out, '--max_iters=10', '--init_from=resume', '--log_interval=10'))
    assert open(os.path.join(out, 'ckpt.pt'), 'rb').read() == before
