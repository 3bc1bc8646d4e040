"""Masked diffusion: schedule, SUBS, NELBO, and the sampler's distribution, caching, prompting and arguments."""
import pytest
import torch

import diffusion as D
from model import DiT, DiTConfig


def test_loglinear_schedule_is_mdlms():
    t = torch.tensor([1e-5, 1e-3, 0.1, 0.5, 0.999, 1.0])
    torch.testing.assert_close(D.move_chance(t), (1 - 1e-3) * t)
    torch.testing.assert_close(D.nelbo_weight(t), 1 / t, rtol=1e-6, atol=0)
    torch.testing.assert_close(D.move_chance(t, 'cosine'), (1 - 1e-3) * (1 - torch.cos(torch.pi / 2 * t)))  # MDLM's


@pytest.mark.parametrize('schedule', list(D.NOISE_SCHEDULES))
def test_schedule_derivatives_and_nelbo_weight(schedule):
    """Every schedule: m(0) = 0, m(1) = 1 - 1e-3, m increasing, sigma = -log(1 - m), and the NELBO weight m'(t)/m(t)
    against a numerical derivative of m (float64 central differences), also as used by mdlm_loss."""
    t = torch.tensor([1e-4, 1e-3, 0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99], dtype=torch.float64)
    m = lambda t: D.move_chance(t, schedule)
    h = 1e-7 * t
    dm = (m(t + h) - m(t - h)) / (2 * h)
    torch.testing.assert_close(D.nelbo_weight(t, schedule), dm / m(t), rtol=1e-6, atol=0)
    torch.testing.assert_close(D.nelbo_weight(t.float(), schedule), (dm / m(t)).float(), rtol=1e-6, atol=0)
    ends = m(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert ends[0] == 0 and ends[1] == pytest.approx(1 - 1e-3, abs=1e-12)
    grid = torch.linspace(0, 1, 1001, dtype=torch.float64)
    assert (m(grid).diff() > 0).all()
    torch.testing.assert_close(D.sigma(t, schedule), -torch.log(1 - m(t)))
    # the loss weights each masked token by m'/m at its t
    torch.manual_seed(0)
    logits, x0, tt = torch.randn(3, 9, 13), torch.randint(0, 12, (3, 9)), torch.tensor([0.05, 0.5, 0.95])
    xt = D.q_xt(x0, m(tt), 12)
    nll = -torch.log_softmax(logits[..., :12], -1).gather(-1, x0[..., None])[..., 0]  # SUBS at the masked positions
    th = 1e-7 * tt.double()
    w = ((m(tt.double() + th) - m(tt.double() - th)) / (2 * th) / m(tt.double())).float()
    direct = (nll * (xt == 12) * w[:, None]).sum() / x0.numel()
    torch.testing.assert_close(D.mdlm_loss(logits, x0, xt, tt, 12, schedule=schedule), direct, rtol=1e-5, atol=1e-6)


def test_unknown_schedule_in_a_checkpoint_is_a_clear_error():
    assert D.schedule_of({}) == D.schedule_of(None) == 'loglinear'  # published checkpoints record none
    with pytest.raises(ValueError, match='noise schedule .*warped.*NOISE_SCHEDULES'):
        D.schedule_of({'noise_schedule': 'warped'})


def test_sample_t_is_stratified():
    t = D.sample_t(8, 'cpu', sampling_eps=1e-3, generator=torch.Generator().manual_seed(0))
    u = (t - 1e-3) / (1 - 1e-3)
    assert ((u * 8).floor() == torch.arange(8)).all()  # exactly one draw per stratum
    assert t.min() >= 1e-3 and t.max() <= 1


def test_q_xt_masks_with_the_right_probability():
    x0 = torch.zeros(4, 20000, dtype=torch.long)
    p = torch.tensor([0.0, 0.25, 0.5, 1.0])
    xt = D.q_xt(x0, p, mask_id=9, generator=torch.Generator().manual_seed(0))
    frac = (xt == 9).float().mean(1)
    assert frac[0] == 0 and frac[3] == 1 and abs(frac[1] - 0.25) < 0.01 and abs(frac[2] - 0.5) < 0.01
    assert ((xt == 9) | (xt == x0)).all()


def test_mdlm_loss_equals_direct_computation():
    torch.manual_seed(0)
    V, mask, B, L = 13, 12, 3, 9
    logits, x0 = torch.randn(B, L, V), torch.randint(0, V - 1, (B, L))
    t = torch.tensor([0.1, 0.5, 0.9])
    xt = D.q_xt(x0, D.move_chance(t), mask)
    logits[..., mask] = 1e4  # SUBS: MASK is never predicted, however large its logit
    logits[xt != mask] = float('nan')  # and unmasked positions carry over: their logits are never read
    direct = 0.0
    for b in range(B):
        for l in range(L):
            if xt[b, l] == mask:
                direct += -torch.log_softmax(logits[b, l, :mask], -1)[x0[b, l]].item() / t[b].item()
    direct /= B * L
    assert abs(D.mdlm_loss(logits, x0, xt, t, mask).item() - direct) < 1e-5


class FixedModel(torch.nn.Module):
    """Outputs the same distribution at every position, whatever the input (and counts its forward passes)."""
    def __init__(self, probs):
        super().__init__()
        self.logits = torch.log(torch.cat([probs, torch.zeros(1)]))  # the last id is MASK, probability 0
        self.calls, self.seen = 0, []

    def forward(self, x, sigma):
        self.calls += 1
        self.seen.append(x.clone())
        return self.logits.expand(*x.shape, -1)


def tail_probs():
    # 1000 real tokens: one at 0.6, nine sharing 0.38, 990 rare ones of ~2e-5 each (0.02 in all). At 1024 steps a
    # rare token's weight in the reference's joint draw, p * (m(t) - m(s)) ~ 2e-8, is below what float32 exponential
    # noise can resolve against the MASK weight m(s) ~ 1: such a sampler starves them (SPEC §4, Zheng et al.)
    p = torch.cat([torch.tensor([0.6]), torch.full((9,), 0.38 / 9), torch.full((990,), 0.02 / 990)])
    return p.double()


def chi2_groups(tokens, p):
    groups = [(0, 1), (1, 10), (10, 1000)]
    n = tokens.numel()
    stat = 0.0
    for a, b in groups:
        obs = ((tokens >= a) & (tokens < b)).sum().item()
        exp = n * p[a:b].sum().item()
        stat += (obs - exp) ** 2 / exp
    return stat  # 2 degrees of freedom: P(stat > 13.8) = 0.001


def test_sampler_token_frequencies_match_the_model_at_1024_steps():
    p = tail_probs()
    m = FixedModel(p.float())
    x, nfe = D.sample(m, n_samples=256, num_steps=1024, seq_len=64, mask_id=1000, seed=0)
    assert nfe == 1024 and (x != 1000).all()
    assert chi2_groups(x, p) < 13.8
    # the rare tokens as a group get their share, 0.02 (+- 4 sigma = 0.0044); measured once in the same setting, the
    # reference's float32 exponential race gives 0.007
    assert abs((x >= 10).float().mean().item() - 0.02) < 0.0044


@pytest.mark.parametrize('schedule', list(D.NOISE_SCHEDULES))
def test_sampler_reveals_follow_the_schedule(schedule):
    """A step from t to s leaves a masked position masked with probability m(s)/m(t): the masked fraction the model
    sees at step k is m(t_k)/m(1), for the schedule given and for a model whose meta names it."""
    m = lambda t: D.move_chance(torch.tensor(t, dtype=torch.float64), schedule).item()
    ts = torch.linspace(1, 1e-5, 7, dtype=torch.float64)[:-1].tolist()
    for how in ('argument', 'meta'):
        model = FixedModel(tail_probs().float())
        if how == 'meta':
            model.meta = {'noise_schedule': schedule}
        D.sample(model, 64, 6, 256, mask_id=1000, seed=0, **({'schedule': schedule} if how == 'argument' else {}))
        n = 64 * 256
        for x, t in zip(model.seen, ts):
            p = m(t) / m(1.0)
            assert abs((x == 1000).float().mean().item() - p) < 4 * (p * (1 - p) / n) ** 0.5 + 1e-9, (how, t)


def test_cached_sampler_gives_identical_tokens_with_fewer_forwards():
    torch.manual_seed(0)
    m = DiT(DiTConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=32, cond_dim=16, dropout=0)).eval()
    with torch.no_grad():
        for q in m.parameters():
            q.normal_(0, 0.5)
    for steps in (8, 100):
        a, nfe_a = D.sample(m, 5, steps, 16, bos_id=38, seed=3)
        b, nfe_b = D.sample(m, 5, steps, 16, bos_id=38, seed=3, cache=True)
        assert torch.equal(a, b)
        assert nfe_a == steps and (nfe_b < nfe_a if steps > 16 else nfe_b <= nfe_a)
    assert nfe_b <= 15 + 1  # 100 steps over 15 masked tokens: a forward only at a step that reveals one (+ final)


