"End-to-end checks of the baselines (MMIM, MCEN) through `thne train` and `thne_nb.train.train`, on a small data set."
import json, math, os, subprocess, sys
from pathlib import Path

import pandas as pd
import pytest

ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'TOKENIZERS_PARALLELISM': 'false'}


def thne(*args, cwd=None):
    "Run the `thne` command in a fresh interpreter; returns the CompletedProcess."
    command = [sys.executable, '-c', 'from thne_nb.cli import main; main()', *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=cwd, timeout=300)


@pytest.fixture(scope='module')
def small_data(tmp_path_factory):
    "A 120-clip synthetic MMSA pickle written by `thne data synth`."
    path = tmp_path_factory.mktemp('data') / 'small.pkl'
    result = thne('data', 'synth', path, '--clips', 120)
    assert result.returncode == 0, result.stderr
    return path


def check_run(run_dir: Path, model: str, loss_columns: set):
    summary = json.loads((run_dir / 'metrics.json').read_text())
    assert summary['model'] == model
    assert math.isfinite(summary['mean']['MAE'])
    assert summary['params']['other'] > 0 and summary['params']['text_encoder'] > 0
    history = pd.read_csv(run_dir / 'history.csv')
    assert loss_columns <= set(history.columns)
    train_epochs = history[history.phase == 'train_epoch']
    assert train_epochs[sorted(loss_columns)].notna().all().all()
    predictions = pd.read_csv(run_dir / 'seed_1111' / 'test_predictions.csv')
    assert {'s_ft', 's_fv', 's_fa'} <= set(predictions.columns) and predictions[['s_ft', 's_fv', 's_fa']].notna().all().all()
    config = json.loads((run_dir / 'config.json').read_text())
    assert config['model'] == model
    return summary, history, config


def test_mmim_via_model_flag(small_data, tmp_path):
    "`thne train --model mmim --config tiny` resolves to the mmim-tiny preset and runs both MMIM stages."
    out = tmp_path / 'mmim'
    result = thne('train', '--model', 'mmim', '--config', 'tiny', '--data', small_data, '--seeds', 1111,
                  '--epochs', 1, '--out', out, '--quiet')
    assert result.returncode == 0, result.stderr
    summary, history, config = check_run(out, 'mmim', {'task', 'nce', 'lld', 'H', 'total'})
    assert 'stage_one' in history.columns and history.loc[history.phase == 'train_epoch', 'stage_one'].notna().all()
    assert config['lr_mi'] == 1e-3 and config['grad_clip'] == 1.0 and config['hidden_v'] == 16


def test_mcen_preset(small_data, tmp_path):
    "`thne train --config mcen-tiny` trains MCEN with its per-level CPC losses."
    out = tmp_path / 'mcen'
    result = thne('train', '--config', 'mcen-tiny', '--data', small_data, '--seeds', 1111, '--epochs', 1,
                  '--out', out, '--quiet')
    assert result.returncode == 0, result.stderr
    summary, _, config = check_run(out, 'mcen', {'task', 'cpc', 'cpc_l1', 'cpc_l2', 'cpc_l3', 'total'})
    assert config['levels'] == 3


def test_train_function_and_reload(small_data, tmp_path):
    "`thne_nb.train.train` with the mmim-tiny preset, then `load_run` rebuilds an MMIM with its MMIMConfig."
    from thne_nb.config import get_config
    from thne_nb.train import train, load_run, load_for_config
    from thne_nb.baselines.mmim import MMIM, MMIMConfig
    cfg = get_config('mmim-tiny').replace(seeds=(1111,), epochs=1)
    summary = train(cfg, tmp_path / 'run', dataset=load_for_config(cfg, small_data), progress=False)
    assert math.isfinite(summary['mean']['MAE'])
    loaded_cfg, model = load_run(tmp_path / 'run')
    assert isinstance(loaded_cfg, MMIMConfig) and isinstance(model, MMIM) and loaded_cfg == cfg


def test_presets_and_errors():
    "Every baseline preset resolves; MCEN stays under 1M parameters outside the text encoder; bad values are one-line errors."
    from thne_nb.config import get_config, available_configs
    from thne_nb.data import ThneError
    from thne_nb.baselines.mcen import DATASET_FEATURE_DIMS, count_core_parameters
    names = {'mmim-demo', 'mmim-mosi', 'mmim-mosei', 'mmim-tiny', 'mcen-demo', 'mcen-mosi', 'mcen-mosei', 'mcen-sims', 'mcen-tiny'}
    assert names <= set(available_configs())
    assert get_config('mmim-mosei').stage_one_fraction == 0.5
    sims = get_config('mcen-sims')
    assert (sims.dataset, sims.text_model) == ('sims', 'bert-base-chinese')
    for name, dims in DATASET_FEATURE_DIMS.items():
        assert count_core_parameters(get_config(f'mcen-{name}'), dims, d_text=768) < 1_000_000
    with pytest.raises(ThneError, match='heads'): get_config('mcen-tiny').set_from_strings(['heads=5'])
    with pytest.raises(ThneError, match='entropy_eps'): get_config('mmim-tiny').set_from_strings(['entropy_eps=0'])
    result = thne('train', '--config', 'mmim-tiny', '--set', 'mem_size=-1', '--epochs', 1)
    assert result.returncode == 2 and result.stderr.strip().count('\n') == 0 and 'mem_size' in result.stderr
