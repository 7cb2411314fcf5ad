"""The paper's artefacts are built from run data: tables change when a run's numbers change, reported and
measured rows stay in separate blocks, the paired test tells a shift from noise, every file is written and
non-empty, and `reproduce`/`grid` reuse finished runs instead of training again."""
import dataclasses, json, os, shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

os.environ.setdefault('OMP_NUM_THREADS', '1')
import matplotlib
matplotlib.use('Agg')

from thne_nb import results, reproduce
from thne_nb.data import ThneError

SEEDS = (1111, 1112)


def tiny_subset(dataset, n_train=32, n_eval=16):
    "The first rows of each split, so the tiny model trains in a second or two."
    def take(split, n): return results.take_rows(split, range(min(n, len(split))))
    sizes = {'train': n_train, 'valid': n_eval, 'test': n_eval}
    return dataclasses.replace(dataset, splits={k: take(v, sizes[k]) for k, v in dataset.splits.items()})


@pytest.fixture(scope='session')
def tiny_data():
    from thne_nb import train, model
    return tiny_subset(train.load_for_config(model.get_config('tiny')))


@pytest.fixture(scope='session')
def reproduced(tmp_path_factory, tiny_data):
    "One real `reproduce` on the tiny config: t-HNE, 3 ablations, the Sec. 5.2 variant, MMIM, MCEN; 2 seeds x 1 epoch."
    root = tmp_path_factory.mktemp('reproduce')
    out = reproduce.reproduce('tiny', seeds=SEEDS, models=('thne', 'mmim', 'mcen'), settings=['epochs=1'], device='cpu', progress=False,
                              dataset=tiny_data, runs_dir=root/'runs', results_dir=root/'results', figures_dir=root/'figures',
                              log=lambda *_: None)
    return root, out


def copy_run(run_dir, dest, **metrics_changes):
    "A copy of a run directory with top-level metrics.json keys replaced."
    shutil.copytree(run_dir, dest)
    metrics = json.loads((dest/'metrics.json').read_text())
    metrics.update(metrics_changes)
    (dest/'metrics.json').write_text(json.dumps(metrics))
    return dest


def test_reproduce_writes_every_artefact(reproduced):
    root, out = reproduced
    assert set(out.trained) == {reproduce.FULL, reproduce.ADJUSTED, *reproduce.ABLATIONS, 'MMIM', 'MCEN'}
    for stem in ('table3', 'table4', 'table5'):
        for suffix in ('.md', '.tex'):
            assert (root/'results'/f'{stem}{suffix}').stat().st_size > 200
    for stem in ('fig3_loss_tracing', 'attention_heatmap'):
        for suffix in ('.png', '.pdf'):
            assert (root/'figures'/f'{stem}{suffix}').stat().st_size > 5000
    table3 = pd.read_csv(root/'results'/'table3_measured.csv', index_col=0)
    assert list(table3.index) == ['t-HNE', 'MMIM', 'MCEN']
    assert 'MMIM pred' in (root/'results'/'table5.md').read_text()
    report = (root/'results'/'report.md').read_text()
    assert 'Table 4' in report and '../figures/fig3_loss_tracing.png' in report
    assert all(p.stat().st_size > 0 for p in out.files)


def test_reproduce_reuses_finished_runs(reproduced, tiny_data, monkeypatch):
    root, first = reproduced
    from thne_nb import train
    def no_training(*args, **kwargs): raise AssertionError('a finished run was trained again')
    monkeypatch.setattr(train, 'train', no_training)
    again = reproduce.reproduce('tiny', seeds=SEEDS, models=('thne', 'mmim', 'mcen'), settings=['epochs=1'], device='cpu', progress=False,
                                dataset=tiny_data, runs_dir=root/'runs', results_dir=root/'results2', figures_dir=root/'figures2',
                                log=lambda *_: None)
    assert again.trained == [] and again.run_dirs == first.run_dirs
    # a changed setting is a different run: it gets its own directory and would be trained
    plan = reproduce.plan_runs('tiny', ('thne',), settings=['epochs=2'])
    assert reproduce.run_dir_for(root/'runs', reproduce.FULL, plan[reproduce.FULL]) != first.run_dirs[reproduce.FULL]
    assert not reproduce.is_finished(first.run_dirs[reproduce.FULL], plan[reproduce.FULL], SEEDS)