def test_prompt_is_kept_at_every_step_and_bos_first():
    p = tail_probs().float()
    m = FixedModel(p)
    prompt = torch.tensor([999, 5, 7, 998])

    def project_fn(x):
        x[:, :len(prompt)] = prompt
        return x
    x, _ = D.sample(m, 3, 10, 12, mask_id=1000, project_fn=project_fn, seed=1)
    assert all((seen[:, :4] == prompt).all() for seen in m.seen) and (x[:, :4] == prompt).all()
    x, _ = D.sample(FixedModel(p), 2, 4, 8, mask_id=1000, bos_id=999, seed=1)
    assert (x[:, 0] == 999).all() and (x[:, 1:] < 1000).all()


def test_final_denoise_fills_leftover_masks_with_argmax():
    p = tail_probs().float()
    m = FixedModel(p)
    # eps close to 1 keeps m(s)/m(t) ~ 1: almost nothing is revealed by the steps, the final denoise fills the rest
    x, nfe = D.sample(m, 2, 1, 50, mask_id=1000, eps=0.999, seed=0)
    assert (x != 1000).all() and (x == 0).float().mean() > 0.9 and nfe == 2


def test_final_denoise_never_picks_mask_even_where_its_raw_logit_is_largest():
    m = FixedModel(tail_probs().float())
    m.logits = m.logits.clone()
    m.logits[-1] = 50.0  # a trained MDLM never learns its MASK logit: SUBS must drop it, not the argmax
    x, _ = D.sample(m, 2, 1, 50, mask_id=1000, eps=0.999, seed=0)
    assert (x != 1000).all()


