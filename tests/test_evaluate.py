"""evaluate.py on CPU with tiny random models saved to temporary directories (no downloads): gen-PPL and LAMBADA against
direct computations, entropy and LAMBADA accuracy on hand-made inputs, MAUVE on synthetic features, the CLI
(eval.jsonl + plot), 2-process sharding and the errors on bad input."""
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

import diffusion
import evaluate as E
from model import DiT, DiTConfig, save_pretrained
from prepare_data import get_tokenizer
from sample import save_samples

BYTE_META = dict(tokenizer='byte', bos_id=256, eos_id=256, mask_id=257)


@pytest.fixture(scope='module')
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp('evaluate')


@pytest.fixture(scope='module')
def gpt2_dir(tmp):
    """A random tiny HF GPT-2 with GPT-2's vocabulary, saved and loaded by path (as gpt2-large would be)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=128, n_embd=32, n_layer=2, n_head=2)).eval()
    m.save_pretrained(tmp / 'gpt2')
    return str(tmp / 'gpt2'), m


def tiny_dit(causal, block_size=128, seed=0):
    torch.manual_seed(seed)
    m = DiT(DiTConfig(vocab_size=258, block_size=block_size, n_layer=2, n_head=2, n_embd=32, cond_dim=16, dropout=0.0,
                      causal=causal)).eval()
    for p in m.parameters():  # the zero-initialised output layer would give uniform logits
        torch.nn.init.normal_(p, std=0.2)
    m.meta = dict(BYTE_META)
    return m


@pytest.fixture(scope='module')
def ar_dir(tmp):
    m = tiny_dit(causal=True)
    return save_pretrained(m, str(tmp / 'ar')), m


@pytest.fixture(scope='module')
def dit_dir(tmp):
    m = tiny_dit(causal=False, seed=1)
    return save_pretrained(m, str(tmp / 'dit')), m


def direct_nll(logits, ids):
    """Mean NLL of positions 1..n-1 of each row, in float64."""
    lp = torch.log_softmax(logits.double(), -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    return -lp.mean(1)


def test_gen_ppl_hf_gpt2_matches_direct(gpt2_dir):
    path, m = gpt2_dir
    judge = E.LM(path)
    assert judge.tok_name == 'gpt2' and judge.kind == 'causal'
    tokens = np.random.default_rng(0).integers(0, 50257, (7, 24))
    r = E.gen_ppl(judge, tokens, 'gpt2', batch_size=3)
    with torch.no_grad():
        nll = direct_nll(m(torch.tensor(tokens)).logits, torch.tensor(tokens))
    assert r['n_samples'] == 7 and not r['retokenized']
    assert r['gen_ppl'] == pytest.approx(math.exp(nll.mean().item()), rel=1e-5)
    assert r['nll_std'] == pytest.approx(nll.std(unbiased=False).item(), rel=1e-4)
    assert np.allclose(r['nll_per_sample'], nll.numpy(), rtol=0, atol=2e-6)  # each sample's, in order


def test_a_judge_with_its_own_transformers_tokenizer_encodes_without_special_tokens(tmp):
    """A causal LM that is not GPT-2: its AutoTokenizer (here one that adds BOS by default) encodes the text alone,
    the judge puts its own BOS first, and gen-PPL is that of those ids."""
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(PASSAGES * 20, vocab_size=300, special_tokens=['<s>', '</s>'], show_progress=False)
    bpe._tokenizer.post_processor = processors.TemplateProcessing(single='<s> $A', special_tokens=[('<s>', 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token='<s>', eos_token='</s>')
    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2)).eval()
    tok.save_pretrained(tmp / 'own_tok')
    m.save_pretrained(tmp / 'own_tok')
    judge = E.LM(str(tmp / 'own_tok'))
    assert tok('The dog')['input_ids'][0] == 0 and judge.tok.encode('The dog') == tok('The dog')['input_ids'][1:]
    assert (judge.bos, judge.eos, judge.tok_name) == (0, 1, str(tmp / 'own_tok'))
    tokens = np.array([[256, *b'The old man walked his dog'], [256, *b'She fed the hungry cat too']])
    r = E.gen_ppl(judge, tokens, 'byte')
    with torch.no_grad():
        nll = [direct_nll(m(ids).logits, ids).item() for ids in
               (torch.tensor([[0] + judge.tok.encode(bytes(row[1:].tolist()).decode())]) for row in tokens)]
    assert r['retokenized'] and r['gen_ppl'] == pytest.approx(math.exp(np.mean(nll)), rel=1e-5)


def test_closer_is_a_paired_comparison():
    # hand-made: ref below both, so gain = mean(a - b); g = a - b = [0.1, 0.3, 0.2] -> mean 0.2, s.e. 0.1 / sqrt(3)
    gain, margin = E.closer([3.0, 3.0, 3.0], [3.4, 3.6, 3.5], [3.3, 3.3, 3.3])
    assert gain == pytest.approx(0.2) and margin == pytest.approx(0.2 / (0.1 / math.sqrt(3)))
    # b on the other side of ref: gain = |d_a| - |d_b| = 0.5 - 0.1, per sample (a - ref) + (b - ref)
    gain, margin = E.closer([3.0, 3.1], [3.5, 3.6], [2.9, 3.0])
    assert gain == pytest.approx(0.4) and margin == math.inf  # (every g_i is 0.4)
    assert E.closer([1.0, 2.0], [1.0, 2.0], [1.0, 2.0]) == (0.0, 0.0)
    # shared draws (common random numbers): the paired error is the error of the mean of g, not the unpaired one
    rng = np.random.default_rng(0)
    z = rng.normal(size=(3, 4000))
    shared = rng.normal(size=4000)
    ref, a, b = 3.0 + 0.2 * shared + 0.1 * z[0], 3.2 + 0.2 * shared + 0.1 * z[1], 3.15 + 0.2 * shared + 0.1 * z[2]
    gain, margin = E.closer(ref, a, b)
    unpaired = gain / math.sqrt((a.var() + b.var()) / 4000)
    assert gain == pytest.approx(a.mean() - b.mean()) and margin == pytest.approx(gain / ((a - b).std(ddof=1) / math.sqrt(4000)))
    assert margin > 1.8 * unpaired  # (the shared part cancels in a_i - b_i)
    gain, margin = E.closer(ref, a, rng.permutation(b))  # pairs broken: no shared noise left to cancel
    assert margin == pytest.approx(gain / math.sqrt((a.var() + b.var()) / 4000), rel=0.1)
    with pytest.raises(ValueError, match='same number of samples'):
        E.closer(ref, a, b[:-1])


def test_gen_ppl_project_ar_judge_matches_direct(ar_dir):
    path, m = ar_dir
    judge = E.LM(path)
    assert judge.kind == 'causal' and judge.tok_name == 'byte' and judge.n_real == 257
    tokens = np.random.default_rng(1).integers(0, 257, (5, 40))
    r = E.gen_ppl(judge, tokens, 'byte', batch_size=2)
    with torch.no_grad():  # logits at position i predict token i + 1; the MASK column is not a real token
        nll = direct_nll(m(torch.tensor(tokens))[..., :257], torch.tensor(tokens))
    assert r['gen_ppl'] == pytest.approx(math.exp(nll.mean().item()), rel=1e-5)


def test_gen_ppl_retokenizes_for_another_tokenizer(ar_dir):
    """GPT-2 ids judged by a byte-level judge: decoded (BOS/EOS dropped), re-encoded behind the judge's BOS."""
    path, m = ar_dir
    gpt2 = get_tokenizer('gpt2')
    texts = ['Hello world, this is a test.', 'Another sample of text here!']
    rows = [[50256] + gpt2.encode(t) for t in texts]
    L = min(map(len, rows))
    tokens = np.array([r[:L] for r in rows])
    r = E.gen_ppl(E.LM(path), tokens, 'gpt2')
    nlls = []
    for row in tokens:
        ids = torch.tensor([[256] + list(gpt2.decode(row[1:]).encode())])
        with torch.no_grad():
            nlls.append(direct_nll(m(ids)[..., :257], ids).item())
    assert r['retokenized'] and r['gen_ppl'] == pytest.approx(math.exp(np.mean(nlls)), rel=1e-5)