def test_ablations_and_adjustment_differ_only_where_named(reproduced):
    _, out = reproduced
    configs = {label: json.loads((path/'config.json').read_text()) for label, path in out.run_dirs.items()}
    full = configs[reproduce.FULL]
    for label, change in reproduce.ABLATIONS.items():
        assert {k for k in full if configs[label][k] != full[k]} == set(change)
    adjusted = configs[reproduce.ADJUSTED]
    assert adjusted['alpha'] == pytest.approx(full['alpha']/2) and adjusted['residual'] is True


def test_table3_is_read_from_run_data(reproduced, tmp_path):
    _, out = reproduced
    run = copy_run(out.run_dirs[reproduce.FULL], tmp_path/'run')
    before = results.table3({'t-HNE': run})
    metrics = json.loads((run/'metrics.json').read_text())
    for seed in metrics['seeds']: metrics['seeds'][seed]['MAE'] = 0.4242
    (run/'metrics.json').write_text(json.dumps(metrics))
    after = results.table3({'t-HNE': run})
    assert after.data['measured'].loc['t-HNE', 'MAE mean'] == pytest.approx(0.4242)
    assert '0.424' in after.to_markdown() and '0.424' not in before.to_markdown().split('MAE')[1].split('\n')[2]
    assert after.to_markdown() != before.to_markdown()


def test_reported_and_measured_rows_stay_apart(reproduced, tmp_path):
    _, out = reproduced
    default = results.table3({'t-HNE': out.run_dirs[reproduce.FULL]})
    assert len(default.blocks) == 1 and 'reported' not in default.data
    assert any('reports no results' in n for n in default.notes)
    mosi_run = copy_run(out.run_dirs[reproduce.FULL], tmp_path/'mosi', dataset='mosi')
    table = results.table3({'t-HNE (ours)': mosi_run})
    (measured_title, measured), (reported_title, reported) = table.blocks.items()
    assert 'Measured' in measured_title and 'Reported' in reported_title
    assert list(measured.index) == ['t-HNE (ours)']
    assert list(reported.index) == list(results.REPORTED_TABLE3) and reported.loc['t-HNE', 'MAE'] == '0.680'
    assert not set(measured.index) & set(reported.index)
    md = table.to_markdown()
    assert md.index('### Measured') < md.index('| t-HNE (ours) |') < md.index('### Reported') < md.index('| TFN |')
    tex = table.to_latex()
    assert tex.count(r'\begin{table}') == 2 and r'$\dagger$' in tex and r'$\pm$' in tex


def test_table4_paired_test_on_constructed_runs(reproduced, tmp_path):
    "A variant worse by 0.1 MAE on every seed is flagged; one with zero-mean noise is not."
    _, out = reproduced
    full = copy_run(out.run_dirs[reproduce.FULL], tmp_path/'full')
    metrics = json.loads((full/'metrics.json').read_text())
    rng = np.random.default_rng(0)
    seeds = [str(s) for s in range(1111, 1116)]
    base = {s: dict(next(iter(metrics['seeds'].values())), MAE=0.8 + 0.02*rng.standard_normal()) for s in seeds}
    (full/'metrics.json').write_text(json.dumps({**metrics, 'seeds': base}))
    def variant(name, mae_shift):
        path = copy_run(full, tmp_path/name)
        per = {s: dict(m, MAE=m['MAE'] + shift) for (s, m), shift in zip(base.items(), mae_shift)}
        (path/'metrics.json').write_text(json.dumps({**metrics, 'seeds': per}))
        return path
    table = results.table4({'t-HNE': full, 'worse': variant('worse', 0.1 + 0.002*rng.standard_normal(5)),
                            'same': variant('same', [0.01, -0.012, 0.004, -0.006, 0.003])})
    tests = table.data['paired_tests']
    assert tests.loc[('worse', 'MAE'), 'significant'] and tests.loc[('worse', 'MAE'), 'mean_diff'] == pytest.approx(0.1, abs=0.005)
    assert not tests.loc[('same', 'MAE'), 'significant'] and tests.loc[('same', 'MAE'), 'n_pairs'] == 5
    assert not tests.loc[('worse', 'Corr'), 'significant']   # identical Corr on every seed: p = 1
    assert '*' in table.blocks[list(table.blocks)[1]].loc['worse', 'MAE']