def test_time_grid_is_linspace_1_to_eps_without_its_last_point():
    ts, dt = D.sampling_grid(4)
    assert len(ts) == 4 and ts[0] == 1.0 and dt == pytest.approx((1 - 1e-5) / 4) and ts[-1] - dt == pytest.approx(1e-5)
    sigmas = []

    class Recorder(FixedModel):
        def forward(self, x, sigma):
            sigmas.append(sigma[0].item())
            return super().forward(x, sigma)
    D.sample(Recorder(tail_probs().float()), 2, 4, 64, mask_id=1000, seed=0)
    expect = D.sigma(torch.linspace(1, 1e-5, 5, dtype=torch.float64)[:-1]).tolist()
    assert sigmas[:4] == pytest.approx(expect, rel=1e-5)  # (a 5th forward: the final denoise, if anything is left)


def test_draws_are_float64_from_end_to_end(monkeypatch):
    # a token of probability 1e-9 after half the mass: float32 (CDF or uniform) cannot hit it, float64 does
    logits = torch.tensor([[0.5, 1e-9, 0.5 - 1e-9]], dtype=torch.float64).log()
    assert D.draw_categorical(logits, torch.tensor([0.5 + 5e-10], dtype=torch.float64)).item() == 1
    seen, draw = [], D.draw_categorical
    monkeypatch.setattr(D, 'draw_categorical', lambda lg, u, *a, **k: (seen.append(u), draw(lg, u, *a, **k))[1])
    D.sample(FixedModel(tail_probs().float()), 4, 2, 16, mask_id=1000, seed=0)
    u = torch.cat(seen)
    assert u.dtype == torch.float64 and ((u * 2 ** 24) % 1 != 0).any()  # not float32 values in a float64 tensor


def test_same_seed_same_samples_and_any_batch_or_steps():
    p = tail_probs().float()
    a, _ = D.sample(FixedModel(p), 3, 5, 9, mask_id=1000, seed=7)
    b, _ = D.sample(FixedModel(p), 3, 5, 9, mask_id=1000, seed=7)
    assert torch.equal(a, b)
    for n, steps, L in [(1, 1, 1), (2, 50, 4), (4, 3, 33)]:
        x, _ = D.sample(FixedModel(p), n, steps, L, mask_id=1000, seed=0)
        assert x.shape == (n, L) and (x != 1000).all()


@pytest.mark.parametrize('kw,match', [(dict(num_steps=0), 'num_steps'), (dict(n_samples=0), 'n_samples'),
                                      (dict(seq_len=17), 'block size'), (dict(num_steps=2.5), 'num_steps')])
def test_bad_arguments_raise_value_error(kw, match):
    m = DiT(DiTConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=32, cond_dim=16))
    args = {**dict(n_samples=2, num_steps=4, seq_len=8), **kw}
    with pytest.raises(ValueError, match=match):
        D.sample(m, **args)