def test_gen_ppl_of_prompted_samples_scores_the_continuation_only(ar_dir):
    """Samples whose first n_prompt ids were forced: the NLL of the generated tokens given the prompt, and their
    entropy; the forced text is not scored."""
    path, m = ar_dir
    tokens = np.random.default_rng(2).integers(0, 256, (3, 20))
    tokens[:, :6] = [256, *b'Hello']
    r = E.gen_ppl(E.LM(path), tokens, 'byte', n_prompt=6)
    with torch.no_grad():
        lp = torch.log_softmax(m(torch.tensor(tokens))[..., :257].double(), -1)[:, :-1]
        nll = -lp.gather(-1, torch.tensor(tokens)[:, 1:, None]).squeeze(-1)[:, 5:].mean(1)  # tokens 6..19
    assert r['n_prompt'] == 6 and r['gen_ppl'] == pytest.approx(math.exp(nll.mean().item()), rel=1e-5)
    assert r['entropy'] == pytest.approx(E.unigram_entropy(tokens[:, 6:]).mean())
    # retokenized (GPT-2 judge text of byte samples would be the usual case; here GPT-2 ids for the byte judge):
    # prompt and continuation encoded apart, the first scored position right after the prompt's judge tokens
    gpt2 = get_tokenizer('gpt2')
    rows = np.array([[50256] + gpt2.encode(' Hello there') + gpt2.encode(' my friend and you')[:4]])
    n_prompt = 1 + len(gpt2.encode(' Hello there'))
    seqs, first = E.judge_inputs(E.LM(path), rows, 'gpt2', n_prompt=n_prompt)
    assert first == [1 + len(' Hello there')]
    assert bytes(seqs[0][first[0]:].tolist()) == gpt2.decode(rows[0, n_prompt:].tolist()).encode()
    with torch.no_grad():  # and the NLL is that of those judge tokens only
        lp = torch.log_softmax(m(seqs[0][None])[0, :-1, :257].double(), -1)
        nll = -lp.gather(-1, seqs[0][1:, None]).squeeze(-1)[first[0] - 1:].mean()
    r = E.gen_ppl(E.LM(path), rows, 'gpt2', n_prompt=n_prompt)
    assert r['retokenized'] and r['gen_ppl'] == pytest.approx(math.exp(nll.item()), rel=1e-5)


def test_gen_ppl_scores_inputs_longer_than_the_judge_in_windows(tmp):
    # windows(): every position from `first` on scored once, no window longer than the context, and a window that
    # does not start at the sequence's start has BOS (-1 here), then the text just before what it scores
    for n, first, n_ctx in [(10, 1, 16), (17, 1, 16), (40, 1, 16), (41, 3, 16), (100, 30, 16), (33, 5, 7), (9, 1, 2)]:
        scored = []
        for w, f in E.windows(torch.arange(n), first, n_ctx, bos=-1):
            assert len(w) <= n_ctx and 1 <= f < len(w)
            if w[0] != 0:
                assert w[0] == -1 and f >= n_ctx - n_ctx // 2 and w[1:].tolist() == list(range(w[1], w[-1] + 1))
            scored += w[f:].tolist()
        assert scored == list(range(first, n))
    with pytest.raises(ValueError, match='context of 1 token'):  # (it looped for ever)
        E.windows(torch.arange(5), 1, 1, bos=-1)
    # a causal judge with its attention cut (attn_out = 0) predicts from the current token alone: scored in windows
    # of 16 it must give the NLLs of one full pass exactly
    m = tiny_dit(causal=True, block_size=64, seed=2)
    for b in m.blocks:
        b.attn_out.weight.data.zero_()
    path = save_pretrained(m, str(tmp / 'ar_no_attention'))
    tokens = np.random.default_rng(0).integers(0, 256, (3, 40))
    tokens[:, 0] = 256
    full, short = E.LM(path), E.LM(path)
    short.n_ctx = 16
    a, b = E.gen_ppl(full, tokens, 'byte', batch_size=2), E.gen_ppl(short, tokens, 'byte', batch_size=2)
    assert a['n_windowed'] == 0 and b['n_windowed'] == 3
    assert b['gen_ppl'] == pytest.approx(a['gen_ppl'], rel=1e-6) and b['nll_std'] == pytest.approx(a['nll_std'], rel=1e-6)
    # MAUVE's features are those of the whole text: an over-long input is refused there, not cut
    with pytest.raises(ValueError, match='more than the context'):
        E.judge_pass(short, list(torch.from_numpy(tokens)), hidden=True)


