"""
SDTT end to end at small scale, with nothing but this repo's scripts: does it work?

    python e2e.py                                   # CPU, byte tokenizer: 24 min on 2 idle cores
    python e2e.py --replicas=3                      # 3 independent replicas (seeds seed, seed+1, ...) and their spread
    python e2e.py --corpus=openwebtext --tokenizer=gpt2 --seq_len=1024 --device=cuda ...   # bigger, on a GPU

Stages (each one is a plain command of the other scripts, printed and logged to work_dir/logs/):
 1. prepare_data.py: the corpus -> work_dir/data (train.bin, val.bin, meta.json)
 2. distill.py teacher_config: a tiny MDLM teacher              -> work_dir/teacher   (2 and 3 run side by side)
 3. distill.py judge_config: a tiny AR model, the gen-PPL judge -> work_dir/judge
 4. distill.py sdtt_config: SDTT rounds (kld) from the teacher  -> work_dir/sdtt/round_{r}_steps_{n}
 5. sample.py: the teacher at every 2^k steps up to 2N, each student at 2^k <= its own step count
 6. evaluate.py: gen-PPL + entropy of every sample file with the judge, val NELBO perplexity of every model, the plots
 7. work_dir/results.md: the tables (also printed)
A stage that finished leaves work_dir/logs/<stage>.done and is skipped when the command is run again (with other
settings it is an error: use another work_dir); a training stage that was interrupted continues from its ckpt.pt
(distill.py --init_from=resume). One e2e.py at a time per work_dir; its commands end with it (Linux).
With replicas=R > 1, replica k runs all of this in work_dir/replica_k with every seed set to seed + k (teacher, judge,
SDTT, sampling), and work_dir/results.md and replicas.png report what holds across them: per round, the mean gain
over the teacher at the same steps with its standard error across replicas, the share of the gap closed, and each
replica's paired margin.
"""
import ctypes
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import torch

from configurator import configure
from evaluate import closer, read_records
from fileio import RunLocked, run_lock
from model import write_atomic
from prepare_data import open_split

corpus = 'corpus'                 # prepare_data.py --source: the embedded English corpus (corpus/SOURCES.md), any
                                   # directory/file of .jsonl/.txt(.gz), or an HF dataset name
tokenizer = 'byte'                 # 'byte' shows the effect on CPU; 'gpt2' for the real thing
seq_len = 128
work_dir = 'out/e2e'
device = 'cpu'
teacher_config = 'config/tiny_mdlm.py'
judge_config = 'config/tiny_ar.py'
sdtt_config = 'config/tiny_kld.py'
teacher_args = ''                  # extra --key=value for the teacher run (e.g. '--max_iters=2000')
judge_args = ''
sdtt_args = ''
teacher_num_steps = 32             # N: the teacher's step count that the students learn to match (the
                                   # tiny teacher gains nothing from 32 to 64 steps: no gap for a round to close)
min_steps = 4                      # the fewest sampling steps evaluated
n_samples = 512                    # per cell; the noise margins grow as sqrt(n_samples)
sample_batch = 64
seed = 1                           # every run's seed: training (teacher, judge, SDTT) and sampling
eval_batch = 64
jobs = 2                           # independent commands run this many at a time (2 cores: 2)
val_rows = 1024                    # validation rows for the NELBO perplexity (0: all)
replicas = 1                       # independent replicas (1: everything in work_dir itself)
min_teacher_gain = 0.1             # stop before SDTT unless the teacher's val NELBO is this far (a share) below the
                                   # unigram entropy of the val tokens (0: no check)
config = configure(globals())

py = sys.executable
os.makedirs(os.path.join(work_dir, 'logs'), exist_ok=True)
# one e2e.py per work_dir: its commands inherit the lock, so it is held until the last of them has ended (after a
# kill -9 of e2e.py they get SIGTERM, save and exit; a rerun started meanwhile would race them over the same files)
try:
    _lock = run_lock(work_dir, os.path.join('logs', '.lock'))
except RunLocked as e:
    sys.exit(f'e2e.py: {e}')
timings = {}


