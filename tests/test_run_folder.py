"""A run folder never lies: refusals write nothing, one training per folder, a data fingerprint, atomic files, and an
exact resume after being killed at random moments. Tiny config, 40 synthetic clips."""
import errno, json, os, pickle, random, shutil, signal, subprocess, sys, time

import numpy as np
import pandas as pd
import pytest
import torch

from thne_nb.data import ThneError, make_default, write_mmsa
from thne_nb.train import RunFolder, _atomic_save, load_for_config, read_run, train
from conftest import thne


def one_line_error(result, *fragments):
    status, _, err = result
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith('thne: error: '), (status, err)
    for fragment in fragments: assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def train_args(data, out, *extra):
    return ['train', '--config', 'tiny', '--data', data, '--seeds', '1111', '--device', 'cpu', '--quiet', '--out', out, *extra]


def snapshot(folder):
    "Every file under `folder` (but the lock) with its bytes."
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file() and p.name != '.lock'}


@pytest.fixture(scope='module')
def reference(small_data, tmp_path_factory):
    "An uninterrupted 2-epoch run."
    out = tmp_path_factory.mktemp('runs') / 'reference'
    status, _, err = thne(*train_args(small_data, out, '--epochs', '2'))
    assert status == 0, err
    return out


@pytest.fixture
def run_copy(reference, tmp_path):
    copy = tmp_path / 'run'
    shutil.copytree(reference, copy)
    return copy


def test_refused_resumes_write_nothing(run_copy, small_data, tmp_path):
    before = snapshot(run_copy)
    one_line_error(thne(*train_args(small_data, run_copy, '--epochs', '2', '--set', 'alpha=0.05')), 'config.json', 'alpha')
    assert snapshot(run_copy) == before
    # re-running a finished 2-epoch run with --epochs 1 would leave config.json saying 1 over 2-epoch results
    one_line_error(thne(*train_args(small_data, run_copy, '--epochs', '1')), 'last.pt', 'already trained 2 epochs')
    assert snapshot(run_copy) == before
    # the data file rewritten in place: same path and config, other content
    cfg, _ = read_run(run_copy)
    other = tmp_path / 'other.pkl'
    write_mmsa(make_default(n_clips=40, seed=1), other)
    with pytest.raises(Exception) as info: train(cfg, run_copy, dataset=load_for_config(cfg, other), progress=False)
    assert 'trained on other data' in str(info.value) and '\n' not in str(info.value)
    assert snapshot(run_copy) == before
    # the same command again is accepted and changes no result
    assert thne(*train_args(small_data, run_copy, '--epochs', '2'))[0] == 0
    assert json.loads((run_copy / 'metrics.json').read_text())['seeds'] == json.loads(before['metrics.json'])['seeds']


def test_eval_checks_the_data_against_the_run(run_copy, tmp_path):
    config = json.loads((run_copy / 'config.json').read_text())
    moved = tmp_path / 'rewritten.pkl'
    write_mmsa(make_default(n_clips=40, seed=2), moved)
    config['data'] = str(moved)
    (run_copy / 'config.json').write_text(json.dumps(config))
    one_line_error(thne('eval', run_copy, '--device', 'cpu'), 'changed since', '--data')
    other_dims = tmp_path / 'mosei_like.pkl'
    write_mmsa(make_default(n_clips=40, seed=0, vision_dim=35, audio_dim=74), other_dims)
    one_line_error(thne('eval', run_copy, '--data', other_dims, '--device', 'cpu'), 'the model expects feature sizes 20/5',
                   'the data has 35/74')


