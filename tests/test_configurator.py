"""configurator.configure: config files, --key=value, strict keys, types."""
import os

import pytest

from configurator import configure


def defaults():
    return dict(batch_size=12, learning_rate=6e-4, out_dir='out', compile=True, init_from=None, betas=(0.9, 0.95))


def test_file_then_overrides(tmp_path):
    f = tmp_path / 'cfg.py'
    f.write_text('import math\nbatch_size = 4\nlearning_rate = 1e-3 * math.sqrt(4)\n_private = 1\n')
    g = defaults()
    cfg = configure(g, [str(f), '--batch_size=8', '--out_dir=runs/a=b', '--init_from=resume', '--compile=False'])
    assert g['batch_size'] == 8 and g['learning_rate'] == pytest.approx(2e-3)
    assert g['out_dir'] == 'runs/a=b'        # values may contain '='
    assert g['init_from'] == 'resume'        # a None default can be set
    assert g['compile'] is False and cfg == {k: g[k] for k in defaults()}


def test_settings_are_the_config_blocks_lower_case_names():
    """UPPER_CASE module values (tables, constants, imported or not) and _private ones are not settings, and each
    script's settings are exactly its config block: a table defined after it needs no underscore alias."""
    import distill
    import diffusion
    g = dict(defaults(), TABLE={'a': 1}, EPS=1e-5, _private=2)
    assert configure(g, []) == defaults()
    with pytest.raises(ValueError, match="unknown config key 'TABLE'"):
        configure(g, ['--TABLE={}'])
    assert 'noise_schedule' in distill._DEFAULTS and 'NOISE_SCHEDULES' in vars(distill)
    assert not {'NOISE_SCHEDULES', 'SAMPLE_EPS', 'DIVERGENCES', 'OBJECTIVES', 'KEPT'} & set(distill._DEFAULTS)
    assert diffusion.NOISE_SCHEDULES is distill.NOISE_SCHEDULES


def test_int_for_float_strings_stay_strings_and_bare_flag():
    g = defaults()
    configure(g, ['--learning_rate=1', '--out_dir=123', '--compile', '--betas=(0.9, 0.99)'])
    assert g['learning_rate'] == 1.0 and isinstance(g['learning_rate'], float)
    assert g['out_dir'] == '123' and g['compile'] is True and g['betas'] == (0.9, 0.99)


def test_unknown_key_lists_close_matches(tmp_path):
    with pytest.raises(ValueError, match="did you mean batch_size"):
        configure(defaults(), ['--batchsize=3'])
    f = tmp_path / 'cfg.py'
    f.write_text('learning_rat = 1.0\n')
    with pytest.raises(ValueError, match=r"cfg.py: unknown config key 'learning_rat'; did you mean learning_rate"):
        configure(defaults(), [str(f)])


@pytest.mark.parametrize('arg', ['--batch_size=1.5', '--compile=1', '--batch_size=abc', '--learning_rate=True'])
def test_wrong_types_are_errors(arg):
    with pytest.raises(ValueError, match='expects'):
        configure(defaults(), [arg])


def test_missing_file_and_missing_value():
    with pytest.raises(FileNotFoundError, match='nope.py'):
        configure(defaults(), ['nope.py'])
    with pytest.raises(ValueError, match='expected --batch_size=value'):
        configure(defaults(), ['--batch_size'])


def test_every_config_file_is_valid_for_distill():
    """Each config/*.py (some exec a base recipe) sets only keys distill.py knows, with the right types."""
    import glob
    import distill
    for path in sorted(glob.glob('config/*.py')):
        if path.split('/')[-1].startswith('e2e_'):
            continue  # configurations of e2e.py: the next test
        g = dict(distill._DEFAULTS)
        cfg = configure(g, [path])
        assert cfg['objective'] in ('sdtt', 'mdlm', 'ar'), path
        if path.endswith(('mse_small.py', 'tvd_small.py')):
            assert cfg['divergence'] in path and cfg['global_batch_size'] == 128
        if path.endswith('ar.py') or path.endswith('ar_small.py'):
            assert cfg['objective'] == 'ar' and cfg['n_layer'] > 1
        name = path.split('/')[-1][:-3]
        assert cfg['out_dir'] == f'out/{name}', path  # a variant never writes into its base recipe's out_dir


def test_e2e_config_files_are_valid():
    """config/e2e_*.py set only keys e2e.py knows, and the distill.py arguments they carry are valid distill keys."""
    import glob
    import shlex
    import distill
    src = open('e2e.py').read()
    for path in sorted(glob.glob('config/e2e_*.py')):
        g = {}
        exec(src[:src.index('config = configure(globals())')], g)  # e2e.py's defaults, without running it
        cfg = configure(g, [path])
        for stage, base in (('teacher', g['teacher_config']), ('judge', g['judge_config']), ('sdtt', g['sdtt_config'])):
            configure(dict(distill._DEFAULTS), [base, *shlex.split(cfg[f'{stage}_args'])])


def test_help_prints_the_docstring_and_the_settings(capsys):
    g = defaults()
    with pytest.raises(SystemExit) as e:
        configure(g, ['--batch_size=3', '--help'])
    out = capsys.readouterr().out
    assert e.value.code == 0 and 'settings (--key=value):' in out
    assert '--batch_size=3' in out and "--out_dir='out'" in out  # the values so far, overrides included


def test_help_shows_each_setting_with_its_comment():
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, 'sample.py', '--help'], capture_output=True, text=True, timeout=60, cwd=root)
    assert r.returncode == 0
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith('  --sampler='))
    assert "'analytic'" in line and 'ancestral_fp32' in line  # the comment, continued over two source lines
    r = subprocess.run([sys.executable, 'bench.py', '--help'], capture_output=True, text=True, timeout=60, cwd=root)
    assert '--seq_len=1024' in r.stdout and '--SIZES' not in r.stdout  # an imported table is no setting


def test_check_sizes_names_a_value_that_is_no_number():
    from configurator import check_sizes
    with pytest.raises(ValueError, match=r"impossible sizes: num_steps='abc' \(must be >= 1\), n=0 \(must be >= 1\)"):
        check_sizes(dict(num_steps='abc', n=0, k=3), num_steps=1, n=1, k=1)  # (was a TypeError from >=)
