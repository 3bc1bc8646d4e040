"""Files, torch-free: run locks (flock: freed on kill -9 too), atomic writes with clear full-disk errors, removal of
dead writers' temporaries, a checked JSON-lines reader, and local path vs Hugging Face dataset id."""
import atexit
import contextlib
import errno
import fcntl
import gzip
import json
import os
import re
import shutil
import socket
import sys
import tempfile

_HOST = socket.gethostname()
_HELD = {}  # lock file path -> its open file, while this process holds it


def _holder(path):
    with contextlib.suppress(OSError), open(path) as f:
        pid, _, cmd = f.read().strip().partition(' ')
        if pid.isdigit():
            gone = '' if _alive(int(pid)) else ', which has ended: its child processes hold the lock'
            return f'pid {pid}{gone}' + (f' ({cmd})' if cmd else '')
    return 'another process'


def run_lock(out_dir, name='.lock'):
    """Take out_dir/name for this process (the one that writes: rank 0) and return its open file, or raise RunLocked
    naming the holder. Again in the same process it is the same lock; release_lock() or the process's end drops it."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.abspath(os.path.join(out_dir, name))
    if path in _HELD:
        return _HELD[path]
    while True:
        f = open(path, 'a+')
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise RunLocked(f'{out_dir} is in use by {_holder(path)}: two runs writing the same files would mix them. '
                            'Wait for it to end, or choose another directory') from None
        with contextlib.suppress(FileNotFoundError):  # (a releasing holder may have removed it: lock the new file)
            if os.fstat(f.fileno()).st_ino == os.stat(path).st_ino:
                break
        f.close()
    f.seek(0)
    f.truncate()
    f.write(f'{os.getpid()} {" ".join([os.path.basename(sys.argv[0] or "python")] + sys.argv[1:])}\n'[:4000])
    f.flush()
    _HELD[path] = f
    clean_leftovers(out_dir)
    return f


def release_lock(out_dir, name='.lock'):
    """Drop the lock of run_lock (removing its file first, so a clean end leaves none behind)."""
    f = _HELD.pop(os.path.abspath(os.path.join(out_dir, name)), None)
    if f is not None:
        with contextlib.suppress(OSError):
            os.remove(f.name)
        f.close()


class RunLocked(RuntimeError):
    pass


atexit.register(lambda: [release_lock(os.path.dirname(p), os.path.basename(p)) for p in list(_HELD)])


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def temp_prefix():
    """Name prefix of this process's temporaries: .tmp_<pid>@<host>_ (clean_leftovers tells dead writers by it)."""
    return f'.tmp_{os.getpid()}@{_HOST}_'


def clean_leftovers(directory):
    """Remove the temporaries in directory of writers on this host that are gone (killed mid-write). Those of live
    processes, of other hosts (a shared disk) and a replaced round directory kept by save_pretrained (*_old) stay."""
    for n in os.listdir(directory):
        m = re.match(rf'\.tmp_(\d+)@{re.escape(_HOST)}_', n)
        if not m or n.endswith('_old') or _alive(int(m.group(1))):
            continue
        p = os.path.join(directory, n)
        with contextlib.suppress(OSError):  # (removed by another process meanwhile)
            size = os.path.getsize(p) if os.path.isfile(p) else 0
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
            print(f'removed {p}, the leftover of a writer that was stopped (pid {m.group(1)}): {size / 2**20:,.0f} MiB')


class WriteFailed(OSError):
    pass


def write_failed(path, e, kept=None):
    """The error for a failed write of path (OSError, or torch.save's RuntimeError after a short write): what, why
    (free space on its disk), and what is left. kept: what the caller's cleanup guarantees, if not a replaced file."""
    if not isinstance(e, OSError) and isinstance(e.__context__, OSError):  # torch.save: the OSError behind its own
        e = e.__context__
    reason = e.strerror if isinstance(e, OSError) and e.strerror else (str(e).strip().splitlines() or [repr(e)])[0]
    try:
        free = f'{shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 2**20:,.1f} MiB'
    except OSError:
        free = 'unknown'
    full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
    if kept is None:
        kept = f'the previous {os.path.basename(path)} is intact' if os.path.exists(path) else 'no partial file is left'
    return WriteFailed(f'writing {path} failed ({reason}; {free} free on its disk{"" if full else ": full?"}); {kept}. '
                       'Free some space (or fix the path), then run again')


