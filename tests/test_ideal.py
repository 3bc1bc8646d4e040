"""ideal.py: the ideal student of one SDTT round. Its minimisers against the divergences they minimise, the time
inversion against every schedule, and its samples against sample.py's (K = 1: the ideal student is the teacher)."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import ideal  # noqa: E402
import sample  # noqa: E402
from diffusion import NOISE_SCHEDULES, SAMPLE_EPS, sampling_grid, sigma  # noqa: E402
from distill import DIVERGENCES, real_log_probs, teacher_times  # noqa: E402
from test_sample import tiny_dir  # noqa: E402


@pytest.mark.parametrize('name', list(ideal.MINIMISERS))
def test_minimiser_minimises_its_divergence(name):
    """finish(E f(log t)) minimises the weighted mean over the targets t of DIVERGENCES[name] (the training loss):
    its gradient there is zero and any nearby distribution does worse."""
    torch.manual_seed(0)
    lp = torch.log_softmax(2 * torch.randn(5, 3, 11, dtype=torch.float64), -1)  # 5 targets, 3 positions, 11 tokens
    w = torch.rand(5, 3, dtype=torch.float64)
    w = w / w.sum(0)
    f, finish = ideal.MINIMISERS[name]

    def loss(z):
        return (w * torch.stack([DIVERGENCES[name](torch.log_softmax(z, -1), d) for d in lp])).sum()
    best = finish((w[..., None] * f(lp)).sum(0)).clone().requires_grad_()
    grad, = torch.autograd.grad(loss(best), best)
    assert grad.abs().max() < 1e-10
    for _ in range(20):
        assert loss(best.detach() + 0.05 * torch.randn_like(best)) > loss(best.detach())


@pytest.fixture(scope='module')
def net(tmp_path_factory):
    return sample.load_model(tiny_dir(tmp_path_factory.mktemp('ideal') / 'teacher', 258, block_size=8)).backbone


def ideal_of(net, x, t, K, draws, name):
    gen = torch.Generator().manual_seed(0)
    student = ideal.IdealStudent(net, net.meta['mask_id'], 4, K, draws, name, 'loglinear', gen)
    with torch.no_grad():
        return torch.log_softmax(student(x, sigma(torch.full((len(x),), t)))[..., :-1], -1), student.dt


def lp_at(net, x, t):
    with torch.no_grad():
        return real_log_probs(net(x, sigma(torch.full((len(x),), t))), net.meta['mask_id'])


@pytest.mark.parametrize('name', list(ideal.MINIMISERS))
@pytest.mark.parametrize('K', [1, 2, 3])
def test_one_masked_position_mixes_the_teacher_steps(net, name, K):
    """One masked position: nothing else changes during the teacher's steps, so its SDTT target is the teacher at
    the k-th time t - k dt with the probability that the schedule reveals it at step k, exactly, for any draws."""
    mask, t = net.meta['mask_id'], 0.5
    x = torch.tensor([[net.meta['bos_id'], 70, mask, 71]])
    got, dt = ideal_of(net, x, t, K, 3, name)
    ts = torch.tensor([t - k * dt for k in range(K)], dtype=torch.float64)
    keep = ((ts - dt) / ts).tolist()  # log-linear: m(s) / m(t) = s / t
    f, finish = ideal.MINIMISERS[name]
    still, want = 1.0, 0
    for k in range(K):
        p = still * (1 - keep[k]) if k < K - 1 else still
        want = want + p * f(lp_at(net, x, ts[k].item())[0, 2])
        still *= keep[k]
    assert torch.allclose(got[0, 2], torch.log_softmax(finish(want), -1), atol=1e-5)


@pytest.mark.parametrize('name', list(ideal.MINIMISERS))
def test_two_masked_positions_against_the_exact_expectation(net, name):
    """Two masked positions, K = 2: position i's target is the teacher at t if the first step reveals i, else the
    teacher at t - dt given the other position j, itself revealed (with each token v) or not. Enumerated exactly
    over j's 257 tokens, against the estimate from 1000 draws (its error ~0.0015; a wrong weighting: > 0.01)."""
    mask, t, (i, j) = net.meta['mask_id'], 0.5, (2, 3)
    x = torch.tensor([[net.meta['bos_id'], 70, mask, mask]])
    got, dt = ideal_of(net, x, t, 2, 1000, name)
    f, finish = ideal.MINIMISERS[name]
    p = 1 - (t - dt) / t  # the first step reveals a masked position (log-linear)
    xs = x.repeat(258, 1)
    xs[1:, j] = torch.arange(257)  # row 0: j still masked; row 1 + v: j revealed as v
    p_j = lp_at(net, x, t)[0, j].exp()
    after = f(lp_at(net, xs, t - dt)[:, i])
    want = p * f(lp_at(net, x, t)[0, i]) + (1 - p) * ((1 - p) * after[0] + p * (p_j[:, None] * after[1:]).sum(0))
    assert (got[0, i].exp() - torch.log_softmax(finish(want), -1).exp()).abs().max() < 0.005


