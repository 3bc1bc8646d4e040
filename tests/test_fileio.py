"""fileio.py: the run lock, writes that fail (a full disk) or are killed, the JSON-lines reader."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest

import fileio

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