def write_atomic(path, write):
    """write(f) into a temporary file beside path, synced, then renamed over it: a crash or a failed write (a
    WriteFailed) leaves the old file as it was. The file gets the permissions open() would give it."""
    directory = os.path.dirname(path) or '.'
    clean_leftovers(directory)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=temp_prefix())
        os.chmod(tmp, 0o666 & ~_umask())  # (mkstemp: owner only)
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename, so a power cut cannot leave an empty file
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # (RuntimeError: torch.save's writer turns a failed write into one)
        if isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError, WriteFailed)):
            raise
        raise write_failed(path, e) from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def _umask():
    umask = os.umask(0)  # (read by setting it: put back at once)
    os.umask(umask)
    return umask


_FILE_EXTS = ('.jsonl', '.json', '.txt', '.csv', '.tsv', '.parquet', '.arrow', '.gz', '.zst', '.bin')


def local_or_dataset(name, what):
    """name (the text-data setting `what`) -> its local path, or None for a Hugging Face dataset id. A missing name
    that looks like a path fails now, not after 25 s of retries; without network the hub goes offline (cache only)."""
    path = os.path.expanduser(name)
    if os.path.exists(path):
        return path
    if path.startswith(('.', '/', '~')) or path.lower().endswith(_FILE_EXTS) or path.count('/') > 1 \
            or ('/' in path and os.path.isdir(path.split('/')[0])):
        raise FileNotFoundError(f'{what}={name!r}: no such file or directory (a name like this is a local path, '
                                'not a Hugging Face dataset id)')
    host = re.sub(r'^\w+://|[:/].*$', '', os.environ.get('HF_ENDPOINT', 'huggingface.co'))
    try:
        socket.getaddrinfo(host, 443)
    except OSError:  # (the variable as the libraries read it at import, and their constants if already imported)
        os.environ['HF_HUB_OFFLINE'] = '1'
        for module in ('huggingface_hub.constants', 'datasets.config'):
            if module in sys.modules and hasattr(sys.modules[module], 'HF_HUB_OFFLINE'):
                sys.modules[module].HF_HUB_OFFLINE = True
        print(f'note: {host} is unreachable: {what}={name!r} is looked up in the local Hugging Face cache only')
    return None


def check_record(rec, need, where=''):
    """None if rec is a JSON object with the fields of need, else what is wrong. need: {name: a type, a tuple of
    types (bool is not an int), or a dict: an object with those fields}."""
    if not isinstance(rec, dict):
        return f'{where or "the line"} is not a JSON object but {type(rec).__name__}'
    for k, t in need.items():
        if k not in rec:
            return f'no field {where}{k!r}'
        v = rec[k]
        if isinstance(t, dict):
            if bad := check_record(v, t, f'{where}{k}.'):
                return bad
            continue
        t = t if isinstance(t, tuple) else (t,)
        if not isinstance(v, t) or (isinstance(v, bool) and bool not in t):
            return f'field {where}{k!r} is {v!r}, not {" or ".join(x.__name__ for x in t)}'
    return None


def parse_line(line, need):
    """(record, None) for a JSON line with the fields of need (check_record), (None, what is wrong) for another."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"not JSON ({e.msg}, column {e.colno})"
    bad = check_record(rec, need)
    return (None, bad) if bad else (rec, None)


def read_jsonl(path, need=None, strict=False, keep=None, what='a record'):
    """(line number, record) for each line of path with the fields of need; blank lines and objects keep() rejects
    are skipped, another line (cut by a kill, a hand edit) is a ValueError (strict) or left out with a warning."""
    bad = []
    try:
        with (gzip.open if str(path).endswith('.gz') else open)(path, 'rt', encoding='utf-8', errors='replace') as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                rec, problem = parse_line(line, {})
                if problem is None and keep is not None and isinstance(rec, dict) and not keep(rec):
                    continue
                problem = problem or check_record(rec, need or {})
                if problem is None:
                    yield n, rec
                elif strict:
                    raise ValueError(f'{path}:{n}: {problem}: expected {what} per line')
                else:
                    bad.append((n, problem))
    finally:
        if bad:
            print(f'warning: {path}: {len(bad)} line(s) left out, not {what}: '
                  + '; '.join(f'line {n}: {p}' for n, p in bad[:5]) + (f'; ... (lines {bad[5][0]}-{bad[-1][0]})'
                                                                    if len(bad) > 5 else ''))
