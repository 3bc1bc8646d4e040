"""nanoGPT-style settings: a script's settings are the lower-case globals of its config block (UPPER_CASE: constants).
`config = configure(globals())` applies config files (Python, executed) and --key=value (a Python literal or a bare
string) in order. Unlike nanoGPT: an unknown key (with its close matches) or a wrong type is an error, None defaults
can be set, an int passes for a float, and --help prints the script's docstring and settings."""
import ast
import contextlib
import difflib
import pathlib
import re
import sys

_TYPES = (int, float, bool, str, type(None), list, tuple, dict)


def config_keys(g):
    """The settings among a script's globals: lower-case names of plain values (UPPER_CASE names are constants)."""
    return [k for k, v in g.items() if not k.startswith('_') and not k.isupper() and isinstance(v, _TYPES)]


def _check(key, value, defaults, source):
    """value for setting key if its type fits the default's; an unknown key's error names its close matches."""
    if key not in defaults:
        close = ', '.join(difflib.get_close_matches(key, defaults, n=3, cutoff=0.6))
        raise ValueError(f'{source}: unknown config key {key!r}' + (f'; did you mean {close}?' if close else ''))
    default = defaults[key]
    if default is None or value is None:
        return value
    if isinstance(default, bool) == isinstance(value, bool):  # (a bool is an int: only a bool replaces a bool)
        if isinstance(default, float) and isinstance(value, int):
            return float(value)
        if isinstance(value, type(default)) or isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
            return value
    raise ValueError(f'{source}: {key} expects {type(default).__name__} (default {default!r}), got {value!r}')


def check_choice(key, value, allowed):
    """A setting (or argument) that must be one of a few values; compared with its type (True == 1, 7.0 == 7)."""
    if type(value) is not type(allowed[0]) or value not in allowed:
        raise ValueError(f'{key} must be one of {list(allowed)}, got {value!r}')


def check_sizes(config, **lowest):
    """One error naming every setting below its lowest sensible value (sizes, counts, intervals)."""
    bad = [f'{k}={config[k]!r} (must be >= {v})' for k, v in lowest.items()  # (a None default takes any type)
           if not (isinstance(config[k], (int, float)) and config[k] >= v)]
    if bad:
        raise ValueError(f'impossible sizes: {", ".join(bad)}')


def _print_help(g, keys):
    """--help: the script's docstring, then every setting with its value and the comment beside (and below) it."""
    main = sys.modules['__main__']
    notes, last = {}, []
    path = pathlib.Path(getattr(main, '__file__', ''))  # ('': an interactive session)
    for line in path.read_text().splitlines() if path.is_file() else []:
        if m := re.match(r'([A-Za-z]\w*(?:\s*,\s*[A-Za-z]\w*)*)\s*=[^=#][^#]*(?:#\s?(.*))?$', line):
            last = [k.strip() for k in m.group(1).split(',')]
            for k in last:
                notes.setdefault(k, (m.group(2) or '').strip())
        elif last and re.match(r'\s+#', line):  # a comment continued on the next lines
            for k in last:
                notes[k] = (notes[k] + ' ' + line.strip()[1:].strip()).strip()
        else:
            last = []
    print((main.__doc__ or '').strip() + '\n\nsettings (--key=value):')
    for k in keys:
        print(f'  --{k}={g[k]!r}' + (f'  # {notes[k]}' if notes.get(k) else ''))
    sys.exit(0)


def _read_config_file(arg):
    """The settings a config file sets: its top-level names but imports, functions and private names."""
    try:
        code = pathlib.Path(arg).read_text()
    except OSError as e:
        raise FileNotFoundError(f'config file {arg!r} could not be read ({e.strerror})') from e
    print(f'Overriding config with {arg}')
    ns = {}
    try:
        exec(compile(code, arg, 'exec'), ns)
    except FileNotFoundError as e:  # a config that includes another (exec(open('config/...'))) elsewhere
        what = f'{e.strerror}: {e.filename!r}' if e.filename else str(e)
        raise FileNotFoundError(f'config file {arg!r}: {what} (paths in config files are relative to the '
                                'working directory: run from the repo root)') from e
    return {k: v for k, v in ns.items() if not k.startswith('_') and isinstance(v, _TYPES)}


def configure(g, argv=None):
    defaults = {k: g[k] for k in config_keys(g)}
    for arg in sys.argv[1:] if argv is None else argv:
        if arg in ('-h', '--help'):
            _print_help(g, defaults)
        if not arg.startswith('--'):  # a config file
            g.update({k: _check(k, v, defaults, arg) for k, v in _read_config_file(arg).items()})
            continue
        key, sep, val = arg[2:].partition('=')
        if key in defaults and not sep and not isinstance(defaults[key], bool):
            raise ValueError(f'{arg}: expected --{key}=value')
        value = val if sep else 'True'  # a bare --flag switches a boolean on
        if not isinstance(defaults.get(key), str):  # strings are taken as written: --out_dir=123 is the string '123'
            with contextlib.suppress(SyntaxError, ValueError):  # (else a bare string)
                value = ast.literal_eval(value)
        g[key] = _check(key, value, defaults, arg)
        print(f'Overriding: {key} = {g[key]!r}')
    return {k: g[k] for k in defaults}
