"""fileio.py: the run lock, writes that fail (a full disk) or are killed, the JSON-lines reader."""
import errno
import json
import os
import re
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import fileio
from model import load_pretrained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hold(code, *ready):
    """A python process running code (fileio imported), once it printed 'ready'."""
    p = subprocess.Popen([sys.executable, '-c', 'import sys, time, fileio\n' + textwrap.dedent(code)], cwd=ROOT,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == 'ready'
    return p


def test_run_lock_one_holder_named_released_on_kill_9(tmp_path):
    out = str(tmp_path / 'run')
    p = hold(f"fileio.run_lock({out!r}); print('ready', flush=True); time.sleep(60)")
    try:
        with pytest.raises(fileio.RunLocked, match=rf'{out} is in use by pid {p.pid} \(-c\)'):
            fileio.run_lock(out)
    finally:
        p.kill()  # kill -9: no cleanup ran, the kernel drops the lock
        p.wait()
    assert os.path.exists(os.path.join(out, '.lock'))  # (its file stays behind: taken over, not in the way)
    f = fileio.run_lock(out)
    assert fileio.run_lock(out) is f  # the same process again (main() run twice): the same lock
    assert open(f.name).read().split()[0] == str(os.getpid())
    fileio.release_lock(out)
    assert not os.path.exists(os.path.join(out, '.lock'))  # a clean end leaves no lock file
    p = hold(f"fileio.run_lock({out!r}); print('ready', flush=True)")  # a normal exit: released and removed too
    assert p.wait() == 0 and not os.path.exists(os.path.join(out, '.lock'))


def test_a_failed_write_says_so_and_keeps_the_previous_file(tmp_path):
    path = str(tmp_path / 'ckpt.pt')
    fileio.write_atomic(path, lambda f: f.write(b'the previous checkpoint'))

    def disk_full(f):  # a full disk halfway through the write
        f.write(b'x' * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(fileio.WriteFailed, match=rf'writing {path} failed \(No space left on device; [\d,.]+ MiB free '
                                                 r'on its disk\); the previous ckpt.pt is intact'):
        fileio.write_atomic(path, disk_full)
    assert open(path, 'rb').read() == b'the previous checkpoint' and os.listdir(tmp_path) == ['ckpt.pt']
    with pytest.raises(fileio.WriteFailed, match=r'\(No space left on device; .*\); no partial file is left'):
        fileio.write_atomic(str(tmp_path / 'new.pt'), disk_full)
    assert os.listdir(tmp_path) == ['ckpt.pt']


def test_real_write_failures_of_every_writer(tmp_path):
    """A file size limit (RLIMIT_FSIZE) makes the real writes fail as a full disk does: torch.save (its own
    RuntimeError 'enforce fail at inline_container.cc'), safetensors, prepare_data's numpy tofile ('N requested and
    M written'), a log line. Each says which file and why; the previous files are intact; no temporaries are left."""
    data, corpus = tmp_path / 'data', tmp_path / 'docs.jsonl'
    corpus.write_text(''.join(json.dumps({'text': f'document {i} ' * 40}) + '\n' for i in range(300)))
    prep = [f'--source={corpus}', '--tokenizer=byte', '--row_len=64', f'--out_dir={data}', '--quiet', '--num_proc=1']
    subprocess.run([sys.executable, 'prepare_data.py', *prep, '--num_val_docs=290'], cwd=ROOT, check=True,
                   capture_output=True)
    before = {n: (data / n).read_bytes() for n in os.listdir(data)}
    code = f"""
        import resource, signal, torch, distill, model, prepare_data, evaluate
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # (a write past the limit fails with EFBIG instead)
        ckpt, rnd, log = {str(tmp_path / 'ckpt.pt')!r}, {str(tmp_path / 'round_1')!r}, {str(tmp_path / 'log.jsonl')!r}
        distill.save_checkpoint(dict(w=torch.zeros(10)), ckpt)
        net = model.DiT(model.DiTConfig(vocab_size=258, n_layer=1, n_head=2, n_embd=32, cond_dim=16, block_size=16))
        net.meta = model.default_meta(258)
        model.save_pretrained(net, rnd)
        distill.append_log(log, dict(step=1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
        for write in (lambda: distill.save_checkpoint(dict(w=torch.zeros(100000)), ckpt),
                      lambda: model.save_pretrained(net, rnd),
                      lambda: distill.append_log(log, dict(step=2, big='x' * 30000)),
                      lambda: evaluate.write_record(log, 'x', dict(big='x' * 30000), {{}}, {{}}, ''),
                      lambda: prepare_data.main({prep + ['--overwrite=True']!r})):
            try:
                write()
            except Exception as e:
                print(type(e).__name__, e, flush=True)
        """
    r = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    lines = [l for l in r.stdout.splitlines() if l.startswith('WriteFailed')]
    assert len(lines) == 5, r.stdout[-3000:] + r.stderr[-3000:]
    for line, what, kept in zip(lines, ['ckpt.pt', 'round_1', 'log.jsonl', 'log.jsonl', 'data/train.bin'],
                                ['the previous ckpt.pt is intact', 'the previous round_1 is intact',
                                 'the lines before are intact', 'the records before are intact',
                                 f'the previous dataset in {data} is intact']):
        reason = r'[^;]*(File too large|requested and \d+ written)[^;]*'  # (numpy's message has no errno)
        assert re.match(rf'WriteFailed writing {tmp_path}/{what} failed \({reason}; [\d,.]+ MiB free on its disk: '
                        rf'full\?\); {kept}\. Free some space', line), line
    assert torch.load(tmp_path / 'ckpt.pt', weights_only=True)['w'].shape == (10,)
    assert load_pretrained(str(tmp_path / 'round_1')).config.n_embd == 32
    assert [r['step'] for _, r in fileio.read_jsonl(str(tmp_path / 'log.jsonl'))] == [1]
    assert {n: (data / n).read_bytes() for n in os.listdir(data)} == before
    assert not [n for n in os.listdir(tmp_path) if n.startswith('.tmp')]


def test_the_next_writer_removes_the_temporaries_of_killed_writers(tmp_path):
    """kill -9 mid-write left full-size .tmp_* files for good (a large model's checkpoint: ~17 GB); the next write
    in that directory, or the next run taking its lock, removes those of dead writers, and only those."""
    out = str(tmp_path)
    for target in ('ckpt.pt', 'round_1'):  # write_atomic's file and save_pretrained's directory
        p = subprocess.Popen([sys.executable, '-c', textwrap.dedent(f"""
            import os, tempfile, fileio
            if {target!r} == 'round_1':
                d = tempfile.mkdtemp(dir={out!r}, prefix=fileio.temp_prefix())
                open(os.path.join(d, 'model.safetensors'), 'wb').write(b'x' * 100000)
                os.kill(os.getpid(), 9)
            def killed(f):
                f.write(b'x' * 100000)
                f.flush()
                os.kill(os.getpid(), 9)
            fileio.write_atomic(os.path.join({out!r}, {target!r}), killed)""")], cwd=ROOT)
        assert p.wait() == -9
    dead = sorted(n for n in os.listdir(out) if n.startswith('.tmp_'))
    assert len(dead) == 2
    live = fileio.temp_prefix() + 'abc'  # this process's: it may still be writing
    other_host = f'.tmp_{p.pid}@another-host_abc'  # a shared disk: its pid means nothing here
    kept_old = f'.tmp_{p.pid}@{fileio._HOST}_abc_old'  # the only copy of a replaced round directory after a crash
    for n in (live, other_host, kept_old, 'notes.txt'):
        open(os.path.join(out, n), 'w').close()
    fileio.write_atomic(os.path.join(out, 'log.jsonl'), lambda f: f.write(b'{}\n'))
    assert sorted(os.listdir(out)) == sorted([live, other_host, kept_old, 'notes.txt', 'log.jsonl'])
    os.remove(os.path.join(out, live))
    p = subprocess.Popen([sys.executable, '-c', 'import fileio, os, sys; fileio.write_atomic(sys.argv[1], '
                          'lambda f: os.kill(os.getpid(), 9))', os.path.join(out, 'x')], cwd=ROOT)
    assert p.wait() == -9 and len([n for n in os.listdir(out) if n.startswith('.tmp_')]) == 3
    fileio.run_lock(out)  # a run starting in out_dir: its space comes back before the first checkpoint
    fileio.release_lock(out)
    assert sorted(os.listdir(out)) == sorted([other_host, kept_old, 'notes.txt', 'log.jsonl'])


def test_a_name_that_looks_like_a_local_path_is_one(tmp_path, monkeypatch):
    """A typo'd local path (x.jsonl, nope_corpus) spent ~25 s in Hugging Face retries before failing."""
    import evaluate
    import sample
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'data').mkdir()
    for name in ('x.jsonl', 'corpus.txt', './corpus', '/nope/corpus', '~/nope_corpus', 'data/nope', 'a/b/c'):
        with pytest.raises(FileNotFoundError, match=re.escape(f"source={name!r}: no such file or directory")):
            fileio.local_or_dataset(name, 'source')
    assert fileio.local_or_dataset('data', 'source') == 'data'
    with pytest.raises(FileNotFoundError, match="cond_data='x.jsonl': no such file"):
        sample.load_prefixes('x.jsonl', sample.get_tokenizer('byte'), 1, 2, 4, 4)
    with pytest.raises(FileNotFoundError, match="lambada_path='x.jsonl': no such file"):
        evaluate.read_lambada('x.jsonl')
    # a dataset id: the hub (without network here: offline at once, the local cache only; online: a quick 404)
    t0 = time.time()
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'prepare_data.py'), '--source=nope_corpus',
                        f'--out_dir={tmp_path / "o"}'], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "could not load Hugging Face dataset 'nope_corpus'" in r.stderr, r.stderr[-2000:]
    assert time.time() - t0 < 15
