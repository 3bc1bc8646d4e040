"""CUDA only (skipped elsewhere): what the CPU suite cannot see. The hot loops never make the host wait for the GPU
(training step, diffusion sampler, KV-cache sampler), attention runs on flash kernels, and the compiled bf16 training
step computes the eager one's loss. Run on a GPU machine: python -m pytest -q tests/test_gpu.py (gpu_check.sh does)."""
import warnings

import pytest
import torch

import distill
from diffusion import sample, to_device
from model import DiT, DiTConfig
from sample import sample_ar

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
V, L, K = 1024, 128, 2


def tiny(causal=False, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    m = DiT(DiTConfig(vocab_size=V, block_size=L, n_layer=2, n_head=4, n_embd=128, cond_dim=32, dropout=dropout,
                      causal=causal))
    for p in m.parameters():  # every parameter random: with the zero-initialised adaLN gates every block would be the
        torch.nn.init.normal_(p, std=0.1)  # identity, and a broken KV cache or attention could not change a logit
    return m.cuda()


def count_syncs(fn):
    """fn()'s result and the number of operations in it that made the host wait for the device."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        torch.cuda.set_sync_debug_mode('warn')
        try:
            out = fn()
        finally:
            torch.cuda.set_sync_debug_mode('default')
    return out, sum('synchroniz' in str(w.message) for w in caught)


@pytest.mark.parametrize('cache', [False, True])
def test_sampler_syncs_do_not_grow_with_steps(cache):
    """The host draws the reveals and tracks the masked positions: a step never waits for the GPU, so 4 and 32 steps
    make the same few syncs (before the loop, in the final denoise and the NaN check at the end)."""
    model = tiny().eval()
    run = lambda n: count_syncs(lambda: sample(model, 4, n, L, mask_id=V - 1, bos_id=0, seed=0, cache=cache))
    (x4, _), s4 = run(4)
    (x32, _), s32 = run(32)
    assert 1 <= s4 <= 4 and 1 <= s32 <= 4, (s4, s32)  # >= 1: the one before the loop; a sync per step: s32 >= 32
    assert (x32 != V - 1).all() and x32.is_cuda


def test_reference_fp32_sampler_runs_on_the_gpu():
    """--sampler=ancestral_fp32 draws its float32 noise with a CUDA generator: the same seed gives the same tokens."""
    from sample import reference_step
    model = tiny().eval()
    run = lambda: sample(model, 4, 16, L, mask_id=V - 1, bos_id=0, seed=0,
                         step_fn=reference_step(torch.Generator('cuda').manual_seed(0)))[0]
    a, b = run(), run()
    assert torch.equal(a, b) and (a != V - 1).all() and a.is_cuda


def test_ar_sampler_syncs_do_not_grow_with_length():
    model = tiny(causal=True).eval()
    # BOS is given: one forward per later position
    (_, n16), s16 = count_syncs(lambda: sample_ar(model, 2, 16, bos_id=0, seed=0))
    (_, n64), s64 = count_syncs(lambda: sample_ar(model, 2, 64, bos_id=0, seed=0))
    assert (n16, n64) == (15, 63) and 1 <= s16 <= 3 and 1 <= s64 <= 3, (s16, s64)  # (+1: the NaN check at the end)


def test_ar_kv_cache_matches_full_forward():
    """Decoding one token at a time through the bf16 cache gives the logits of one causal forward of the sequence."""
    model = tiny(causal=True).eval()
    x, _ = sample_ar(model, 2, 48, bos_id=0, seed=1)
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
        full = model(x).float()
        cache, steps = model.new_kv_cache(2, dtype=torch.bfloat16), []
        for t in range(48):
            steps.append(model(x[:, t:t + 1], cache=cache, start=t).float())
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=0.05, rtol=0.05)


def test_attention_runs_on_flash_kernels():
    """q, k, v come out of the fused qkv projection as strided views: flash attention must accept them, forward and
    backward, or SDPA silently falls back to a slower kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    model = tiny(dropout=0.1).train()
    idx = torch.randint(0, V - 1, (4, L), device='cuda')
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast('cuda', dtype=torch.bfloat16):
        model(idx).float().sum().backward()
    assert model.vocab_embed.embedding.grad is not None


def noised(objective, x0):
    return to_device(distill.draw_noise(x0, objective, V - 1, 1e-3, 2 / 64, K), 'cuda')


@pytest.mark.parametrize('objective,compiled', [('mdlm', False), ('sdtt', False), ('sdtt', True)])
def test_training_step_never_waits_for_the_gpu(objective, compiled):
    """distill.py's step (noise drawn on the host, teacher targets, network + loss, backward, clipping, fused AdamW,
    EMA) in sync-error mode: any host-device sync inside is an error."""
    torch._dynamo.reset()
    student, teacher = tiny(dropout=0.1).train(), tiny(seed=1).eval().requires_grad_(False)
    ema = tiny().requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, fused=True)
    fwd = distill.Objective(student, objective, V - 1, 'kld', bf16=True)
    run_t = teacher
    if compiled:
        fwd, run_t = torch.compile(fwd), torch.compile(teacher)

    def step(i):
        torch.manual_seed(i)
        b = noised(objective, torch.randint(0, V - 1, (4, L)))
        loss = distill.training_loss(fwd, b, run_t, K, V - 1, bf16=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch._foreach_lerp_(list(ema.parameters()), list(student.parameters()), 0.01)
        return loss.detach()

    for i in range(3):  # compilation, optimiser state
        step(i)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        losses = [step(i) for i in range(3, 6)]
    finally:
        torch.cuda.set_sync_debug_mode('default')
    assert torch.isfinite(torch.stack(losses)).all()


@pytest.mark.parametrize('objective', ['mdlm', 'sdtt'])
def test_compiled_bf16_loss_equals_eager(objective):
    """The compiled network + loss (and the compiled teacher) against eager, bf16, for three different numbers of
    masked positions (marked dynamic: one compilation serves them all)."""
    torch._dynamo.reset()
    student, teacher = tiny(), tiny(seed=1).eval().requires_grad_(False)
    eager = distill.Objective(student, objective, V - 1, 'kld', bf16=True)
    compiled, run_t = torch.compile(eager), torch.compile(teacher)
    for i in range(3):
        torch.manual_seed(i)
        b = noised(objective, torch.randint(0, V - 1, (4, L)))
        with torch.no_grad():
            # the same (eager) teacher for both: a compiled teacher may flip a rare token draw, changing the targets
            a = distill.training_loss(eager, b, teacher, K, V - 1, bf16=True)
            c = distill.training_loss(compiled, b, teacher, K, V - 1, bf16=True)
            torch.testing.assert_close(c, a, atol=2e-3, rtol=2e-2)
            with torch.autocast('cuda', dtype=torch.bfloat16):
                lt, ct = teacher(b['xt'], None, b['pos']), run_t(b['xt'], None, b['pos'])
            torch.testing.assert_close(ct.float(), lt.float(), atol=3e-2, rtol=3e-2)