class UnigramJudge:
    """A judge whose next-token distribution is exp(lp) whatever the context: every NLL is -lp[id], by hand."""
    kind, name, n_ctx, device, mask = 'causal', 'unigram', 1024, torch.device('cpu'), None

    def __init__(self, tok_name, lp):
        self.tok, self.tok_name, self.lp, self.n_real = get_tokenizer(tok_name), tok_name, lp, len(lp)
        self.bos = self.eos = self.tok.eos_token_id

    def logits(self, ids, attn=None, hidden=False, positions=None):
        return self.lp.expand(*ids.shape, -1), None


def test_gen_ppl_duo_protocol_hand_checked():
    """DUO's protocol on three GPT-2 samples whose scored tokens are written out by hand: retokenized (' ' + 'the'
    becomes ' the'), position 0 never scored, of the EOS only the first of a sample (a padding EOS too, when the
    sample has none), and exp(total NLL / total count). Each rule changes the number; the SDTT protocol's too."""
    torch.manual_seed(0)
    lp = torch.log_softmax(3 * torch.randn(50257, dtype=torch.float64), -1)
    judge, E_ = UnigramJudge('gpt2', lp), 50256
    THE, _THE, SP, CAT, DOG, HELLO, WORLD, A, SAT = 1169, 262, 220, 3797, 3290, 15496, 995, 257, 3332
    tokens = np.array([[E_, SP, THE, CAT, E_, E_, DOG],       # -> E ' the' ' cat' E E ' dog' (+ a pad E)
                       [HELLO, E_, WORLD, E_, E_, A, SAT],    # canonical already: the first E is scored
                       [HELLO, SP, THE, CAT, SAT, A, DOG]])   # -> 6 tokens, no E: its first padding E is scored
    nll = lambda ids: [-lp[i].item() for i in ids]
    scored = [[_THE, CAT, DOG], [E_, WORLD, A, SAT], [_THE, CAT, SAT, A, DOG, E_]]
    total = sum(sum(nll(s)) for s in scored)
    count = sum(len(s) for s in scored)
    r = E.gen_ppl(judge, tokens, 'gpt2', batch_size=8, protocol='duo')
    assert r['protocol'] == 'duo' and r['n_scored'] == count == 13
    assert r['gen_ppl'] == pytest.approx(math.exp(total / count), rel=1e-12)
    assert r['nll_per_sample'] == pytest.approx([np.mean(nll(s)) for s in scored], abs=1e-6)
    assert r['entropy'] == pytest.approx(E.unigram_entropy(tokens).mean())
    # each rule matters here: per-sample means, every EOS scored, no retokenization all give other numbers
    per_sample = math.exp(np.mean([np.mean(nll(s)) for s in scored]))
    all_eos = [[_THE, CAT, E_, E_, DOG, E_], [E_, WORLD, E_, E_, A, SAT], scored[2]]
    raw = [[SP, THE, CAT, DOG], [E_, WORLD, A, SAT], [SP, THE, CAT, SAT, A, DOG]]
    for other in (per_sample, *(math.exp(sum(sum(nll(s)) for s in ss) / sum(map(len, ss))) for ss in (all_eos, raw))):
        assert abs(other / r['gen_ppl'] - 1) > 1e-3
    # the SDTT protocol: the ids as sampled, positions 1..6 all scored, the mean of per-sample means
    sdtt = E.gen_ppl(judge, tokens, 'gpt2', batch_size=8)
    assert sdtt['protocol'] == 'sdtt'
    assert sdtt['gen_ppl'] == pytest.approx(math.exp(np.mean([np.mean(nll(t[1:])) for t in tokens])), rel=1e-12)
    # padding is per group of batch_size samples (DUO pads one sampling batch): alone, the third sample has no pad
    alone = E.gen_ppl(judge, tokens, 'gpt2', batch_size=1, protocol='duo')
    assert alone['n_scored'] == count - 1
    assert alone['nll_per_sample'][2] == pytest.approx(np.mean(nll(scored[2][:-1])), abs=1e-6)
    with pytest.raises(ValueError, match='unconditional'):
        E.gen_ppl(judge, tokens, 'gpt2', protocol='duo', n_prompt=2)


def test_gen_ppl_duo_protocol_truncates_to_the_sample_length():
    """Bytes that are no UTF-8 decode to U+FFFD, 3 bytes when encoded again: the retokenized text is longer than the
    sample and is cut to its length (then scored with the EOS rule)."""
    lp = torch.log_softmax(torch.linspace(-3, 3, 257, dtype=torch.float64), -1)
    judge = UnigramJudge('byte', lp)
    r = E.gen_ppl(judge, np.array([[104, 0xFF, 105, 256, 0xFF, 106]]), 'byte', protocol='duo')
    kept = [239, 191, 189, 105, 256]  # of 104 239 191 189 105 256 | 239 191 189 106
    assert r['n_scored'] == 5 and r['gen_ppl'] == pytest.approx(math.exp(-np.mean([lp[i].item() for i in kept])))


def test_unigram_entropy_hand_made():
    h = E.unigram_entropy(np.array([[1, 1, 1, 1], [1, 2, 3, 4], [7, 2, 7, 2], [5, 5, 5, 9]]))
    expected = [0.0, math.log(4), math.log(2), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))]
    assert np.allclose(h, expected, rtol=1e-12, atol=1e-12)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 50, (6, 100))
    ref = [-(p * np.log(p)).sum() for p in (np.unique(r, return_counts=True)[1] / 100 for r in x)]
    assert np.allclose(E.unigram_entropy(x), ref, rtol=1e-12)