def _end_with_parent():  # (in the child, before exec) Linux: SIGTERM when e2e.py dies, even by kill -9
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def stage(logs, name, *cmds, parallel=True):
    """Run the commands of one stage (skipped if it finished before), `jobs` at a time when they are independent,
    each logging to logs/; stop on a failure."""
    done = os.path.join(logs, name + '.done')
    argv = [cmd[1:] for cmd in cmds]  # (without the interpreter: another venv runs the same stage)
    if os.path.exists(done):
        with open(done) as f:
            before = json.load(f)
        if sorted(before.get('commands', argv)) != sorted(argv):  # its results would be reported under new settings
            new = sorted({a for c in argv for a in c} - {a for c in before['commands'] for a in c})
            sys.exit(f'e2e.py: {logs} holds a finished {name} stage run with other settings (now {" ".join(new)}): '
                     f'use another --work_dir, or delete {os.path.dirname(logs)} to start over')
        print(f'== {name}: done before, skipped')
        timings[name] = timings.get(name, 0) + before['seconds']
        return
    t0, width = time.time(), min(jobs, len(cmds)) if parallel else 1
    # tiny models run best on one thread each: two processes on two cores beat one process with two threads
    env = {**os.environ, 'OMP_NUM_THREADS': str(max(1, (os.cpu_count() or 1) // width))}
    queue, running = list(enumerate(cmds)), []
    try:
        while queue or running:  # a pool: the next command starts as soon as one ends (callers put the long first)
            while queue and len(running) < width:
                i, cmd = queue.pop(0)
                out = [a.split('=', 1)[1] for a in cmd if a.startswith('--out_dir=')]
                if cmd[1] == 'distill.py' and out and os.path.exists(os.path.join(out[-1], 'ckpt.pt')):
                    cmd = cmd + ['--init_from=resume']  # an interrupted run of this stage: continue it
                line = ' '.join(shlex.quote(c) for c in cmd)
                print(f'== {name}: {line}', flush=True)
                log = open(os.path.join(logs, f'{name}.{i}.log'), 'w')
                log.write(f'$ {line}\n')
                log.flush()
                running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                 pass_fds=(_lock.fileno(),), preexec_fn=_end_with_parent), log))
            for p, log in running:  # whichever ends first: a failure stops the others at once
                if p.poll() is not None:
                    if p.returncode:
                        sys.exit(f'e2e.py: stage {name} failed (exit {p.returncode}); see {log.name}. Run the same '
                                 'command again to continue (finished stages are skipped, training resumes)')
                    log.close()
            running = [(p, log) for p, log in running if p.returncode is None]
            time.sleep(0.2)
    except BaseException:  # Ctrl-C, SIGTERM or a failed command: stop the others (training saves), then exit
        for p, _ in running:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p, _ in running:
            p.wait()
        raise
    timings[name] = timings.get(name, 0) + time.time() - t0
    write_atomic(done, lambda f: f.write(json.dumps({'seconds': time.time() - t0, 'commands': argv}).encode()))
    print(f'   {name}: {time.time() - t0:.0f} s', flush=True)


def steps_upto(n):
    return [s for s in (2 ** k for k in range(20)) if min_steps <= s <= n]


def extra(args):
    return shlex.split(args)


