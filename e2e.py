"""
SDTT end to end at small scale, with nothing but this repo's scripts: does it work?

    python e2e.py                                   # CPU, byte tokenizer, ~19 minutes on 2 cores
    python e2e.py --corpus=openwebtext --tokenizer=gpt2 --seq_len=1024 --device=cuda ...   # bigger, on a GPU

Stages (each one is a plain command of the other scripts, printed and logged to work_dir/logs/):
 1. prepare_data.py: the corpus -> work_dir/data (train.bin, val.bin, meta.json)
 2. distill.py teacher_config: a tiny MDLM teacher              -> work_dir/teacher   (2 and 3 run side by side)
 3. distill.py judge_config: a tiny AR model, the gen-PPL judge -> work_dir/judge
 4. distill.py sdtt_config: SDTT rounds (kld) from the teacher  -> work_dir/sdtt/round_{r}_steps_{n}
 5. sample.py: the teacher at every 2^k steps, each student at 2^k <= its own step count
 6. evaluate.py: gen-PPL + entropy of every sample file with the judge, val NELBO perplexity of every model, the plots
 7. work_dir/results.md: the tables (also printed)
A stage that finished leaves work_dir/logs/<stage>.done and is skipped when the command is run again (with other
settings it is an error: use another work_dir); a training stage that was interrupted continues from its ckpt.pt
(distill.py --init_from=resume). One e2e.py at a time per work_dir; its commands end with it (Linux).
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

from configurator import configure
from evaluate import closer, read_records
from fileio import RunLocked, run_lock
from model import write_atomic

corpus = '../shared/data/corpus'   # prepare_data.py --source: a directory/file of .jsonl/.txt or an HF dataset name
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
teacher_num_steps = 64             # N: the teacher's step count that the students learn to match
min_steps = 4                      # the fewest sampling steps evaluated
n_samples = 512                    # per cell; the noise margins grow as sqrt(n_samples)
sample_batch = 64
seed = 1
eval_batch = 64
jobs = 2                           # independent commands run this many at a time (2 cores: 2)
val_rows = 1024                    # validation rows for the NELBO perplexity (0: all)
config = configure(globals())

py = sys.executable
data = os.path.join(work_dir, 'data')
logs = os.path.join(work_dir, 'logs')
os.makedirs(logs, exist_ok=True)
timings = {}
# one e2e.py per work_dir: its commands inherit the lock, so it is held until the last of them has ended (after a
# kill -9 of e2e.py they get SIGTERM, save and exit; a rerun started meanwhile would race them over the same files)
try:
    _lock = run_lock(work_dir, os.path.join('logs', '.lock'))
except RunLocked as e:
    sys.exit(f'e2e.py: {e}')


def _end_with_parent():  # (in the child, before exec) Linux: SIGTERM when e2e.py dies, even by kill -9
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def stage(name, *cmds, parallel=True):
    """Run the commands of one stage (skipped if it finished before), `jobs` at a time when they are independent,
    each logging to work_dir/logs/; stop on a failure."""
    done = os.path.join(logs, name + '.done')
    argv = [cmd[1:] for cmd in cmds]  # (without the interpreter: another venv runs the same stage)
    if os.path.exists(done):
        with open(done) as f:
            before = json.load(f)
        if before.get('commands', argv) != argv:  # its results would be reported under the new settings
            new = sorted({a for c in argv for a in c} - {a for c in before['commands'] for a in c})
            sys.exit(f'e2e.py: {work_dir} holds a finished {name} stage run with other settings (now {" ".join(new)}): '
                     f'use another --work_dir, or delete {work_dir} to start over')
        print(f'== {name}: done before, skipped')
        timings[name] = before['seconds']
        return
    t0, width = time.time(), min(jobs, len(cmds)) if parallel else 1
    # tiny models run best on one thread each: two processes on two cores beat one process with two threads
    env = {**os.environ, 'OMP_NUM_THREADS': str(max(1, (os.cpu_count() or 1) // width))}
    for i in range(0, len(cmds), width):
        running = []
        for j, cmd in enumerate(cmds[i:i + width]):
            out = [a.split('=', 1)[1] for a in cmd if a.startswith('--out_dir=')]
            if cmd[1] == 'distill.py' and out and os.path.exists(os.path.join(out[-1], 'ckpt.pt')):
                cmd = cmd + ['--init_from=resume']  # an interrupted run of this stage: continue it
            line = ' '.join(shlex.quote(c) for c in cmd)
            print(f'== {name}: {line}', flush=True)
            log = open(os.path.join(logs, f'{name}.{i + j}.log'), 'w')
            log.write(f'$ {line}\n')
            log.flush()
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                             pass_fds=(_lock.fileno(),), preexec_fn=_end_with_parent), log))
        try:
            waiting = list(running)
            while waiting:  # whichever ends first: a failure stops the others at once
                for p, log in waiting:
                    if p.poll() is not None:
                        if p.returncode:
                            sys.exit(f'e2e.py: stage {name} failed (exit {p.returncode}); see {log.name}. Run the same '
                                     'command again to continue (finished stages are skipped, training resumes)')
                        log.close()
                waiting = [(p, log) for p, log in waiting if p.returncode is None]
                time.sleep(0.2)
        except BaseException:  # Ctrl-C, SIGTERM or a failed command: stop the others (training saves), then exit
            for p, _ in running:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p, _ in running:
                p.wait()
            raise
    timings[name] = time.time() - t0
    write_atomic(done, lambda f: f.write(json.dumps({'seconds': timings[name], 'commands': argv}).encode()))
    print(f'   {name}: {timings[name]:.0f} s', flush=True)


def steps_upto(n):
    return [s for s in (2 ** k for k in range(20)) if min_steps <= s <= n]


def extra(args):
    return shlex.split(args)


signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(f'e2e.py: stopped by signal {signum}'))
t_start = time.time()
stage('prepare', [py, 'prepare_data.py', f'--source={corpus}', f'--tokenizer={tokenizer}', f'--row_len={seq_len}',
                  f'--out_dir={data}', '--overwrite'])
common = [f'--data_dir={data}', f'--device={device}', f'--block_size={seq_len}']
stage('teacher+judge', [py, 'distill.py', teacher_config, *common, f'--out_dir={work_dir}/teacher', *extra(teacher_args)],
      [py, 'distill.py', judge_config, *common, f'--out_dir={work_dir}/judge', *extra(judge_args)])
stage('sdtt', [py, 'distill.py', sdtt_config, f'--data_dir={data}', f'--device={device}', f'--out_dir={work_dir}/sdtt',
               f'--init_from={work_dir}/teacher', f'--teacher_num_steps={teacher_num_steps}', *extra(sdtt_args)])

# the models: the teacher (EMA weights of its ckpt.pt) and every round's student
models = [('teacher', 0, os.path.join(work_dir, 'teacher'), teacher_num_steps)]
for d in sorted(os.listdir(os.path.join(work_dir, 'sdtt'))):
    if d.startswith('round_'):
        r, n = int(d.split('_')[1]), int(d.split('_')[3])
        models.append((d, r, os.path.join(work_dir, 'sdtt', d), n))
models.sort(key=lambda m: m[1])
sample_cmds = []
for name, r, path, n in models:
    for steps in steps_upto(max(n, teacher_num_steps) if r == 0 else n):
        sample_cmds.append([py, 'sample.py', f'--init_from={path}', f'--num_steps={steps}', f'--n_samples={n_samples}',
                            f'--batch_size={sample_batch}', f'--seq_len={seq_len}', f'--seed={seed}',
                            f'--out_dir={work_dir}', f'--device={device}', '--n_print=0', '--overwrite=True'])
stage('sample', *sample_cmds)
ev = [py, 'evaluate.py', f'--out_dir={work_dir}', f'--device={device}', f'--batch_size={eval_batch}']
# evaluate.py appends to one eval.jsonl: its runs go one at a time
stage('evaluate', [*ev, '--eval=genppl', f'--samples={work_dir}/samples/uncond', f'--judge={work_dir}/judge'],
      *[[*ev, '--eval=valppl', f'--init_from={path}', f'--data_dir={data}', f'--val_rows={val_rows}']
        for _, _, path, _ in models],
      [*ev, '--eval=', '--plot', f'--train_log={work_dir}/teacher,{work_dir}/judge,{work_dir}/sdtt'], parallel=False)

# ---- tables from eval.jsonl (the last record of each point counts)
recs = read_records(os.path.join(work_dir, 'eval.jsonl'))
gen, val = {}, {}
for rec in recs:
    model = os.path.basename(str(rec['model'])).split('@')[0]
    if rec['eval'] == 'genppl':
        gen[model, rec['num_steps']] = rec['metrics']
    elif rec['eval'] == 'valppl':
        val[model] = rec['metrics']
names = [m[0] for m in models]
all_steps = sorted({s for (_, s) in gen})
fmt = lambda m: f"{m['gen_ppl']:.2f} ({m['entropy']:.3f})" if m else ''
out = [f'# SDTT end to end: {tokenizer} tokens, seq {seq_len}, teacher N = {teacher_num_steps} steps', '',
       f'Machine: {platform.machine()}, {os.cpu_count()} CPUs, device {device}; total {time.time() - t_start:.0f} s '
       f"this run ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}).", '',
       f'Gen-PPL under the AR judge (entropy in nats), {n_samples} samples of {seq_len} tokens each:', '',
       '| steps | ' + ' | '.join(names) + ' |', '|---' * (len(names) + 1) + '|']
for s in all_steps:
    out.append(f'| {s} | ' + ' | '.join(fmt(gen.get((m, s))) for m in names) + ' |')
out += ['', 'Validation NELBO perplexity (EMA weights): ' +
        ', '.join(f"{m} {val[m]['val_ppl']:.3f}" for m in names if m in val), '',
        f'The SDTT check: after r rounds the student at N/2^r steps against the teacher at N = {teacher_num_steps} and at '
        'N/2^r steps (closer = smaller |log gen-PPL - log teacher@N|; margin: how much closer, in standard errors,',
        'paired by sample: every file is sampled with the same seed, so at the same step count sample i of the teacher',
        'and of the student share their random draws; under 2 it is within the sampling noise; evaluate.closer):', '',
        '| round | steps | teacher@N | teacher@steps | student@steps | student closer? | margin (s.e.) | '
        'entropy vs teacher@N |', '|---|---|---|---|---|---|---|---|']
ref = gen.get(('teacher', teacher_num_steps))
if not ref:
    out.append(f'(no gen-PPL of the teacher at N = {teacher_num_steps} steps in eval.jsonl: nothing to compare with)')
for name, r, _, n in models[1:]:
    t_n, s_n = gen.get(('teacher', n)), gen.get((name, n))
    if ref and t_n and s_n:
        if not all('nll_per_sample' in m for m in (ref, t_n, s_n)):
            sys.exit(f'e2e.py: the genppl records in {work_dir}/eval.jsonl lack nll_per_sample (an older evaluate.py): '
                     f'delete {logs}/evaluate.done and run again')
        gain, margin = closer(ref['nll_per_sample'], t_n['nll_per_sample'], s_n['nll_per_sample'])
        verdict = ('yes' if gain > 0 else 'no') + (' (within noise)' if abs(margin) < 2 else '')
        out.append(f"| {r} | {n} | {fmt(ref)} | {fmt(t_n)} | {fmt(s_n)} | {verdict} | {margin:+.1f} | "
                   f"{100 * (s_n['entropy'] / ref['entropy'] - 1):+.1f}% |")
out += ['', f'Plot: {work_dir}/genppl.png; training curves: {work_dir}/{{teacher,judge,sdtt}}/train.png']
write_atomic(os.path.join(work_dir, 'results.md'), lambda f: f.write(('\n'.join(out) + '\n').encode()))
print('\n'.join(out))
