"End-to-end tests of `thne train`, `thne eval` and `thne bench` on the tiny config and a small synthetic data set."
import json, math

import pandas as pd
import pytest
import torch

from thne_nb.cli import main
from conftest import run_cli, assert_one_line_error


def train_args(data, out, *extra):
    return ['train', '--config', 'tiny', '--data', data, '--seeds', '1111', '--device', 'cpu', '--quiet',
            '--out', out, *extra]


@pytest.fixture(scope='module')
def two_epoch_run(small_data, tmp_path_factory):
    "An uninterrupted 2-epoch run; (run directory, stdout)."
    out = tmp_path_factory.mktemp('runs') / 'full'
    with pytest.raises(SystemExit) as exit_info: main([str(a) for a in train_args(small_data, out, '--epochs', '2')])
    assert exit_info.value.code == 0
    return out


def test_train_writes_the_run_directory(two_epoch_run):
    run = two_epoch_run
    for name in ('config.json', 'metrics.json', 'history.csv', 'seed_1111/best.pt', 'seed_1111/last.pt',
                 'seed_1111/metrics.json', 'seed_1111/test_predictions.csv'):
        assert (run / name).is_file(), name
    config = json.loads((run / 'config.json').read_text())
    assert config['epochs'] == 2 and config['seeds'] == [1111] and config['model'] == 'thne'
    summary = json.loads((run / 'metrics.json').read_text())
    for key in ('model', 'dataset', 'seeds', 'mean', 'std', 'valid', 'params', 'seconds_per_epoch', 'baseline_constant'):
        assert key in summary, key
    metrics = summary['seeds']['1111']
    assert {'Has0_acc_2', 'Has0_F1_score', 'Non0_acc_2', 'Non0_F1_score', 'Mult_acc_5', 'Mult_acc_7', 'MAE', 'Corr'} <= set(metrics)
    assert summary['mean']['MAE'] == metrics['MAE'] and summary['params']['total'] > 0
    seed_metrics = json.loads((run / 'seed_1111' / 'metrics.json').read_text())
    assert seed_metrics['test'] == metrics and seed_metrics['epochs_run'] == 2 and seed_metrics['best_epoch'] in (1, 2)
    history = pd.read_csv(run / 'history.csv')
    assert list(history.columns[:4]) == ['seed', 'epoch', 'step', 'phase']
    assert {'task', 'ta', 'tv', 'fa', 'fv', 'total'} <= set(history.columns)
    assert set(history.phase) == {'train_step', 'train_epoch', 'valid_epoch'}
    assert history[['task', 'total']].notna().all().all()
    predictions = pd.read_csv(run / 'seed_1111' / 'test_predictions.csv')
    assert len(predictions) == 12
    assert list(predictions.columns) == ['index', 'id', 'text', 'label', 'prediction', 's_ft', 's_fv', 's_fa']
    state = torch.load(run / 'seed_1111' / 'last.pt', weights_only=True)
    assert state['epoch'] == 2
    weights = torch.load(run / 'seed_1111' / 'best.pt', weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in weights.values())


def test_train_prints_metrics_beside_the_constant_baseline(small_data, tmp_path, capsys):
    status, out, _ = run_cli(train_args(small_data, tmp_path / 'run', '--epochs', '1'), capsys)
    assert status == 0
    table_header = next(line for line in out.splitlines() if 'constant' in line)
    assert 'seed 1111' in table_header and 'mean' in table_header
    assert any(line.split()[0] == 'MAE' for line in out.splitlines() if line.strip())


def test_eval_reproduces_the_test_metrics(two_epoch_run, small_data, capsys):
    status, out, _ = run_cli(['eval', two_epoch_run, '--data', small_data, '--device', 'cpu'], capsys)
    assert status == 0
    saved = json.loads((two_epoch_run / 'metrics.json').read_text())['seeds']['1111']
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:] if line.strip()}
    for name in ('MAE', 'Has0_acc_2', 'Non0_F1_score', 'Mult_acc_7'):
        assert float(rows[name][0]) == pytest.approx(saved[name], abs=6e-5), name