def write_lambada(path, texts):
    with open(path, 'w') as f:
        f.writelines(json.dumps({'text': t}) + '\n' for t in texts)
    return str(path)


PASSAGES = ['The old man walked his dog', 'She fed the hungry cat', 'The kids played with the dog']
ANSWER = list(b' dog')


def fake_dit(ids, sigma=None, positions=None):
    """Predicts ' dog' right before the final EOS whatever the input: the answers to PASSAGES are known. Its raw MASK
    logit is the largest (as an untrained one can be): SUBS gives MASK probability 0, the argmax must skip it."""
    B, L = ids.shape
    logits = torch.zeros(B, L, 258)
    logits[:, L - 1 - len(ANSWER) + torch.arange(len(ANSWER)), ANSWER] = 5.0
    logits[..., 257] = 10.0
    return logits if positions is None else logits.flatten(0, 1)[positions]


def test_lambada_accuracy_known_answers(tmp, dit_dir):
    texts = E.read_lambada(write_lambada(tmp / 'lambada3.jsonl', PASSAGES))
    lm = E.LM(dit_dir[0])
    lm.fwd = fake_dit
    r = E.lambada(lm, texts, n_t=4, batch_size=8)
    assert r['lambada_acc'] == pytest.approx(2 / 3) and r['n_words'] == 3 and r['n_target_tokens'] == 12
    # the NELBO is an unbiased estimate of sum_j -log p_j x (1 - 1e-3) (masked w.p. (1 - 1e-3) t, weighted 1/t)
    r = E.lambada(lm, texts, n_t=2048, batch_size=4096)
    logp = torch.log_softmax(fake_dit(torch.zeros(1, 40, dtype=torch.long))[0, -5:-1, :257], -1)
    exact = [-logp[torch.arange(4), list(w)].sum().item() * (1 - 1e-3) for w in (b' dog', b' cat', b' dog')]
    assert r['nll_per_word'] == pytest.approx(np.mean(exact), rel=0.03)


def test_lambada_ppl_is_mdlms_wrapped_per_token_protocol(dit_dir):
    """MDLM's LAMBADA perplexity: passages detokenized ('\\n' + stripped, curly double quotes straight), EOS after
    each, concatenated and cut into BOS + 6 + EOS rows (model length 8), the remainder dropped; then the per-token
    NELBO of every token of the rows. A denoiser with the same distribution everywhere makes it (1 - 1e-3) x the mean
    -log p of the row tokens in expectation."""
    texts = ['He said \u201chi\u201d ', '  ok', 'xyz']
    stream = [*b'\nHe said "hi"', 256, *b'\nok', 256, *b'\nxyz', 256]  # 13 + 1 + 3 + 1 + 4 + 1 = 23 tokens
    rows, dropped = E.lambada_rows(texts, get_tokenizer('byte'), 8, 256, 256)
    assert rows.tolist() == [[256, *stream[i:i + 6], 256] for i in (0, 6, 12)] and dropped == 23 - 18
    lp = torch.log_softmax(torch.linspace(-2, 2, 257), -1)
    lm = E.LM(dit_dir[0])
    lm.n_ctx = 8
    lm.fwd = lambda ids, sigma=None, positions=None: torch.cat([lp, torch.tensor([0.0])]).expand(len(positions), -1)
    r = E.lambada_ppl(lm, texts, draws=2048, batch_size=4096)
    assert (r['n_rows'], r['n_tokens'], r['n_dropped'], r['n_passages']) == (3, 24, 5, 3)
    exact = (1 - 1e-3) * -lp[torch.from_numpy(rows)].double().mean().item()
    assert r['nelbo'] == pytest.approx(exact, rel=0.02) and r['lambada_ppl'] == pytest.approx(math.exp(r['nelbo']))


def test_cli_lambada_ppl_record(tmp, dit_dir):
    lam = write_lambada(tmp / 'lambada_many.jsonl', [f'Passage {i} ends with the word dog' for i in range(12)])
    out = tmp / 'lambada_ppl'
    run_cli('--eval=lambada_ppl', f'--init_from={dit_dir[0]}', f'--lambada_path={lam}', '--val_draws=2', f'--out_dir={out}')
    rec = json.loads(open(out / 'eval.jsonl').readline())
    want = E.lambada_ppl(E.LM(dit_dir[0]), E.read_lambada(lam), draws=2)
    assert rec['eval'] == 'lambada_ppl' and rec['metrics']['n_rows'] == 3  # 12 x 35 tokens -> 3 rows of 126 + 2
    assert rec['metrics']['lambada_ppl'] == pytest.approx(want['lambada_ppl'], rel=1e-9)


@pytest.mark.parametrize('schedule', list(diffusion.NOISE_SCHEDULES))
def test_nelbo_equals_mdlm_loss_on_the_same_draws(tmp, dit_dir, schedule):
    """The evaluation NELBO (output layer at the masked positions, one forward per distinct x_t) against
    diffusion.mdlm_loss on full logits with the same t and masks, under the schedule in the checkpoint's meta."""
    import diffusion as D
    n_t, L = 4, 20
    lm = E.LM(save_pretrained(dit_dir[1], str(tmp / schedule), meta=dict(noise_schedule=schedule)))
    assert lm.schedule == schedule
    x0 = torch.randint(0, 256, (3, L))
    maskable = torch.ones_like(x0, dtype=torch.bool)
    maskable[1, :10] = False  # clamped context, as LAMBADA's
    got = E._nelbo(lm, x0, maskable, [0, 1, 2], n_t, 0, 1e-3)
    t, u = E._draws([0, 1, 2], n_t, L, 0, 1e-3)
    x0r = x0.repeat_interleave(n_t, 0)
    xt = torch.where(maskable.repeat_interleave(n_t, 0) & (u < D.move_chance(t, schedule)[:, None]), 257, x0r)
    with torch.no_grad():
        ref = [D.mdlm_loss(lm.model(xt[i:i + 1]), x0r[i:i + 1], xt[i:i + 1], t[i:i + 1], 257, schedule=schedule).item() * L
               for i in range(len(xt))]
    torch.testing.assert_close(got, torch.tensor(ref, dtype=torch.float64).view(3, n_t).mean(1), rtol=1e-5, atol=1e-6)