def test_table5_cases_follow_the_rules(reproduced):
    _, out = reproduced
    run = results.read_run(out.run_dirs[reproduce.FULL])
    preds = run.predictions()
    cases = results.select_cases(preds)
    assert cases['index'].is_unique and len(cases) >= 2
    error = (preds.prediction - preds.label).abs()
    assert cases.loc['(D) large error', 'error'] == pytest.approx(error[~preds['index'].isin(cases['index'].iloc[:-1])].max())
    table = results.table5({'t-HNE': run})
    block = next(iter(table.blocks.values()))
    assert list(block['id']) == [preds.set_index('index').loc[i, 'id'] for i in cases['index']]


def test_bad_run_directory_is_one_line_error(tmp_path):
    (tmp_path/'run').mkdir()
    # a finished run always has config.json (train writes it before the first epoch): it is required, and named first
    with pytest.raises(ThneError, match='config.json: no such file') as err: results.read_run(tmp_path/'run')
    assert '\n' not in str(err.value)
    (tmp_path/'run'/'config.json').write_text('{"model": "thne"}')
    with pytest.raises(ThneError, match='metrics.json: no such file'): results.read_run(tmp_path/'run')
    (tmp_path/'run'/'metrics.json').write_text('{not json')
    with pytest.raises(ThneError, match='metrics.json: unreadable JSON'): results.read_run(tmp_path/'run')


def test_grid_selects_on_validation_and_resumes(tiny_data, tmp_path, monkeypatch):
    kwargs = dict(seeds=(1111,), runs_dir=tmp_path/'runs', results_dir=tmp_path/'res', device='cpu', progress=False,
                  dataset=tiny_data, log=lambda *_: None,
                  settings=['batch_size=32', 'eta=0.001', 'beta=0.1', 'hidden=32', 'alpha=0.05,0.3', 'epochs=1'])
    table, selected = reproduce.grid_search('tiny', **kwargs)
    assert len(table) == 2 and table.trained_now.all() and table.selected.sum() == 1
    assert selected['valid MAE'] == table['valid MAE'].min()
    assert (tmp_path/'res'/'grid.csv').is_file() and 'Selected point' in (tmp_path/'res'/'grid.md').read_text()
    assert not any(c.startswith('test') for c in table.columns)
    from thne_nb import train
    monkeypatch.setattr(train, 'train', lambda *a, **k: pytest.fail('a finished grid point was trained again'))
    again, _ = reproduce.grid_search('tiny', **kwargs)
    assert not again.trained_now.any() and list(again.run_dir) == list(table.run_dir)


def test_grid_points_order_and_restriction():
    every = reproduce.grid_points()
    assert len(every) == 108 and len({tuple(p.items()) for p in every}) == 108
    assert reproduce.grid_points(max_points=5) == every[:5]
    restrict, fixed = reproduce.split_grid_settings(['eta=5e-4', 'hidden=64', 'epochs=3'])
    assert restrict == {'lr_main': (5e-4,), 'hidden': (64,)} and fixed == ['epochs=3']
    assert len(reproduce.grid_points(restrict=restrict)) == 2*3*3


def test_cli_parses_reproduce_and_grid():
    from thne_nb.cli import build_parser
    args = build_parser().parse_args(['reproduce', '--config', 'mosi', '--data', 'x.pkl', '--seeds', '1', '2',
                                      '--models', 'thne,mmim', '--set', 'epochs=1'])
    assert args.func is reproduce._reproduce_command and args.seeds == [1, 2] and args.set == ['epochs=1']
    args = build_parser().parse_args(['grid', '--max-points', '3', '--set', 'alpha=0.1', '--set', 'hidden=32'])
    assert args.max_points == 3 and args.set == ['alpha=0.1', 'hidden=32']