def test_resume_after_interruption_gives_identical_results(two_epoch_run, small_data, tmp_path, capsys):
    # interrupted after epoch 1 (the --epochs 1 run stops there), then resumed to 2 epochs in the same folder
    out = tmp_path / 'resumed'
    assert run_cli(train_args(small_data, out, '--epochs', '1'), capsys)[0] == 0
    assert torch.load(out / 'seed_1111' / 'last.pt', weights_only=True)['epoch'] == 1
    assert run_cli(train_args(small_data, out, '--epochs', '2'), capsys)[0] == 0
    full = json.loads((two_epoch_run / 'metrics.json').read_text())
    resumed = json.loads((out / 'metrics.json').read_text())
    assert resumed['seeds'] == full['seeds'] and resumed['valid'] == full['valid']
    pd.testing.assert_frame_equal(pd.read_csv(out / 'history.csv'), pd.read_csv(two_epoch_run / 'history.csv'))


def test_resume_with_a_changed_config_is_refused(two_epoch_run, small_data, capsys):
    status, _, err = run_cli(train_args(small_data, two_epoch_run, '--set', 'alpha=0.05'), capsys)
    assert_one_line_error(status, err, 'different config', 'alpha')


def test_unknown_config_key_is_a_one_line_error(small_data, tmp_path, capsys):
    status, _, err = run_cli(train_args(small_data, tmp_path / 'run', '--set', 'no_such_key=3'), capsys)
    assert_one_line_error(status, err, 'no_such_key')


def test_missing_data_file_is_a_one_line_error(tmp_path, capsys):
    missing = tmp_path / 'nowhere.pkl'
    status, _, err = run_cli(train_args(missing, tmp_path / 'run'), capsys)
    assert_one_line_error(status, err, 'nowhere.pkl')


def test_bad_data_file_is_a_one_line_error(tmp_path, capsys):
    bad = tmp_path / 'bad.pkl'
    bad.write_bytes(b'this is not a pickle')
    status, _, err = run_cli(train_args(bad, tmp_path / 'run'), capsys)
    assert_one_line_error(status, err, 'bad.pkl')


def test_bad_arguments_exit_2(small_data, tmp_path, capsys):
    status, _, err = run_cli(['train', '--config', 'tiny', '--device', 'tpu'], capsys)
    assert_one_line_error(status, err, "device 'tpu'")
    status, _, err = run_cli(['train', '--config', 'no_such_config', '--out', tmp_path / 'run'], capsys)
    assert_one_line_error(status, err, 'no_such_config')
    status, _, err = run_cli(['train', '--config', 'tiny', '--epochs', '0'], capsys)
    assert status == 2 and 'at least 1' in err
    status, _, err = run_cli(['eval', tmp_path / 'not_a_run', '--data', small_data], capsys)
    assert_one_line_error(status, err, 'not_a_run')


def test_non_finite_loss_stops_with_a_one_line_error(small_data, tmp_path, capsys):
    out = tmp_path / 'diverged'
    status, _, err = run_cli(train_args(small_data, out, '--epochs', '2', '--set', 'lr_main=1e30', 'lr_text=1e30',
                                        'log_every=1'), capsys)
    assert_one_line_error(status, err, 'non-finite loss', 'seed 1111')


def test_bench_reports_both_steps_and_their_ratio(small_data, capsys):
    status, out, _ = run_cli(['bench', '--config', 'tiny', '--data', small_data, '--batch-size', '4', '--steps', '1',
                              '--warmup', '0', '--device', 'cpu', '--json'], capsys)
    assert status == 0
    result = json.loads(out.strip().splitlines()[-1])
    assert result['batch_size'] == 4 and result['overhead_ratio'] > 0
    for part in ('thne', 'text_encoder_only'):
        assert result[part]['clips_per_s'] > 0 and result[part]['step_ms'] > 0 and result[part]['peak_memory_mb'] > 0
    assert 'overhead' in out


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_cuda_training_and_bench(small_data, tmp_path, capsys):
    out = tmp_path / 'cuda'
    status, _, err = run_cli(['train', '--config', 'tiny', '--data', small_data, '--seeds', '1111', '--device', 'cuda',
                              '--quiet', '--epochs', '2', '--out', out], capsys)
    assert status == 0, err
    metrics = json.loads((out / 'metrics.json').read_text())['seeds']['1111']
    assert metrics['MAE'] is not None and math.isfinite(metrics['MAE'])
    status, out_text, _ = run_cli(['eval', out, '--data', small_data, '--device', 'cuda'], capsys)
    assert status == 0 and 'MAE' in out_text
    status, out_text, _ = run_cli(['bench', '--config', 'tiny', '--data', small_data, '--batch-size', '4',
                                   '--steps', '2', '--device', 'cuda'], capsys)
    assert status == 0 and 'overhead' in out_text
