"""e2e.py end to end at a micro scale (2 replicas, ~50 s): every stage runs, the tables and plots are written, and a second run
skips the finished stages and rebuilds the same tables. (The real run: README "Results".)"""
import fcntl
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import evaluate as E  # noqa: E402


def write_corpus(tmp_path):
    rng = random.Random(0)
    words = 'the cat sat on a mat and the dog ran to the park while birds sang in trees'.split()
    corpus = tmp_path / 'docs.jsonl'
    corpus.write_text(''.join(json.dumps({'text': ' '.join(rng.choice(words) for _ in range(40))}) + '\n'
                              for _ in range(300)))
    return corpus


def test_e2e_micro_pipeline_replicas_and_rerun_skips_finished_stages(tmp_path):
    """Two replicas (seeds 1 and 2) of the whole pipeline: each replica's tables, and the table across them."""
    corpus = write_corpus(tmp_path)
    net = ('--n_layer=1 --n_embd=32 --n_head=2 --cond_dim=16 --max_iters=12 --batch_size=8 --global_batch_size=8 '
           '--log_interval=4 --eval_interval=12 --eval_iters=1 --ckpt_interval=12')
    work = tmp_path / 'e2e'
    cmd = [sys.executable, 'e2e.py', f'--corpus={corpus}', '--seq_len=32', f'--work_dir={work}', f'--teacher_args={net}',
           f'--judge_args={net}', '--sdtt_args=--max_iters=4 --round_every=2 --batch_size=8 --global_batch_size=8 '
           '--log_interval=2 --eval_interval=4 --eval_iters=1 --ckpt_interval=4 --min_num_sampling_steps=2',
           '--teacher_num_steps=8', '--min_steps=2', '--n_samples=8', '--sample_batch=8', '--eval_batch=8',
           '--val_rows=16', '--replicas=2']
    run = lambda: subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    r = run()  # a 12-step teacher is worse than the unigram model: e2e stops before SDTT, the teacher kept
    assert r.returncode != 0 and 'stuck near the unigram plateau' in r.stderr, r.stdout[-2000:] + r.stderr[-2000:]
    assert (work / 'replica_0' / 'teacher' / 'ckpt.pt').exists() and not (work / 'replica_0' / 'sdtt').exists()
    cmd.append('--min_teacher_gain=0')  # no check: the rest of the pipeline, from the finished teacher on
    r = run()
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    top, gains, closed = work, {}, {}
    for k in (1, 0):
        work = top / f'replica_{k}'
        assert f'--seed={k + 1}' in (work / 'logs' / 'teacher+judge.0.log').read_text()  # every run reseeded
        gains[k], closed[k] = check_replica(work)
    nll = [[r['metrics']['nll_per_sample'] for r in E.read_records(top / f'replica_{k}' / 'eval.jsonl')
            if r['eval'] == 'genppl' and r['num_steps'] == 8] for k in (0, 1)]
    assert nll[0] != nll[1]  # independent replicas: other teachers, other samples
    across = (top / 'results.md').read_text()
    for r, n in ((1, 4), (2, 2)):  # the mean gain over the replicas and its standard error (std / sqrt(2))
        line = next(line for line in across.splitlines() if line.startswith(f'| {r} | {n} | '))
        g = np.array([gains[0][r], gains[1][r]])
        assert f'| {g.mean():.4f} +- {g.std(ddof=1) / np.sqrt(2):.4f} |' in line, line
        closed_all = (closed[0][r][1] + closed[1][r][1]) / (closed[0][r][0] + closed[1][r][0])  # a ratio of sums
        assert f'| {sum(g > 0)}/2 |' in line and f'| {100 * closed_all:.0f}% |' in line, line
    assert (top / 'replicas.png').stat().st_size > 1000
    table = (work / 'results.md').read_text()
    again = run()
    assert again.returncode == 0 and again.stdout.count('done before, skipped') == 10, again.stdout[-2000:]
    without_timing = lambda text: [line for line in text.splitlines() if not line.startswith('Machine:')]
    assert without_timing((work / 'results.md').read_text()) == without_timing(table)
    # other settings in the same work_dir: an error, not the old stages' results under the new settings' headings
    other = subprocess.run([*cmd, '--n_samples=16'], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert other.returncode != 0 and 'finished sample stage run with other settings' in other.stderr, other.stderr
    assert '--n_samples=16' in other.stderr and without_timing((work / 'results.md').read_text()) == without_timing(table)


def check_replica(work):
    """One replica's files and SDTT check; returns its per-round paired gains and shares of the gap closed."""
    assert sorted(d for d in os.listdir(work / 'sdtt') if d.startswith('round_')) == ['round_1_steps_4',
                                                                                        'round_2_steps_2']
    recs = [json.loads(line) for line in open(work / 'eval.jsonl')]
    # the teacher at 2, 4, 8, 16 steps (to 2N), round 1 at 2, 4, round 2 at 2; a validation perplexity for each model
    assert sorted(r['eval'] for r in recs) == ['genppl'] * 7 + ['valppl'] * 3
    for png in ('genppl.png', 'teacher/train.png', 'judge/train.png', 'sdtt/train.png'):
        assert (work / png).stat().st_size > 1000, png
    table, gains, closed = (work / 'results.md').read_text(), {}, {}
    per_sample = {(os.path.basename(r['model']), r['num_steps']): r['metrics']['nll_per_sample']
                  for r in recs if r['eval'] == 'genppl'}
    for r, n, student in ((1, 4, 'round_1_steps_4'), (2, 2, 'round_2_steps_2')):
        # the SDTT check: one line per round, its verdict and its paired noise margin against the teacher at 8 steps
        line = next(line for line in table.splitlines() if line.startswith(f'| {r} | {n} | '))
        verdict, margin = [c.strip() for c in line.split('|')[6:8]]
        gain, expected = E.closer(per_sample['teacher', 8], per_sample['teacher', n], per_sample[student, n])
        assert margin == f'{expected:+.1f}' and verdict.startswith('yes' if gain > 0 else 'no'), line
        assert ('within noise' in verdict) == (abs(float(margin)) < 2), line
        ppl = {m: r['metrics']['gen_ppl'] for m in [('teacher', 8), ('teacher', n), (student, n)]
               for r in recs if r['eval'] == 'genppl' and (os.path.basename(r['model']), r['num_steps']) == m}
        gains[r] = gain
        closed[r] = (ppl['teacher', n] - ppl['teacher', 8], ppl['teacher', n] - ppl[student, n])
        gap = E.closer(per_sample['teacher', 8], per_sample['teacher', n], per_sample['teacher', 8])[1]
        want = f'{100 * closed[r][1] / closed[r][0]:.0f}%' if abs(gap) >= 2 else f'no gap ({gap:+.1f} s.e.)'
        assert line.split('|')[8].strip() == want, line
    return gains, closed


def test_one_e2e_per_work_dir_and_its_commands_end_with_it(tmp_path):
    """kill -9 of e2e.py: its commands get SIGTERM (they save and exit) instead of running on as orphans, and until
    they have ended a second e2e.py in the same work_dir is refused (it raced them over the same files)."""
    work = tmp_path / 'e2e'
    net = '--n_layer=1 --n_embd=32 --n_head=2 --cond_dim=16 --batch_size=8 --global_batch_size=8 --max_iters=100000'
    cmd = [sys.executable, 'e2e.py', f'--corpus={write_corpus(tmp_path)}', '--seq_len=32', f'--work_dir={work}',
           f'--teacher_args={net}', f'--judge_args={net}']
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        t0 = time.time()
        while not (work / 'teacher' / 'log.jsonl').exists() and time.time() - t0 < 120:  # training has started
            time.sleep(0.1)
        second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert second.returncode != 0 and 'is in use by' in second.stderr, second.stderr[-2000:]
        p.kill()  # kill -9 of e2e.py alone
        p.wait()
        lock = open(work / 'logs' / '.lock')
        t0 = time.time()
        while True:  # its commands hold the lock until they end: they must end in seconds, not after 100000 steps
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.time() - t0 < 60, 'the commands of a killed e2e.py run on'
                time.sleep(0.2)
        assert (work / 'teacher' / 'ckpt.pt').exists()  # (SIGTERM: they saved first)
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # (anything left of the group)
        except ProcessLookupError:
            pass