def test_malicious_or_foreign_checkpoints_are_one_line(run_copy, small_data, tmp_path):
    marker = tmp_path / 'payload_ran'

    class Payload:
        def __reduce__(self): return (os.system, (f'touch {marker}',))
    torch.save({'head.weight': Payload()}, run_copy / 'seed_1111' / 'best.pt')
    line = one_line_error(thne('eval', run_copy, '--data', small_data, '--device', 'cpu'), 'best.pt', 'refused to load')
    assert 'weights_only=False' not in line and not marker.exists()
    torch.save({'model': Payload()}, run_copy / 'seed_1111' / 'last.pt')
    one_line_error(thne(*train_args(small_data, run_copy, '--epochs', '2')), 'last.pt', 'refused to load')
    assert not marker.exists()
    (run_copy / 'seed_1111' / 'last.pt').write_bytes(b'')
    one_line_error(thne(*train_args(small_data, run_copy, '--epochs', '2')), 'last.pt', 'empty file')


def test_everyday_mistakes(small_data, tmp_path, monkeypatch):
    one_line_error(thne(*train_args(small_data, small_data)), 'is a file')
    one_line_error(thne(*train_args(small_data, small_data / 'run')), 'is a file')
    one_line_error(thne(*train_args(small_data, tmp_path / 'r', '--set', 'patience=0')), 'patience=0', 'at least 1')
    one_line_error(thne(*train_args(small_data, tmp_path / 'r', '--set', 'lr_main=inf')), 'finite')
    one_line_error(thne(*train_args(small_data, tmp_path / 'r', '--set', 'max_text_len=4096')), '512 positions')
    one_line_error(thne('grid', '--max-points', '0', '--runs', tmp_path / 'g'), '--max-points 0')
    one_line_error(thne('grid', '--max-points', '-1', '--runs', tmp_path / 'g'), '--max-points -1')
    one_line_error(thne('data', 'synth', tmp_path), 'is a directory')
    one_line_error(thne('data', 'synth', small_data / 'x.pkl'), 'is a file')
    one_line_error(thne('data', 'synth', tmp_path / 'x.pkl', '--seed', '-3'), '--seed -3')
    one_line_error(thne('data', 'bench', '--clips', '5'), '--clips 5')
    with monkeypatch.context() as offline:  # no hub: the quick offline check, not a minute of retries
        offline.setenv('HF_HUB_OFFLINE', '1')
        started = time.time()
        one_line_error(thne('data', 'inspect', small_data, '--tokenizer', 'no-such-owner/no-such-model'), 'hub is unreachable')
        assert time.time() - started < 20
    assert not (tmp_path / 'r').exists() and not (tmp_path / 'g').exists()
    # one MISA split file: fine to inspect, but training needs all three splits
    records = [((np.arange(2), np.ones((2, 4)), np.ones((2, 3)), ['a', 'b']), [[0.5]], f'v[{i}]') for i in range(3)]
    (tmp_path / 'test.pkl').write_bytes(pickle.dumps(records))
    assert thne('data', 'inspect', tmp_path / 'test.pkl')[0] == 0
    one_line_error(thne(*train_args(tmp_path / 'test.pkl', tmp_path / 'r')), 'holds no train, valid split')
    # a full disk: one line naming the file, and no truncated file left under the real name
    def disk_full(*_, **__): raise OSError(errno.ENOSPC, 'No space left on device')
    with monkeypatch.context() as patched:
        patched.setattr('thne_nb.data.pickle.dump', disk_full)
        one_line_error(thne('data', 'synth', tmp_path / 'full.pkl', '--clips', '20'), 'full.pkl', 'No space left')
        patched.setattr('thne_nb.train.torch.save', lambda *_: (_ for _ in ()).throw(RuntimeError('file write failed')))
        with pytest.raises(ThneError, match='last.pt: cannot write .* previous version is kept'):
            _atomic_save({}, tmp_path / 'last.pt')
    assert not list(tmp_path.glob('full.pkl*')) and not (tmp_path / 'last.pt').exists()
    # Ctrl-C and a closed pipe end without a traceback
    def interrupted(*_, **__): raise KeyboardInterrupt
    monkeypatch.setattr('thne_nb.train.train', interrupted)
    status, _, err = thne(*train_args(small_data, tmp_path / 'r'))
    assert status == 130 and err.strip() == 'thne: interrupted; resume with the same command'
    def closed_pipe(*_, **__): raise BrokenPipeError
    monkeypatch.setattr('thne_nb.data._cli_inspect', closed_pipe)
    assert thne('data', 'inspect', small_data)[0::2] == (141, '')