def test_val_ppl_is_the_per_token_nelbo_of_the_val_rows(tmp, dit_dir):
    import diffusion as D
    d, n, L = tmp / 'val3', 3, 16
    d.mkdir()
    rows = np.random.default_rng(0).integers(0, 257, (n, L))
    rows.astype(np.uint16).tofile(d / 'val.bin')
    (d / 'meta.json').write_text(json.dumps(dict(BYTE_META, vocab_size=258, row_len=L, n_val_rows=n, n_train_rows=0)))
    lm = E.LM(dit_dir[0])
    r = E.val_ppl(lm, str(d), draws=2)
    t, u = E._draws(range(n), 2, L, 0, 1e-3)  # MDLM's lowest t, 1e-3
    x0 = torch.from_numpy(rows).repeat_interleave(2, 0)
    xt = torch.where(u < D.move_chance(t)[:, None], 257, x0)
    with torch.no_grad():
        nelbo = np.mean([D.mdlm_loss(lm.model(xt[i:i + 1]), x0[i:i + 1], xt[i:i + 1], t[i:i + 1], 257).item()
                         for i in range(2 * n)])  # per token: mdlm_loss divides by the tokens of its row
    assert r['val_nelbo'] == pytest.approx(nelbo, rel=1e-5) and r['val_ppl'] == pytest.approx(math.exp(nelbo), rel=1e-5)


def test_lambada_diffusion_independent_of_batching(tmp, dit_dir):
    texts = E.read_lambada(write_lambada(tmp / 'lambada3.jsonl', PASSAGES))
    lm = E.LM(dit_dir[0])
    a, b = E.lambada(lm, texts, n_t=8, batch_size=8), E.lambada(lm, texts, n_t=8, batch_size=64)
    assert a['nll_per_word'] == pytest.approx(b['nll_per_word'], rel=1e-6) and a['lambada_acc'] == b['lambada_acc']


def test_lambada_hf_gpt2_matches_direct(tmp, gpt2_dir):
    path, m = gpt2_dir
    texts = ['The quick brown fox jumps over the lazy', 'It was a dark and stormy night',
             'To be or not to be, that is the question']
    r = E.lambada(E.LM(path), E.read_lambada(write_lambada(tmp / 'l.jsonl', texts)), batch_size=2)
    tok, nlls, correct = get_tokenizer('gpt2'), [], []
    for t in texts:
        ctx, word = t.rsplit(' ', 1)
        c, w = tok.encode(ctx), tok.encode(' ' + word)
        ids = torch.tensor([[50256] + c + w])
        with torch.no_grad():
            lp = torch.log_softmax(m(ids).logits[0, len(c): len(c) + len(w)].double(), -1)
        nlls.append(-lp[torch.arange(len(w)), w].sum().item())
        correct.append(lp.argmax(-1).tolist() == w)
    assert r['lambada_acc'] == np.mean(correct) and r['n_truncated'] == 0
    assert r['lastword_ppl'] == pytest.approx(math.exp(np.mean(nlls)), rel=1e-5)


def test_compiled_project_judge_gives_features_and_takes_int32(ar_dir):
    """--compile=True with a project judge: gen-PPL (compiled) then MAUVE features (a hook, so eager) on int32 ids as
    sample.py stores them."""
    judge, tokens = E.LM(ar_dir[0], compile=True), np.array([[256, 1, 2, 3, 4], [256, 5, 6, 7, 8]], dtype=np.int32)
    ppl = E.gen_ppl(judge, tokens, 'byte', batch_size=2)['gen_ppl']
    assert math.isclose(ppl, E.gen_ppl(E.LM(ar_dir[0]), tokens, 'byte', batch_size=2)['gen_ppl'], rel_tol=1e-4)
    f = E.judge_pass(judge, E.judge_inputs(judge, tokens, 'byte')[0], batch_size=2, hidden=True)
    assert f.shape == (2, 32) and np.isfinite(f).all()


def test_features_are_last_hidden_state_of_final_token(gpt2_dir):
    path, m = gpt2_dir
    seqs = [torch.tensor([50256, 10, 20, 30, 40]), torch.tensor([50256, 7, 8])]  # padded in one batch
    f = E.judge_pass(E.LM(path), seqs, batch_size=2, hidden=True)
    with torch.no_grad():
        ref = [m(s[None], output_hidden_states=True).hidden_states[-1][0, -1].numpy() for s in seqs]
    assert f.shape == (2, 32) and np.allclose(f, ref, rtol=1e-5, atol=1e-6)


@pytest.fixture
def faiss_one_thread():
    """faiss's OpenMP threads spin-wait: on a busy 2-core machine k-means of 600 points takes 20 s instead of 0.1 s."""
    import faiss
    n = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(n)


def test_mauve_same_vs_different(faiss_one_thread):
    rng = np.random.default_rng(0)
    p, q = rng.normal(size=(300, 8)), rng.normal(size=(300, 8))
    far = rng.normal(size=(300, 8)) + 3.0
    same, diff = E.mauve_score(p, q, seeds=2), E.mauve_score(p, far, seeds=2)
    assert same['mauve'] > 0.8 and diff['mauve'] < 0.1 and len(same['mauve_per_seed']) == 2


def test_mauve_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, 'mauve', None)
    with pytest.raises(ImportError, match='pip install mauve-text'):
        E.mauve_score(np.zeros((4, 2)), np.zeros((4, 2)))


def write_sample_file(out_dir, name, tokens, steps, round, mode='uncond', **extra):
    settings = dict(model='tiny', num_steps=steps, sampler='ancestral', nfe=steps, mode=mode, meta=dict(BYTE_META, round=round))
    save_samples(os.path.join(out_dir, 'samples', 'uncond' if mode == 'uncond' else 'cond', name), tokens, settings,
                 ['x'] * len(tokens), **extra)


