"""bench.py runs on CPU (tiny shapes, seconds) and records every quantity of issue #6 (b)/(c) with its ratios."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_cpu_records_and_ratios(tmp_path):
    out = tmp_path / 'bench.jsonl'
    r = subprocess.run([sys.executable, 'bench.py', '--device=cpu', '--cpu_n_layer=1', '--cpu_n_embd=32',
                        '--cpu_n_head=2', '--cpu_seq_len=32', '--hf_baseline=False', '--train_batch=4', f'--out_file={out}'],
                       cwd=ROOT, env={**os.environ, 'OMP_NUM_THREADS': '1'}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(line) for line in open(out)]
    kinds = {(x['bench'], x.get('objective')) for x in recs}
    assert {('forward', None), ('sample', None), ('ar_kv_cache', None), ('train', 'mdlm'), ('train', 'sdtt'),
            ('sdtt_parts', None)} <= kinds
    assert {x['steps'] for x in recs if x['bench'] == 'sample'} == {8, 16, 32}
    # a setting given on the command line stays on CPU (train_batch), the others switch to their CPU values
    assert {x['objective']: x['batch'] for x in recs if x['bench'] == 'train'} == {'mdlm': 4, 'sdtt': 8}
    assert all(x['device'] and x['date'] and 'commit' in x for x in recs)  # what BENCHMARKS.md records (commit: None
    # outside a git checkout)
    parts = next(x for x in recs if x['bench'] == 'sdtt_parts')
    assert parts['step_over_parts'] == parts['ms_step'] / parts['ms_parts'] > 0
    sdtt = next(x for x in recs if x['bench'] == 'train' and x['objective'] == 'sdtt')
    assert abs(parts['ms_step'] - sdtt['ms']) < 1e-9  # the ratio's step is the sdtt step measured in the same run
    assert 'step_over_parts' in r.stdout  # the table is printed
