"""ceiling.py: the ideal student of one SDTT round. Its minimisers against the divergences they minimise, the time
inversion against every schedule, and its samples against sample.py's (K = 1: the ideal student is the teacher)."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import ceiling  # noqa: E402
import sample  # noqa: E402
from diffusion import NOISE_SCHEDULES, SAMPLE_EPS, sampling_grid, sigma  # noqa: E402
from distill import DIVERGENCES, teacher_times  # noqa: E402
from test_sample import tiny_dir  # noqa: E402


@pytest.mark.parametrize('name', list(ceiling.MINIMISERS))
def test_minimiser_minimises_its_divergence(name):
    """The closed form is the minimiser over the draws of the mean of DIVERGENCES[name] (the training loss): its
    gradient there is zero and any nearby distribution does worse."""
    torch.manual_seed(0)
    lp = torch.log_softmax(2 * torch.randn(5, 3, 11, dtype=torch.float64), -1)  # 5 draws, 3 positions, 11 tokens

    def loss(z):
        return torch.stack([DIVERGENCES[name](torch.log_softmax(z, -1), d) for d in lp]).mean(0).sum()
    best = ceiling.MINIMISERS[name](lp).clone().requires_grad_()
    grad, = torch.autograd.grad(loss(best), best)
    assert grad.abs().max() < 1e-10
    for _ in range(20):
        assert loss(best.detach() + 0.05 * torch.randn_like(best)) > loss(best.detach())


@pytest.mark.parametrize('schedule', list(NOISE_SCHEDULES))
def test_time_of_inverts_sigma(schedule):
    for t in (1e-5, 0.01, 0.3, 0.77, 1.0):
        s = sigma(torch.tensor(t, dtype=torch.float64), schedule).item()
        assert ceiling.time_of(s, schedule) == pytest.approx(t, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize('K', [2, 3, 4])
def test_teacher_steps_end_at_the_students_next_time(K):
    """The K teacher steps of a student step from t_k end at t_k+1 of the student's grid (diffusion.sampling_grid)."""
    ts, _ = sampling_grid(8)
    ideal = ceiling.IdealStudent(torch.nn.Module(), None, 8, K, 1, 'kld', 'loglinear', None)
    for t, s in zip(ts, ts[1:] + [SAMPLE_EPS]):
        times = teacher_times(torch.tensor([t], dtype=torch.float64), ideal.dt, K)
        assert times[-1].item() - ideal.dt == pytest.approx(s, abs=1e-12)


def test_one_teacher_step_is_the_teacher(tmp_path):
    """With K = 1 every draw is the teacher's own step: the ideal student's samples are sample.py's, token for token
    (the same batches and seeds), whatever the number of draws."""
    model = tiny_dir(tmp_path / 'teacher', 258)
    common = ['--num_steps=4', '--n_samples=6', '--batch_size=4', '--seq_len=24', '--seed=3', f'--out_dir={tmp_path}']
    ceiling.main([f'--teacher={model}', '--num_distill_steps=1', '--draws=2', *common])
    path = sample.main([f'--init_from={model}', '--n_print=0', *common])
    ideal = next((tmp_path / 'samples' / 'ceiling').glob('ideal-kld-K1-d2-*_T4_L24_n6_s3.npz'))
    assert np.array_equal(np.load(ideal)['tokens'], np.load(path + '.npz')['tokens'])


def test_two_teacher_steps_change_the_samples(tmp_path):
    """K = 2: the targets mix two teacher steps, so the samples are no longer the teacher's (the test above is no
    accident of the plumbing), and they are a function of the seed."""
    model = tiny_dir(tmp_path / 'teacher', 258)
    common = ['--num_steps=4', '--n_samples=4', '--batch_size=4', '--seq_len=24', '--seed=3', f'--out_dir={tmp_path}']
    ceiling.main([f'--teacher={model}', '--draws=2', *common])
    path = sample.main([f'--init_from={model}', '--n_print=0', *common])
    ideal = next((tmp_path / 'samples' / 'ceiling').glob('ideal-kld-K2-d2-*.npz'))
    first = np.load(ideal)['tokens']
    assert not np.array_equal(first, np.load(path + '.npz')['tokens'])
    ceiling.main([f'--teacher={model}', '--draws=2', *common])
    assert np.array_equal(first, np.load(ideal)['tokens'])


def test_unknown_divergence_is_an_error(tmp_path):
    with pytest.raises(ValueError, match='kl_fwd'):
        ceiling.main([f'--teacher={tmp_path}', '--divergence=mse'])