def run_cli(*args):
    E.main(list(args))


def test_cli_genppl_mauve_lambada_valppl_plot(tmp, ar_dir, dit_dir, faiss_one_thread):
    out = str(tmp / 'cli')
    rng = np.random.default_rng(0)
    for steps, rnd in [(8, 0), (32, 0), (128, 0), (8, 1), (32, 1)]:
        write_sample_file(out, f'r{rnd}_T{steps}', rng.integers(0, 256, (4, 32)), steps, rnd)
    refs = rng.integers(0, 256, (3, 20))
    write_sample_file(out, 'cond', np.repeat(refs, 2, 0), 8, 0, mode='cond_prefix', ref_tokens=refs)
    data = tmp / 'data'
    data.mkdir()
    rng.integers(0, 257, (6, 32)).astype(np.uint16).tofile(data / 'val.bin')
    (data / 'meta.json').write_text(json.dumps(dict(BYTE_META, vocab_size=258, row_len=32, n_val_rows=6, n_train_rows=0)))
    lam = write_lambada(tmp / 'lambada3.jsonl', PASSAGES)
    run_cli('--eval=genppl', f'--samples={out}/samples/uncond', f'--judge={ar_dir[0]}', f'--out_dir={out}', '--plot')
    run_cli('--eval=mauve', f'--samples={out}/samples/cond', f'--judge={ar_dir[0]}', f'--out_dir={out}', '--mauve_seeds=1')
    run_cli('--eval=lambada,valppl', f'--init_from={dit_dir[0]}', f'--lambada_path={lam}', f'--data_dir={data}',
            '--n_t=4', '--val_draws=2', f'--out_dir={out}')
    recs = [json.loads(line) for line in open(os.path.join(out, 'eval.jsonl'))]
    assert [r['eval'] for r in recs] == ['genppl'] * 5 + ['mauve', 'lambada', 'valppl']
    g = next(r for r in recs if r['source'].endswith('r1_T8.npz'))
    assert {'model', 'round', 'num_steps', 'sampler', 'nfe', 'metrics', 'settings', 'commit', 'config'} <= set(g)
    assert g['metrics']['n_samples'] == 4 and g['num_steps'] == 8 and g['round'] == 1 and g['model'] == 'tiny'
    assert 0 <= recs[5]['metrics']['mauve'] <= 1 + 1e-9 and recs[5]['metrics']['n_refs'] == 3  # (an area: 1 + 2e-16 seen)
    assert recs[6]['metrics']['n_words'] == 3 and recs[7]['metrics']['n_rows'] == 6
    assert os.path.getsize(os.path.join(out, 'genppl.png')) > 10_000
    # a glob over the directory skips the .jsonl text files sample.py writes beside the .npz
    assert [os.path.basename(p) for p in E.sample_files(f'{out}/samples/uncond/*')] == \
        ['r0_T128.npz', 'r0_T32.npz', 'r0_T8.npz', 'r1_T32.npz', 'r1_T8.npz']


def test_cli_prompted_files_records_and_plot_filter(tmp, ar_dir):
    out = tmp / 'prompted'
    rng = np.random.default_rng(0)
    prompt = np.array([[256, *b'Hello']])
    tokens = np.concatenate([np.repeat(prompt, 3, 0), rng.integers(0, 256, (3, 18))], 1)
    settings = dict(model='tiny', num_steps=64, sampler='cached', nfe=11.5, prompt='Hello', meta=dict(BYTE_META, round=2))
    save_samples(str(out / 'samples' / 'cond' / 'p'), tokens, settings, ['x'] * 3, prompt_ids=prompt)
    run_cli('--eval=genppl', f'--samples={out}/samples', f'--judge={ar_dir[0]}', f'--out_dir={out}')
    rec = json.loads(open(out / 'eval.jsonl').readline())
    want = E.gen_ppl(E.LM(ar_dir[0]), tokens, 'byte', n_prompt=6)  # the continuation only, given the prompt
    assert rec['metrics']['n_prompt'] == 6 and rec['metrics']['gen_ppl'] == pytest.approx(want['gen_ppl'], rel=1e-9)
    assert (rec['model'], rec['round'], rec['num_steps'], rec['sampler'], rec['nfe']) == ('tiny', 2, 64, 'cached', 11.5)
    with pytest.raises(ValueError, match='no genppl records of unconditional samples'):  # the figure leaves them out
        E.plot_genppl(str(out / 'eval.jsonl'), str(out / 'g.png'))


def test_cli_genppl_protocol_duo_is_recorded(tmp, ar_dir):
    out = tmp / 'duo'
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 257, (5, 20))  # some EOS (256) among the bytes
    settings = dict(model='tiny', num_steps=8, sampler='ancestral', meta=BYTE_META)
    save_samples(str(out / 'samples' / 'uncond' / 'u'), tokens, settings, ['x'] * 5)
    run_cli('--eval=genppl', f'--samples={out}/samples', f'--judge={ar_dir[0]}', f'--out_dir={out}',
            '--genppl_protocol=duo', '--batch_size=2')
    rec = json.loads(open(out / 'eval.jsonl').readline())
    want = E.gen_ppl(E.LM(ar_dir[0]), tokens, 'byte', batch_size=2, protocol='duo')
    assert rec['metrics']['protocol'] == rec['config']['genppl_protocol'] == 'duo'
    assert rec['metrics']['gen_ppl'] == pytest.approx(want['gen_ppl'], rel=1e-9)
    assert want['gen_ppl'] != pytest.approx(E.gen_ppl(E.LM(ar_dir[0]), tokens, 'byte')['gen_ppl'], rel=1e-3)
    with pytest.raises(ValueError, match='genppl_protocol must be one of'):
        E.main(['--eval=genppl', f'--samples={out}/samples', '--genppl_protocol=mdlm'])