def replica(wd, seed):
    """The whole pipeline in work dir wd with every seed = seed; writes wd/results.md and returns the SDTT check's
    rows: one dict per round (steps n, gen-PPLs of teacher@N, teacher@n, student@n, the paired gain and margin)."""
    data, logs = os.path.join(wd, 'data'), os.path.join(wd, 'logs')
    os.makedirs(logs, exist_ok=True)
    stage(logs, 'prepare', [py, 'prepare_data.py', f'--source={corpus}', f'--tokenizer={tokenizer}',
                            f'--row_len={seq_len}', f'--out_dir={data}', '--overwrite'])
    common = [f'--data_dir={data}', f'--device={device}', f'--block_size={seq_len}', f'--seed={seed}']
    stage(logs, 'teacher+judge',
          [py, 'distill.py', teacher_config, *common, f'--out_dir={wd}/teacher', *extra(teacher_args)],
          [py, 'distill.py', judge_config, *common, f'--out_dir={wd}/judge', *extra(judge_args)])
    check_teacher(wd, data)
    stage(logs, 'sdtt', [py, 'distill.py', sdtt_config, f'--data_dir={data}', f'--device={device}', f'--seed={seed}',
                         f'--out_dir={wd}/sdtt', f'--init_from={wd}/teacher',
                         f'--teacher_num_steps={teacher_num_steps}', *extra(sdtt_args)])
    # the models: the teacher (EMA weights of its ckpt.pt) and every round's student
    models = [('teacher', 0, os.path.join(wd, 'teacher'), teacher_num_steps)]
    for d in sorted(os.listdir(os.path.join(wd, 'sdtt'))):
        if d.startswith('round_'):
            r, n = int(d.split('_')[1]), int(d.split('_')[3])
            models.append((d, r, os.path.join(wd, 'sdtt', d), n))
    models.sort(key=lambda m: m[1])
    # the teacher to 2N (is N enough?), each student up to its own steps; the longest first, so the pool ends together
    cells = sorted(((steps, path) for _, r, path, n in models for steps in steps_upto(2 * n if r == 0 else n)),
                   key=lambda cell: -cell[0])
    stage(logs, 'sample', *[[py, 'sample.py', f'--init_from={path}', f'--num_steps={steps}', f'--n_samples={n_samples}',
                             f'--batch_size={sample_batch}', f'--seq_len={seq_len}', f'--seed={seed}',
                             f'--out_dir={wd}', f'--device={device}', '--n_print=0', '--overwrite=True']
                            for steps, path in cells])
    ev = [py, 'evaluate.py', f'--out_dir={wd}', f'--device={device}', f'--batch_size={eval_batch}']
    # evaluate.py appends to one eval.jsonl: its runs go one at a time
    stage(logs, 'evaluate', [*ev, '--eval=genppl', f'--samples={wd}/samples/uncond', f'--judge={wd}/judge'],
          *[[*ev, '--eval=valppl', f'--init_from={path}', f'--data_dir={data}', f'--val_rows={val_rows}']
            for _, _, path, _ in models],
          [*ev, '--eval=', '--plot', f'--train_log={wd}/teacher,{wd}/judge,{wd}/sdtt'], parallel=False)

    # ---- tables from eval.jsonl (the last record of each point counts)
    gen, val = {}, {}
    for rec in read_records(os.path.join(wd, 'eval.jsonl')):
        model = os.path.basename(str(rec['model'])).split('@')[0]
        if rec['eval'] == 'genppl':
            gen[model, rec['num_steps']] = rec['metrics']
        elif rec['eval'] == 'valppl':
            val[model] = rec['metrics']
    names = [m[0] for m in models]
    fmt = lambda m: f"{m['gen_ppl']:.2f} ({m['entropy']:.3f})" if m else ''
    out = [f'# SDTT end to end: {tokenizer} tokens, seq {seq_len}, teacher N = {teacher_num_steps} steps, seed {seed}',
           '', f'Machine: {machine}; total {time.time() - t_start:.0f} s this run '
           f"({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}).", '',
           f'Gen-PPL under the AR judge (entropy in nats), {n_samples} samples of {seq_len} tokens each:', '',
           '| steps | ' + ' | '.join(names) + ' |', '|---' * (len(names) + 1) + '|']
    for s in sorted({s for (_, s) in gen}):
        out.append(f'| {s} | ' + ' | '.join(fmt(gen.get((m, s))) for m in names) + ' |')
    out += ['', 'Validation NELBO perplexity (EMA weights): ' +
            ', '.join(f"{m} {val[m]['val_ppl']:.3f}" for m in names if m in val), '',
            f'The SDTT check: after r rounds the student at N/2^r steps against the teacher at N = {teacher_num_steps} '
            'and at N/2^r steps (closer = smaller |log gen-PPL - log teacher@N|; margin: how much closer, in standard',
            'errors, paired by sample: every file is sampled with the same seed, so at the same step count sample i of',
            'the teacher and of the student share their random draws; under 2 it is within the sampling noise;',
            'evaluate.closer; gap closed: (teacher@steps - student@steps) / (teacher@steps - teacher@N) in gen-PPL,',
            'when that gap is beyond the noise (2 paired s.e.), "no gap" otherwise: a share of noise means nothing):',
            '',
            '| round | steps | teacher@N | teacher@steps | student@steps | student closer? | margin (s.e.) | '
            'gap closed | entropy vs teacher@N |', '|---|---|---|---|---|---|---|---|---|']
    ref, rows = gen.get(('teacher', teacher_num_steps)), []
    if not ref:
        out.append(f'(no gen-PPL of the teacher at N = {teacher_num_steps} steps in eval.jsonl: nothing to compare)')
    for name, r, _, n in models[1:]:
        t_n, s_n = gen.get(('teacher', n)), gen.get((name, n))
        if ref and t_n and s_n:
            if not all('nll_per_sample' in m for m in (ref, t_n, s_n)):
                sys.exit(f'e2e.py: the genppl records in {wd}/eval.jsonl lack nll_per_sample (an older evaluate.py): '
                         f'delete {logs}/evaluate.done and run again')
            gain, margin = closer(ref['nll_per_sample'], t_n['nll_per_sample'], s_n['nll_per_sample'])
            gap = closer(ref['nll_per_sample'], t_n['nll_per_sample'], ref['nll_per_sample'])[1]  # the teacher's own
            row = dict(round=r, steps=n, ref=ref['gen_ppl'], teacher=t_n['gen_ppl'], student=s_n['gen_ppl'], gain=gain,
                       margin=margin, gap_margin=gap, entropy=s_n['entropy'] / ref['entropy'] - 1)
            rows.append(row)
            verdict = ('yes' if gain > 0 else 'no') + (' (within noise)' if abs(margin) < 2 else '')
            out.append(f"| {r} | {n} | {fmt(ref)} | {fmt(t_n)} | {fmt(s_n)} | {verdict} | {margin:+.1f} | "
                       f"{gap_closed([row])} | {100 * row['entropy']:+.1f}% |")
    out += ['', f'Plot: {wd}/genppl.png; training curves: {wd}/{{teacher,judge,sdtt}}/train.png']
    write_atomic(os.path.join(wd, 'results.md'), lambda f: f.write(('\n'.join(out) + '\n').encode()))
    print('\n'.join(out))
    return rows