def test_mdlm_training_lowers_the_nelbo_on_repetitive_text():
    """150 AdamW steps of the MDLM NELBO on a tiny DiT and a repetitive byte-level text: the loss falls far below
    its start (a uniform predictor over 257 real tokens costs ln(257) = 5.5 nats per masked token)."""
    torch.manual_seed(0)
    text = ('the cat sat on the mat. ' * 200).encode()
    data = torch.tensor(list(text))
    m = DiT(DiTConfig(vocab_size=258, block_size=32, n_layer=2, n_head=2, n_embd=64, cond_dim=32, dropout=0.0))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)

    def batch():
        i = torch.randint(0, len(data) - 32, (16,), generator=g)
        return torch.stack([data[j:j + 32] for j in i])

    def nelbo():  # fixed evaluation draws
        ge = torch.Generator().manual_seed(123)
        x0 = torch.stack([data[j:j + 32] for j in range(0, 16 * 7, 7)])
        with torch.no_grad():
            t = D.sample_t(16, 'cpu', 1e-3, ge)
            xt = D.q_xt(x0, D.move_chance(t), 257, ge)
            return D.mdlm_loss(m(xt), x0, xt, t, 257).item()
    start = nelbo()
    for _ in range(150):
        x0 = batch()
        t = D.sample_t(16, 'cpu', 1e-3, g)
        xt = D.q_xt(x0, D.move_chance(t), 257, g)
        loss = D.mdlm_loss(m(xt), x0, xt, t, 257)
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = nelbo()
    assert start > 4.0 and end < 0.35 * start, (start, end)


def test_draw_categorical_chunks_give_the_same_draws():
    g = torch.Generator().manual_seed(0)
    logits, u = torch.randn(37, 50, generator=g), torch.rand(37, dtype=torch.float64, generator=g)
    a = D.draw_categorical(logits, u)
    assert torch.equal(a, D.draw_categorical(logits, u, chunk_elems=100))  # 2 rows per chunk
    cdf = torch.softmax(logits.double(), -1).cumsum(-1)  # the definition: first index whose cdf exceeds u
    assert torch.equal(a, (cdf <= u[:, None] * cdf[:, -1:]).sum(-1))


def test_head_only_sampling_same_tokens_output_layer_at_reveals_only():
    """The default for a DiT: the output layer runs only at the positions each step reveals (the host knows them
    before the forward); the tokens are those of the full-logits step."""
    torch.manual_seed(0)
    m = DiT(DiTConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=32, cond_dim=16, dropout=0)).eval()
    with torch.no_grad():
        for q in m.parameters():
            q.normal_(0, 0.5)
    rows = []
    m.output_layer.linear.register_forward_hook(lambda mod, i, o: rows.append(o.shape[0] if o.dim() == 2 else o[..., 0].numel()))
    assert D.takes_positions(m) and D.takes_positions(torch.compile(m)) and not D.takes_positions(FixedModel(tail_probs()))
    a, nfe_a = D.sample(m, 5, 8, 16, bos_id=38, seed=3)
    n_head_rows = sum(rows)
    rows.clear()
    b, nfe_b = D.sample(m, 5, 8, 16, bos_id=38, seed=3, head_only=False)
    assert torch.equal(a, b) and nfe_a == nfe_b == 8
    # 75 masked positions (BOS is given), each revealed once: 75 rows, against 8 steps x 5 x 16 (the final denoise, of
    # whole sequences, runs only where a mask is left: the same in both runs)
    final = n_head_rows - 75
    assert final % 16 == 0 and sum(rows) == 8 * 5 * 16 + final
    with pytest.raises(ValueError, match='not a step_fn'):
        D.sample(m, 5, 8, 16, head_only=True, step_fn=lambda *a: a[0])


def test_compiled_head_only_sampler_builds_one_graph_for_every_step():
    """The number of positions a step reveals changes every step (0 and 1 included): marked unbacked, one compiled
    graph serves them all (unmarked: 4 here, more on longer runs), and the tokens are eager's."""
    from torch._dynamo.testing import CompileCounter
    torch.manual_seed(0)
    m = DiT(DiTConfig(vocab_size=61, block_size=32, n_layer=1, n_head=2, n_embd=32, cond_dim=16, dropout=0.0)).eval()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.2)
    counter = CompileCounter()
    tokens, _ = D.sample(torch.compile(m, backend=counter), 3, 32, 32, seed=0)
    assert counter.frame_count == 1 and torch.equal(tokens, D.sample(m, 3, 32, 32, seed=0)[0])