def test_cli_warns_when_lambada_contexts_are_cut(tmp, dit_dir, capsys):
    lam = write_lambada(tmp / 'long_lambada.jsonl', ['word ' * 40 + 'end', 'The old man walked his dog'])
    run_cli('--eval=lambada', f'--init_from={dit_dir[0]}', f'--lambada_path={lam}', '--n_t=1',
            f'--out_dir={tmp / "lam_warn"}')
    assert 'warning: 1 of 2 LAMBADA contexts were cut on the left to fit the 128-token context' in capsys.readouterr().out


def test_plot_keeps_judges_with_the_same_file_name_apart(tmp, monkeypatch):
    rec = lambda judge, steps, ppl, protocol='sdtt': dict(
        eval='genppl', model='m', round=0, num_steps=steps, sampler='ancestral', settings={}, config=dict(judge=judge),
        metrics=dict(seq_len=32, gen_ppl=ppl, entropy=4.0, protocol=protocol))
    jsonl = tmp / 'two_judges.jsonl'
    jsonl.write_text(''.join(json.dumps(rec(*r)) + '\n' for r in [
        ('out/judge_small/ckpt.pt', 8, 62.0), ('out/judge_small/ckpt.pt', 32, 38.0),
        ('out/judge_large/ckpt.pt', 8, 52.0), ('out/judge_large/ckpt.pt', 32, 28.0),
        ('out/judge_large/ckpt.pt', 8, 42.0, 'duo'), ('out/judge_large/ckpt.pt', 32, 22.0, 'duo')]))
    figs = []
    monkeypatch.setattr(E, '_save_figure', lambda fig, png: figs.append(fig) or png)
    E.plot_genppl(str(jsonl), str(tmp / 'two_judges.png'))
    lines = {ln.get_label(): list(ln.get_ydata()) for ln in figs[0].axes[0].get_lines()}
    assert lines == {'m round 0 [out/judge_large/ckpt.pt]': [52.0, 28.0], 'm round 0 [out/judge_small/ckpt.pt]': [62.0, 38.0],
                     'm round 0 [out/judge_large/ckpt.pt duo]': [42.0, 22.0]}  # (DUO's protocol: another line)


def test_a_record_after_a_line_cut_short_is_kept(tmp, capsys):
    jsonl = str(tmp / 'torn' / 'eval.jsonl')
    settings = dict(model='m', num_steps=8, meta={}, mode='uncond')
    E.write_record(jsonl, 'genppl', dict(gen_ppl=30.0, entropy=2.9, seq_len=16), {}, settings, 'a.npz')
    with open(jsonl, 'a') as f:
        f.write('{"eval": "genppl", "time": "2026-')  # a kill mid-write
    E.write_record(jsonl, 'genppl', dict(gen_ppl=20.0, entropy=2.8, seq_len=16), {}, {**settings, 'num_steps': 16}, 'b.npz')
    recs = E.read_records(jsonl)  # (the new record used to be glued onto the cut line: both unreadable)
    assert [r['source'] for r in recs] == ['a.npz', 'b.npz']
    assert f'{jsonl}: 1 line(s) left out' in capsys.readouterr().out
    with open(jsonl, 'a') as f:  # hand edits: --plot used to stop at them with an AttributeError / a KeyError
        f.write('[1, 2]\n' + json.dumps(dict(eval='genppl', model='m', num_steps=4, metrics={}, config={})) + '\n')
    E.plot_genppl(jsonl, str(tmp / 'torn' / 'genppl.png'))
    out = capsys.readouterr().out
    assert f'{jsonl}: 3 line(s) left out' in out and 'line 2: not JSON' in out
    assert "line 4: the line is not a JSON object but list" in out and "line 5: no field 'settings'" in out
    assert [r['source'] for r in E.read_records(jsonl)] == ['a.npz', 'b.npz']
    with open(jsonl, 'a') as f:
        f.write(json.dumps(dict(eval='genppl', model='m', num_steps=4, settings={}, config={}, metrics={})) + '\n')
    E.plot_genppl(jsonl, str(tmp / 'torn' / 'genppl.png'))  # metrics without gen_ppl: left out too
    assert "line 6: no field metrics.'gen_ppl'" in capsys.readouterr().out


def test_two_ranks_equal_one(tmp, ar_dir, dit_dir):
    tokens = np.random.default_rng(2).integers(0, 256, (5, 24))
    texts = E.read_lambada(write_lambada(tmp / 'lambada3.jsonl', PASSAGES))
    one = (E.gen_ppl(E.LM(ar_dir[0]), tokens, 'byte'), E.lambada(E.LM(dit_dir[0]), texts, n_t=4),
           E.gen_ppl(E.LM(ar_dir[0]), tokens[:1], 'byte'), E.lambada(E.LM(dit_dir[0]), texts[:1], n_t=4))
    import torch.multiprocessing as mp
    mp.spawn(_rank_main, args=(str(tmp / 'dist'), ar_dir[0], dit_dir[0], tokens, texts), nprocs=2)
    two = json.load(open(tmp / 'dist'))
    assert two[0]['gen_ppl'] == pytest.approx(one[0]['gen_ppl'], rel=1e-6)
    assert two[0]['nll_per_sample'] == pytest.approx(one[0]['nll_per_sample'], abs=2e-6)  # gathered in sample order
    assert two[1]['nll_per_word'] == pytest.approx(one[1]['nll_per_word'], rel=1e-6)
    assert two[2]['gen_ppl'] == pytest.approx(one[2]['gen_ppl'], rel=1e-6)  # rank 1 scored nothing
    assert two[3]['nll_per_word'] == pytest.approx(one[3]['nll_per_word'], rel=1e-6)  # (n_t columns: crashed)


def _rank_main(rank, out, ar, dit, tokens, texts):
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method='tcp://127.0.0.1:29533', rank=rank, world_size=2)
    res = [E.gen_ppl(E.LM(ar), tokens, 'byte'), E.lambada(E.LM(dit), texts, n_t=4), E.gen_ppl(E.LM(ar), tokens[:1], 'byte'),
           E.lambada(E.LM(dit), texts[:1], n_t=4)]
    if rank == 0:
        with open(out, 'w') as f:
            json.dump(res, f, default=float)
    dist.destroy_process_group()