def check_teacher(wd, data):
    """Stop before SDTT if the teacher learnt little beyond token frequencies: a tiny MDLM can sit on that plateau for
    1000+ steps (seed 200 did), and its students would show nothing."""
    val = np.asarray(open_split(data, 'val')).ravel()
    p = np.bincount(val) / len(val)
    unigram = -np.sum(p[p > 0] * np.log(p[p > 0]))
    nelbo = [r['val_nelbo'] for r in read_records(os.path.join(wd, 'teacher', 'log.jsonl'), {'step': int},
                                                   keep=lambda r: 'val_nelbo' in r)]
    if min_teacher_gain and (not nelbo or nelbo[-1] > (1 - min_teacher_gain) * unigram):
        got = f'{nelbo[-1]:.3f} nats per token' if nelbo else 'not measured (no val_nelbo in its log.jsonl)'
        sys.exit(f'e2e.py: the teacher in {wd}/teacher is stuck near the unigram plateau: its validation NELBO is '
                 f"{got}, the val tokens' unigram entropy {unigram:.3f}, and it must be {100 * min_teacher_gain:.0f}% "
                 "below. Train it longer or with another seed in a new --work_dir (--teacher_args='--max_iters=1500', "
                 '--seed=...)')


def gap_closed(rows):
    """The share of the teacher's gap (teacher@steps - teacher@N, gen-PPL) that the students close, over rows of one
    round (a ratio of sums: one replica whose gap is tiny does not swamp the others); 'no gap' when a single row's
    gap is within 2 paired standard errors."""
    if len(rows) == 1 and abs(rows[0]['gap_margin']) < 2:
        return f"no gap ({rows[0]['gap_margin']:+.1f} s.e.)"
    return f"{100 * sum(x['teacher'] - x['student'] for x in rows) / sum(x['teacher'] - x['ref'] for x in rows):.0f}%"


