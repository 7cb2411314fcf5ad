"""`thne data inspect|synth`: JSON on good input, exit status 2 and one line on bad input."""
import json, pickle, subprocess, sys

import numpy as np
import pytest

# Through the real console entry point when every command module imports; otherwise through a parser that only
# has the data commands, with the same error handling (one line, exit 2), so these tests do not wait on other chapters.
RUNNER = '''
import sys
try:
    from thne_nb.cli import main
    main(sys.argv[1:])
except ImportError:
    import argparse
    from thne_nb.data import ThneError, register_cli
    parser = argparse.ArgumentParser(prog='thne')
    register_cli(parser.add_subparsers(dest='command', required=True))
    args = parser.parse_args(sys.argv[1:])
    try: sys.exit(int(args.func(args) or 0))
    except ThneError as err:
        print(f'thne: error: {err}', file=sys.stderr); sys.exit(2)
'''


def thne(*args):
    return subprocess.run([sys.executable, '-c', RUNNER, *map(str, args)], capture_output=True, text=True, timeout=120)


def test_synth_then_inspect(tmp_path):
    out = tmp_path / 'default.pkl'
    done = thne('data', 'synth', out, '--clips', 300, '--seed', 4, '--inter-noise', 0.2)
    assert done.returncode == 0, done.stderr
    assert out.exists() and 'train 175, valid 31, test 94' in done.stdout
    done = thne('data', 'inspect', out)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (summary['format'], summary['name'], summary['dims']) == ('mmsa', 'default', {'vision': 20, 'audio': 5})
    train = summary['splits']['train']
    assert train['count'] == 175 and train['vision']['dim'] == 20 and train['audio']['dim'] == 5
    assert -3 <= train['labels']['min'] < train['labels']['mean'] < train['labels']['max'] <= 3
    assert train['audio']['nan_replaced'] == 0 and train['audio']['inf_replaced'] == 0
    assert 20 <= train['vision']['length']['min'] <= train['vision']['length']['max'] <= 150
    assert 8 < train['text_tokens']['mean'] <= train['text_tokens']['max'] <= 50


def test_inspect_reports_nonfinite(tmp_path):
    split = lambda: {'raw_text': np.array(['good', 'bad'], dtype=object), 'vision': np.ones((2, 3, 35), np.float32),
                     'audio': np.full((2, 3, 74), -np.inf, np.float32), 'regression_labels': np.array([1.0, -1.0]),
                     'vision_lengths': [3, 3], 'audio_lengths': [3, 3]}
    path = tmp_path / 'unaligned_50.pkl'
    path.write_bytes(pickle.dumps({'train': split(), 'valid': split(), 'test': split()}))
    done = thne('data', 'inspect', path)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary['name'] == 'mosei' and summary['splits']['test']['audio']['inf_replaced'] == 2 * 3 * 74


@pytest.mark.parametrize('make,fragment', [
    (lambda p: p.write_bytes(pickle.dumps({'train': {}, 'test': {}})), "missing split 'valid'"),
    (lambda p: p.write_bytes(pickle.dumps({'a': 1})[:5]), 'truncated'),
    (lambda p: p.write_text('not a pickle'), 'not a readable pickle'),
    (lambda p: None, 'no such file'),
])
def test_inspect_bad_input_exits_2_with_one_line(tmp_path, make, fragment):
    path = tmp_path / 'bad.pkl'
    make(path)
    done = thne('data', 'inspect', path)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('thne: error: ') and str(path) in lines[0] and fragment in lines[0]
    assert 'Traceback' not in done.stderr


def test_inspect_refuses_code(tmp_path):
    marker = tmp_path / 'ran'

    class Payload:
        def __reduce__(self):
            import os
            return (os.system, (f'touch {marker}',))
    path = tmp_path / 'evil.pkl'
    path.write_bytes(pickle.dumps({'train': Payload()}))
    done = thne('data', 'inspect', path)
    assert done.returncode == 2 and 'refused to unpickle' in done.stderr and not marker.exists()