def test_bad_inputs(tmp, ar_dir, dit_dir, gpt2_dir):
    judge = E.LM(ar_dir[0])
    with pytest.raises(ValueError, match='MASK'):
        E.gen_ppl(judge, np.full((2, 8), 257), 'byte')
    with pytest.raises(ValueError, match='outside'):
        E.gen_ppl(judge, np.full((2, 8), 300), 'byte')
    assert E.gen_ppl(judge, np.zeros((1, 200), dtype=np.int64), 'byte')['n_windowed'] == 1  # longer than its 128
    with pytest.raises(ValueError, match='1 of 2 samples have no judge token to score'):  # not a NaN gen-PPL
        E.gen_ppl(E.LM(gpt2_dir[0]), np.array([[256, *b'hello world'], [256] * 12]), 'byte')
    bad = tmp / 'bad'
    bad.mkdir()
    np.savez(bad / 'flat.npz', tokens=np.zeros(5, dtype=np.int32), settings=np.array('{}'))
    with pytest.raises(ValueError, match='shape'):
        E.read_samples(str(bad / 'flat.npz'))
    (bad / 'junk.npz').write_text('not a zip')
    with pytest.raises(ValueError, match='not a sample file'):
        E.read_samples(str(bad / 'junk.npz'))
    with pytest.raises(FileNotFoundError, match='no sample files'):
        E.sample_files(str(tmp / 'nothing_here'))
    (bad / 'lambada.txt').write_text('The old man walked his dog\n')
    with pytest.raises(ValueError, match='text'):
        E.read_lambada(str(bad / 'lambada.txt'))
    gpt2_as_byte = np.array([[256, 257, 284, 286, 290]])  # GPT-2 ids (' a' is 257) in a file that says byte
    with pytest.raises(ValueError, match='not written with it .another tokenizer'):
        E.gen_ppl(judge, gpt2_as_byte, 'byte')
    with pytest.raises(ValueError, match="dtype must be one of"):
        run_cli('--eval=lambada', f'--init_from={dit_dir[0]}', '--dtype=bf16')
    for missing in (str(tmp / 'no_such_judge'), 'out/kld_small/ckpt.pt', 'out/kld_small/round_7_steps_8'):
        with pytest.raises(FileNotFoundError, match='no checkpoint at'):  # a local path, not a hub download to fail
            E.LM(missing)
    with pytest.raises(ValueError, match='bidirectional'):
        E.gen_ppl(E.LM(dit_dir[0]), np.zeros((1, 8), dtype=np.int64), 'byte')
    with pytest.raises(ValueError, match='--eval'):
        run_cli('--eval=bleu')
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match='CUDA is not available'):
            run_cli('--eval=genppl', f'--samples={bad}', f'--judge={ar_dir[0]}', '--device=cuda')
    with pytest.raises(ValueError, match='needs --data_dir'):
        run_cli('--eval=valppl', f'--init_from={dit_dir[0]}')
    with pytest.raises(ValueError, match='val_rows'):
        run_cli('--eval=valppl', f'--init_from={dit_dir[0]}', '--data_dir=x', '--val_rows=-5')
    # a truncated copy of a real sample file; a file among many that cannot be scored is named
    write_sample_file(str(bad), 'good', np.full((2, 8), 97), 8, 0)
    good = str(bad / 'samples' / 'uncond' / 'good.npz')
    with open(good, 'rb') as f:
        head = f.read(300)
    (bad / 'cut.npz').write_bytes(head)
    with pytest.raises(ValueError, match='not a sample file'):
        E.read_samples(str(bad / 'cut.npz'))
    write_sample_file(str(bad), 'bos_only', np.full((2, 1), 256), 8, 0)
    with pytest.raises(ValueError, match='bos_only.npz: 2 of 2 samples have no judge token'):
        run_cli('--eval=genppl', f'--samples={bad}/samples/uncond', f'--judge={ar_dir[0]}', f'--out_dir={bad}')


def test_training_plot_marks_rounds_and_names_bad_input(tmp_path, monkeypatch):
    import matplotlib.axes
    run = tmp_path / 'kld'
    run.mkdir()
    recs = [dict(step=s, loss=0.02 + 0.01 * (s > 20), lr=1e-3, round=int(s > 20) + int(s > 40), tokens_per_s=1e4,
                 mfu=0.3, time=s) for s in range(10, 70, 10)]
    recs.insert(2, {'step': 20, 'val_distill_loss': 0.018})
    lines, plots = [], []
    axvline, plot = matplotlib.axes.Axes.axvline, matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, 'axvline', lambda ax, x, *a, **k: (lines.append(x), axvline(ax, x, *a, **k))[1])
    monkeypatch.setattr(matplotlib.axes.Axes, 'plot', lambda ax, *a, **k: (plots.append(k), plot(ax, *a, **k))[1])

    def draw(records, tail=''):
        (run / 'log.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records) + tail)
        lines.clear(), plots.clear()
        E.main(['--eval=', f'--train_log={run}'])
        assert (run / 'train.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
        return sorted(set(lines))
    # distill.py's round_done records place the boundaries, also between two log steps (round_every=25, log 10)
    done = [{'step': 25, 'round_done': 1, 'next_dt': 0.1}, {'step': 45, 'round_done': 2, 'next_dt': 0.2}]
    assert draw(recs + done, tail='{"step": 70, "loss": 0.0') == [25, 45]  # (a line cut by a kill is left out)
    assert draw(recs) == [20, 40]  # an older log: the last step logged with the old round number
    draw(recs[:1])  # one record: drawn as a point (a line through one point shows nothing)
    assert [k.get('marker') for k in plots] == ['.', '.']
    with pytest.raises(FileNotFoundError, match='distill.py out_dir'):
        E.plot_training(str(tmp_path / 'missing'))
    (run / 'log.jsonl').write_text(json.dumps({'step': 20, 'val_nelbo': 3.0}) + '\n')
    with pytest.raises(ValueError, match='no training records'):
        E.plot_training(str(run / 'log.jsonl'))