# ---------------------------------------------------------------- other processes
def start_training(data, out, epochs):
    return subprocess.Popen([sys.executable, '-c', 'from thne_nb.cli import main; main()',
                             *map(str, train_args(data, out, '--epochs', str(epochs)))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish_training(data, out, epochs):
    "Train (or resume) to the end in a process of its own; fails the test unless it exits 0."
    process = start_training(data, out, epochs)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err


@pytest.fixture(scope='module')
def process_reference(small_data, tmp_path_factory):
    """An uninterrupted 2-epoch run in a fresh process, like the runs compared with it: nothing that earlier tests
    changed in this test session's torch state can enter the comparison."""
    out = tmp_path_factory.mktemp('runs') / 'process_reference'
    finish_training(small_data, out, 2)
    return out


def wait_for_lock(out, process, timeout=180):
    "Block until `process` holds the run folder's lock (its pid is in RUN/.lock)."
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        try:
            if (out / '.lock').read_text().strip() == str(process.pid): return True
        except FileNotFoundError: pass
        time.sleep(0.05)
    return False


def assert_no_half_written_file(out):
    "Every file a reader would open is complete; left-over *.tmp files are never read and go at the next lock."
    for path in out.rglob('*'):
        if not path.is_file() or path.name == '.lock' or path.suffix == '.tmp': continue
        if path.suffix == '.json': assert isinstance(json.loads(path.read_text()), dict), path
        elif path.suffix == '.pt': torch.load(path, weights_only=True)
        elif path.suffix == '.csv': assert len(pd.read_csv(path)) > 0, path
    if (out / 'metrics.json').exists():
        assert json.loads((out / 'config.json').read_text())['epochs'] == 2


def assert_same_results(run, reference):
    for name in ('seeds', 'valid'):
        assert json.loads((run / 'metrics.json').read_text())[name] == json.loads((reference / 'metrics.json').read_text())[name]
    pd.testing.assert_frame_equal(pd.read_csv(run / 'history.csv'), pd.read_csv(reference / 'history.csv'))


def test_killed_at_random_moments_then_resumed_is_exact(small_data, process_reference, tmp_path):
    out, moments, ended = tmp_path / 'killed', random.Random(15).sample([i / 4 for i in range(0, 24)], 3), []
    for moment, how in zip(moments, (signal.SIGKILL, signal.SIGINT, signal.SIGKILL)):
        process = start_training(small_data, out, 2)
        if wait_for_lock(out, process):
            time.sleep(moment)
            process.send_signal(how)
        _, err = process.communicate(timeout=300)
        if how == signal.SIGINT and process.returncode == 130:
            assert err.strip().splitlines()[-1] == 'thne: interrupted; resume with the same command' and 'Traceback' not in err
        assert process.returncode in (0, -signal.SIGKILL, 130), err
        ended.append(process.returncode)
        assert_no_half_written_file(out)
    assert any(code != 0 for code in ended), f'no interruption landed before the end of training: {ended}'
    finish_training(small_data, out, 2)
    assert not list(out.rglob('*.tmp'))
    assert_same_results(out, process_reference)


def test_a_second_training_on_the_same_folder_refuses(small_data, process_reference, tmp_path):
    out = tmp_path / 'shared'
    first = start_training(small_data, out, 2)
    assert wait_for_lock(out, first), first.communicate()[1]
    one_line_error(thne(*train_args(small_data, out, '--epochs', '2')), 'another training', f'process {first.pid}')
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert_same_results(out, process_reference)
    # once the first has finished (or died), the lock is free again
    with RunFolder(out).locked(): pass
