"""`--backend ray`: the same run folders as the local backend, bit for bit on CPU; a stopped sweep trains only
what is missing; a failing trial is reported while the others finish. One local Ray instance for the module."""
import json, os, shutil

import pytest

os.environ.setdefault('OMP_NUM_THREADS', '1')
import matplotlib
matplotlib.use('Agg')
import torch

ray = pytest.importorskip('ray', reason='the test command installs the sweep extra (ray[tune])')

from thne_nb import reproduce, sweeps
from thne_nb.cli import main
from thne_nb.core import ThneError

GRID = ['eta=1e-3', 'batch_size=8', 'alpha=0.3', 'beta=0.1', 'hidden=8,16', 'epochs=1']
SEEDS = (1111, 1112)


@pytest.fixture(scope='module', autouse=True)
def local_ray():
    "One local Ray instance (2 CPUs, no dashboard) for every test here; Ray's local_mode is deprecated."
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def run_metrics(run_dir):
    return json.loads((run_dir / 'metrics.json').read_text())


def test_ray_grid_matches_the_local_backend_bit_for_bit(small_data, tmp_path, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # a Ray trial with one CPU trains on one thread; so does the reference here
    try:
        local, _ = reproduce.grid_search('tiny', data=small_data, seeds=SEEDS, runs_dir=tmp_path / 'local',
                                         results_dir=tmp_path / 'local-results', settings=GRID, device='cpu',
                                         progress=False, log=lambda *_: None)
    finally: torch.set_num_threads(threads)
    with pytest.raises(SystemExit) as exit_info:
        main(['grid', '--config', 'tiny', '--data', str(small_data), '--seeds', *map(str, SEEDS), '--runs', str(tmp_path / 'ray'),
              '--results', str(tmp_path / 'ray-results'), '--set', *GRID, '--device', 'cpu', '--quiet', '--backend', 'ray'])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert sum(' trained (' in line for line in out.splitlines()) == 4, out   # one line per trial
    assert 'thne grid: 2 points' in out
    for local_dir in (tmp_path / 'local').iterdir():
        ray_dir = tmp_path / 'ray' / local_dir.name
        assert run_metrics(ray_dir)['seeds'] == run_metrics(local_dir)['seeds']
        assert run_metrics(ray_dir)['valid'] == run_metrics(local_dir)['valid']
        assert (ray_dir / 'config.json').read_text() == (local_dir / 'config.json').read_text()
        assert (ray_dir / 'history.csv').read_text() == (local_dir / 'history.csv').read_text()
        for seed in SEEDS:
            name = f'seed_{seed}/test_predictions.csv'
            assert (ray_dir / name).read_text() == (local_dir / name).read_text()
    assert (tmp_path / 'ray-results' / 'grid.csv').is_file()


def test_a_stopped_reproduction_trains_only_the_rest(small_data, tmp_path):
    "Three runs finished and one seed of 'w/o DeNo1': Ray trains the 3 missing seeds and nothing else."
    plan = reproduce.plan_runs('tiny', ('thne',), data=small_data, settings=['epochs=1'])
    runs = tmp_path / 'runs'
    dirs = {label: reproduce.run_dir_for(runs, label, cfg) for label, cfg in plan.items()}
    for label in (reproduce.FULL, 'w/o DeNo2', 'w/o Re'):
        reproduce.ensure_run(plan[label], dirs[label], SEEDS, device='cpu', progress=False, log=lambda *_: None)
    reproduce.ensure_run(plan['w/o DeNo1'], dirs['w/o DeNo1'], SEEDS[:1], device='cpu', progress=False, log=lambda *_: None)
    kept = {path: path.stat().st_mtime_ns for path in runs.rglob('*.pt')}
    backend, lines = sweeps.RayBackend(cpus_per_trial=1), []
    out = reproduce.reproduce('tiny', data=small_data, seeds=SEEDS, models=('thne',), settings=['epochs=1'], device='cpu',
                              runs_dir=runs, results_dir=tmp_path / 'results', figures_dir=tmp_path / 'figures',
                              progress=False, backend=backend, log=lines.append)
    trained = set(zip(backend.summary.run, backend.summary.seed))
    assert trained == {('w/o DeNo1', 1112), (reproduce.ADJUSTED, 1111), (reproduce.ADJUSTED, 1112)}
    assert (backend.summary.status == 'trained').all()
    assert set(out.trained) == {'w/o DeNo1', reproduce.ADJUSTED}
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in kept.items())   # no finished training repeated
    assert set(run_metrics(dirs['w/o DeNo1'])['seeds']) == {'1111', '1112'}
    assert (tmp_path / 'results' / 'table4.md').is_file() and (tmp_path / 'figures' / 'fig3_loss_tracing.png').is_file()
    assert sum(line.startswith('reuse') for line in lines) == 3, lines


def test_a_failing_trial_is_reported_and_the_others_finish(small_data, tmp_path):
    cfg = reproduce.plan_runs('tiny', ('thne',), data=small_data, settings=['epochs=1'])[reproduce.FULL]
    broken = cfg.replace(data=str(tmp_path / 'missing.pkl'))
    jobs = {'good': (cfg, tmp_path / 'good'), 'broken': (broken, tmp_path / 'broken')}
    backend, lines = sweeps.RayBackend(cpus_per_trial=1), []
    with pytest.raises(ThneError, match=r'1 of 2 trials failed \(first: broken seed 1111: .*missing.pkl: no such file'):
        backend(jobs, (1111,), reproduce._DatasetCache(), device='cpu', log=lines.append)
    assert any('FAILED' in line and 'broken seed 1111' in line for line in lines), lines
    assert dict(zip(backend.summary.run, backend.summary.status)) == {'good': 'trained', 'broken': 'failed'}
    assert reproduce.is_finished(tmp_path / 'good', cfg, (1111,))
    assert not (tmp_path / 'broken' / 'metrics.json').exists()


def test_without_ray_the_command_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(__import__('sys').modules, 'ray', None)
    with pytest.raises(SystemExit) as exit_info: main(['grid', '--config', 'tiny', '--backend', 'ray', '--max-points', '1'])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "pip install -e '.[sweep]'" in err[0], err