def across_replicas(per_replica):
    """Markdown lines of what holds across replicas: per round the mean paired gain (log gen-PPL) with its standard
    error over the replicas (std / sqrt(R)), the share of the gap closed over all replicas and by each, and every
    replica's own margin."""
    R, out = len(per_replica), []
    out += [f'# SDTT end to end, {R} replicas (seeds {seed}..{seed + R - 1}): {tokenizer} tokens, seq {seq_len}, '
            f'teacher N = {teacher_num_steps} steps', '', f'Machine: {machine}; total {time.time() - t_start:.0f} s.',
            '', 'Per round: the student at N/2^r steps against the teacher at N/2^r steps, as seen from teacher@N. '
            'gain: '
            'how much closer to teacher@N in log gen-PPL (paired by sample within a replica); mean +- standard error '
            'across replicas, and that mean in those standard errors; gap closed: (teacher@steps - student@steps) / '
            '(teacher@steps - teacher@N) in gen-PPL, summed over the replicas, then by each ("no gap": its teacher\'s '
            'gap is within its noise); margins: each replica\'s gain in its own paired standard errors.',
            '', '| round | steps | replicas closer | mean gain +- s.e. | gain / s.e. | gap closed | '
            'gap closed per replica | margins per replica | entropy vs teacher@N |', '|---' * 9 + '|']
    rounds = sorted({row['round'] for rows in per_replica for row in rows})
    for r in rounds:
        rs = [row for rows in per_replica for row in rows if row['round'] == r]
        g, se = np.array([x['gain'] for x in rs]), lambda v: v.std(ddof=1) / np.sqrt(len(v))
        closed, margins = ' / '.join(gap_closed([x]) for x in rs), ' / '.join(f"{x['margin']:+.1f}" for x in rs)
        out.append(f"| {r} | {rs[0]['steps']} | {sum(g > 0)}/{len(rs)} | {g.mean():.4f} +- {se(g):.4f} | "
                   f"{g.mean() / se(g):.1f} | {gap_closed(rs)} | "
                   f"{closed} | {margins} | "
                   f"{100 * np.mean([x['entropy'] for x in rs]):+.1f}% |")
    out += ['', 'Each replica: ' + ', '.join(f'{work_dir}/replica_{k}/results.md' for k in range(R)) +
            f'; plot: {work_dir}/replicas.png']
    return out


def plot_replicas(per_replica, png):
    """Per round, each replica's teacher and student at N/2^r steps, in % of gen-PPL above its teacher@N: the gap
    (hollow) and what the student keeps of it (filled); one colour per replica."""
    from evaluate import _pyplot
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for k, rows in enumerate(per_replica):
        x = [row['round'] + 0.08 * (k - (len(per_replica) - 1) / 2) for row in rows]
        line, = ax.plot(x, [100 * (row['teacher'] / row['ref'] - 1) for row in rows], 'o--', mfc='none', alpha=0.8,
                        label=f'teacher, replica {k} (seed {seed + k})')
        ax.plot(x, [100 * (row['student'] / row['ref'] - 1) for row in rows], 'o-', color=line.get_color(),
                label=f'student, replica {k}')
    ax.axhline(0, color='grey', lw=0.5)
    ax.set(xlabel='round r: N/2^r sampling steps', ylabel='gen-PPL above teacher@N (%)',
           xticks=sorted({row['round'] for rows in per_replica for row in rows}),
           title=f'SDTT, {len(per_replica)} replicas (N = {teacher_num_steps})')
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(f'e2e.py: stopped by signal {signum}'))
t_start = time.time()
cpu = [line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo') if line.startswith('model name')][:1] \
    if os.path.exists('/proc/cpuinfo') else []
machine = (f'{platform.machine()} ({cpu[0] if cpu else platform.processor() or "?"}), {os.cpu_count()} CPUs, device '
           f'{device}, torch {torch.__version__}')
if replicas < 1:
    sys.exit(f'e2e.py: replicas must be >= 1, got {replicas}')
if replicas == 1:
    replica(work_dir, seed)
else:
    per_replica = [replica(os.path.join(work_dir, f'replica_{k}'), seed + k) for k in range(replicas)]
    out = across_replicas(per_replica)
    plot_replicas(per_replica, os.path.join(work_dir, 'replicas.png'))
    write_atomic(os.path.join(work_dir, 'results.md'), lambda f: f.write(('\n'.join(out) + '\n').encode()))
    print('\n'.join(out))