@pytest.mark.parametrize('schedule', list(NOISE_SCHEDULES))
def test_time_of_inverts_sigma(schedule):
    for t in (1e-5, 0.01, 0.3, 0.77, 1.0):
        s = sigma(torch.tensor(t, dtype=torch.float64), schedule).item()
        assert ideal.time_of(s, schedule) == pytest.approx(t, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize('K', [2, 3, 4])
def test_teacher_steps_end_at_the_students_next_time(K):
    """The K teacher steps of a student step from t_k end at t_k+1 of the student's grid (diffusion.sampling_grid)."""
    ts, _ = sampling_grid(8)
    student = ideal.IdealStudent(torch.nn.Module(), None, 8, K, 1, 'kld', 'loglinear', None)
    for t, s in zip(ts, ts[1:] + [SAMPLE_EPS]):
        times = teacher_times(torch.tensor([t], dtype=torch.float64), student.dt, K)
        assert times[-1].item() - student.dt == pytest.approx(s, abs=1e-12)


def test_one_teacher_step_is_the_teacher(tmp_path):
    """With K = 1 every draw is the teacher's own step: the ideal student's samples are sample.py's, token for token
    (the same batches and seeds), whatever the number of draws."""
    model = tiny_dir(tmp_path / 'teacher', 258)
    common = ['--num_steps=4', '--n_samples=6', '--batch_size=4', '--seq_len=24', '--seed=3', f'--out_dir={tmp_path}']
    ideal.main([f'--teacher={model}', '--num_distill_steps=1', '--draws=2', *common])
    path = sample.main([f'--init_from={model}', '--n_print=0', *common])
    got = next((tmp_path / 'samples' / 'ideal').glob('ideal-kld-K1-d2-*_T4_L24_n6_s3.npz'))
    assert np.array_equal(np.load(got)['tokens'], np.load(path + '.npz')['tokens'])


def test_two_teacher_steps_change_the_samples(tmp_path):
    """K = 2: the targets mix two teacher steps, so the samples are no longer the teacher's (the test above is no
    accident of the plumbing), and they are a function of the seed."""
    model = tiny_dir(tmp_path / 'teacher', 258)
    common = ['--num_steps=4', '--n_samples=4', '--batch_size=4', '--seq_len=24', '--seed=3', f'--out_dir={tmp_path}']
    ideal.main([f'--teacher={model}', '--draws=2', *common])
    path = sample.main([f'--init_from={model}', '--n_print=0', *common])
    got = next((tmp_path / 'samples' / 'ideal').glob('ideal-kld-K2-d2-*.npz'))
    first = np.load(got)['tokens']
    assert not np.array_equal(first, np.load(path + '.npz')['tokens'])
    ideal.main([f'--teacher={model}', '--draws=2', *common])
    assert np.array_equal(first, np.load(got)['tokens'])


def test_unknown_divergence_is_an_error(tmp_path):
    with pytest.raises(ValueError, match='kl_fwd'):
        ideal.main([f'--teacher={tmp_path}', '--divergence=mse'])
