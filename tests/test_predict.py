"""`thne predict`, `thne export`, `thne configs`, config files and the top-level API, on a tiny model trained on
40 clips of the embedded default: label-free data, exported folders, and one-line refusals of bad input."""
import json, pickle, shutil, subprocess, sys

import numpy as np
import pandas as pd
import pytest
import torch

from thne_nb.cli import main
from thne_nb.data import SPLITS, write_mmsa
from thne_nb.synthetic import make_default
from conftest import run_cli, assert_one_line_error


def without_labels(split: dict) -> dict:
    return {k: v for k, v in split.items() if k != 'regression_labels'}


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    "The default's generator at 40 clips (24/4/12), its test split without labels, and the same with all three splits."
    folder = tmp_path_factory.mktemp('data')
    data = make_default(n_clips=40)
    paths = {'labelled': write_mmsa(data, folder / 'small.pkl')}
    paths['new'] = write_mmsa({'test': without_labels(data['test'])}, folder / 'new_clips.pkl')
    paths['unlabelled_all'] = write_mmsa({s: without_labels(data[s]) for s in SPLITS}, folder / 'unlabelled_all.pkl')
    paths['folder'] = folder
    return paths


@pytest.fixture(scope='module')
def run(files, tmp_path_factory):
    "A one-epoch tiny run with two seeds on the small file."
    out = tmp_path_factory.mktemp('runs') / 'tiny'
    with pytest.raises(SystemExit) as exit_info:
        main(['train', '--config', 'tiny', '--data', str(files['labelled']), '--seeds', '1111', '1112', '--device', 'cpu',
              '--quiet', '--out', str(out)])
    assert exit_info.value.code == 0
    return out


def test_label_free_copy_predicts_as_eval_does(files, run, tmp_path, capsys):
    status, out, _ = run_cli(['predict', run, '--data', files['new'], '--out', tmp_path / 'p.csv', '--device', 'cpu'], capsys)
    assert status == 0 and 'mean of seeds 1111, 1112' in out
    table = pd.read_csv(tmp_path / 'p.csv')
    assert len(table) == 12 and 'truth' not in table
    assert {'id', 'prediction', 'acc2', 'acc7', 's_ft', 's_fv', 's_fa', 'peak_step_vision', 'peak_step_audio',
            'prediction_seed1111', 'prediction_seed1112'} <= set(table.columns)
    for seed in (1111, 1112):  # evaluate's predictions at the end of training, on the labelled split
        evaluated = pd.read_csv(run / f'seed_{seed}' / 'test_predictions.csv')
        assert (table.id == evaluated.id).all()
        assert np.array_equal(table[f'prediction_seed{seed}'].to_numpy(np.float32), evaluated.prediction.to_numpy(np.float32))
    assert np.allclose(table.prediction, table[['prediction_seed1111', 'prediction_seed1112']].mean(axis=1), atol=1e-9)
    assert set(table.acc2) <= {'negative', 'non-negative'} and table.acc7.between(-3, 3).all()
    assert (table.peak_step_vision >= 0).all() and table.s_ft.between(np.exp(-1) - 1e-6, np.e + 1e-6).all()

    # the labelled split: `thne eval` prints the mean over seeds of each seed's metrics
    status, out, _ = run_cli(['predict', run, '--data', files['labelled'], '--out', tmp_path / 'l.csv', '--seed', '1111'], capsys)
    assert status == 0
    labelled = pd.read_csv(tmp_path / 'l.csv')
    assert np.allclose(labelled.error, labelled.prediction - labelled.truth)
    status, out, _ = run_cli(['eval', run, '--data', files['labelled'], '--device', 'cpu'], capsys)
    assert status == 0
    mae_row = next(line.split() for line in out.splitlines() if line.startswith('MAE'))
    assert float(mae_row[1]) == pytest.approx((labelled.prediction - labelled.truth).abs().mean(), abs=1e-4)


def test_export_reloads_alone_with_identical_predictions(files, run, tmp_path, capsys):
    status, out, _ = run_cli(['export', run, '--out', tmp_path / 'exported', '--seed', '1112'], capsys)
    assert status == 0 and 'exported seed 1112' in out
    moved = shutil.copytree(tmp_path / 'exported', tmp_path / 'elsewhere' / 'model')
    shutil.rmtree(tmp_path / 'exported')
    names = sorted(p.relative_to(moved).as_posix() for p in moved.rglob('*') if p.is_file())
    assert names == ['README.md', 'config.json', 'metrics.json', 'model.safetensors', 'tokenizer/tokenizer.json',
                     'tokenizer/tokenizer_config.json']
    payload = json.loads((moved / 'config.json').read_text())
    assert payload['dims'] == {'vision': 20, 'audio': 5} and payload['text_model'] == 'tiny' and payload['seed'] == 1112
    assert payload['config']['max_text_len'] == 24 and payload['text_config']['model_type'] == 'bert'
    card = (moved / 'README.md').read_text()
    test_mae = json.loads((run / 'metrics.json').read_text())['seeds']['1112']['MAE']
    assert card.startswith('---\nlibrary_name: thne_nb') and f'| MAE | {test_mae:.4f} |' in card and '## Choices' in card

    away = run.rename(run.with_name('away'))  # the run folder is not there while the exported model is used
    try:
        status, _, _ = run_cli(['predict', moved, '--data', files['new'], '--out', tmp_path / 'e.csv'], capsys)
        from thne_nb import load_pretrained, predict
        model = load_pretrained(moved)
        in_python = predict(model, files['new'])
    finally: away.rename(run)
    assert status == 0
    status, _, _ = run_cli(['predict', run, '--seed', '1112', '--data', files['new'], '--out', tmp_path / 'r.csv'], capsys)
    exported, original = pd.read_csv(tmp_path / 'e.csv'), pd.read_csv(tmp_path / 'r.csv')
    assert np.array_equal(exported.prediction, original.prediction) and np.array_equal(exported.s_fa, original.s_fa)
    assert np.array_equal(in_python.prediction.to_numpy(), exported.prediction.to_numpy())
    weights = torch.load(run / 'seed_1112' / 'best.pt', weights_only=True)
    assert all(torch.equal(weights[k], v) for k, v in model.model.state_dict().items())


def test_misa_records_without_labels(files, run, tmp_path):
    from thne_nb import predict
    data = make_default(n_clips=40)['test']
    records = [((np.zeros(3), data['vision'][i, :int(data['vision_lengths'][i])], data['audio'][i, :int(data['audio_lengths'][i])],
                 np.array(str(data['raw_text'][i]).split())), None, str(data['id'][i])) for i in range(5)]
    (tmp_path / 'test.pkl').write_bytes(pickle.dumps(records, protocol=4))
    table = predict(run, tmp_path / 'test.pkl', seed=1111)
    assert len(table) == 5 and 'truth' not in table and table.id.tolist() == [str(i) for i in data['id'][:5]]
    records[1] = (records[1][0], [[0.5]], records[1][2])
    (tmp_path / 'test.pkl').write_bytes(pickle.dumps(records, protocol=4))
    with pytest.raises(Exception, match='has no label'): predict(run, tmp_path / 'test.pkl')


def test_top_level_api(files, run):
    import thne_nb
    from thne_nb import get_config, load_dataset, train, predict, load_pretrained
    assert get_config('tiny').model == 'thne' and callable(train) and callable(predict)
    assert train.load_run is thne_nb.train.load_run and load_pretrained is thne_nb.predict.load_pretrained
    assert load_dataset(files['new'], for_prediction=True)['test'].labels is None
    assert list(predict(run, files['new'], seed=1111).columns[:3]) == ['index', 'id', 'text']


def wide_file(folder):
    return write_mmsa(make_default(n_clips=20, vision_dim=47, audio_dim=74), folder / 'wide.pkl')


def small_vocabulary_tokenizer(folder):
    from transformers import BertTokenizerFast
    (folder / 'vocab.txt').write_text('\n'.join(['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'the', 'film']))
    BertTokenizerFast(vocab_file=str(folder / 'vocab.txt')).save_pretrained(str(folder / 'small_tokenizer'))
    return folder / 'small_tokenizer'


def empty_file(folder):
    split = make_default(n_clips=10)['test']
    empty = {k: v[:0] for k, v in without_labels(split).items() if hasattr(v, 'shape')}
    (folder / 'empty.pkl').write_bytes(pickle.dumps({'test': empty}, protocol=4))
    return folder / 'empty.pkl'


BAD_INPUTS = {
    'feature dims': (lambda f, r, t: ['predict', r, '--data', wide_file(t), '--out', t / 'p.csv'],
                     ['the model expects vision/audio features of 20/5 dims, the file has 47/74']),
    'tokenizer': (lambda f, r, t: ['predict', r, '--data', f['new'], '--tokenizer', small_vocabulary_tokenizer(t), '--out', t / 'p.csv'],
                  ["its vocabulary differs from the model's (tiny)"]),
    'empty data set': (lambda f, r, t: ['predict', r, '--data', empty_file(t), '--out', t / 'p.csv'], ['[test]: split is empty']),
    'missing split': (lambda f, r, t: ['predict', r, '--data', f['new'], '--split', 'valid', '--out', t / 'p.csv'],
                      ["no 'valid' split (it has test)"]),
    'not a model': (lambda f, r, t: ['predict', f['folder'], '--out', t / 'p.csv'], ['neither a run folder']),
    'no such seed': (lambda f, r, t: ['predict', r, '--seed', '7', '--out', t / 'p.csv'], ['no seed 7 (the run has 1111, 1112)']),
    'train without labels': (lambda f, r, t: ['train', '--config', 'tiny', '--data', f['unlabelled_all'], '--out', t / 'run'],
                             ['[train]: the clips have no labels', 'can only be predicted']),
    'eval without labels': (lambda f, r, t: ['eval', r, '--data', f['unlabelled_all']], ['the clips have no labels']),
    'export into the run': (lambda f, r, t: ['export', r, '--out', r], ['is a training run folder']),
    'missing config file': (lambda f, r, t: ['train', '--config', t / 'missing.json'], ['missing.json: no such config file']),
    'device': (lambda f, r, t: ['predict', r, '--device', 'gpu:0', '--out', t / 'p.csv'], ["device 'gpu:0'"]),
}


@pytest.mark.parametrize('case', list(BAD_INPUTS))
def test_bad_input_is_one_line(case, files, run, tmp_path, capsys):
    argv, fragments = BAD_INPUTS[case]
    status, _, err = run_cli(argv(files, run, tmp_path), capsys)
    assert_one_line_error(status, err, *fragments)


def test_tampered_export_is_refused(run, tmp_path, capsys):
    from thne_nb.predict import export
    folder = export(run, tmp_path / 'model')
    payload = json.loads((folder / 'config.json').read_text())
    (folder / 'config.json').write_text(json.dumps({**payload, 'dims': {'vision': 21, 'audio': 5}}))
    status, _, err = run_cli(['predict', folder, '--out', tmp_path / 'p.csv'], capsys)
    assert_one_line_error(status, err, 'model.safetensors: does not fit the model described in config.json')
    (folder / 'config.json').write_text(json.dumps(payload))
    (folder / 'model.safetensors').write_bytes(b'\x80\x04 not safetensors')
    status, _, err = run_cli(['predict', folder, '--out', tmp_path / 'p.csv'], capsys)
    assert_one_line_error(status, err, 'does not fit the model')


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the message of a machine without CUDA')
def test_cuda_index_without_cuda(run, tmp_path, capsys):
    status, _, err = run_cli(['predict', run, '--device', 'cuda:1', '--out', tmp_path / 'p.csv'], capsys)
    assert_one_line_error(status, err, "device 'cuda:1': CUDA is not available")


def test_run_config_file_repeats_the_run(run, tmp_path, capsys):
    status, _, _ = run_cli(['train', '--config', run / 'config.json', '--seeds', '1111', '--quiet', '--out', tmp_path / 'again'], capsys)
    assert status == 0
    first, again = (json.loads((d / 'metrics.json').read_text()) for d in (run, tmp_path / 'again'))
    assert again['seeds']['1111'] == first['seeds']['1111']


def test_configs_via_python_m(tmp_path):
    from thne_nb.config import available_configs
    done = subprocess.run([sys.executable, '-m', 'thne_nb', 'configs'], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines] == available_configs()
    assert all('text model' in line and ';' in line for line in lines)


def test_own_data_end_to_end(tmp_path):
    "The tutorial's path: arrays -> write_mmsa -> train -> predict new clips -> export -> reload."
    from thne_nb import get_config, train, predict, load_pretrained
    from thne_nb.predict import export
    rng = np.random.default_rng(1)

    def clips(n, labelled=True):
        split = {'id': np.array([f'v{i}' for i in range(n)], dtype=object),
                 'raw_text': np.array(['the film was good' if i % 2 else 'the film was bad' for i in range(n)], dtype=object)}
        for key, (T, d) in {'vision': (10, 16), 'audio': (8, 6)}.items():
            split[key], split[f'{key}_lengths'] = rng.standard_normal((n, T, d)).astype(np.float32), np.full(n, T)
        if labelled: split['regression_labels'] = rng.uniform(-3, 3, n).astype(np.float32)
        return split

    data = write_mmsa({'train': clips(16), 'valid': clips(4), 'test': clips(4)}, tmp_path / 'mine.pkl')
    new = write_mmsa({'test': clips(3, labelled=False)}, tmp_path / 'new.pkl')
    train(get_config('tiny').replace(data=str(data), seeds=(5,)), tmp_path / 'run', device='cpu', progress=False)
    table = predict(tmp_path / 'run', new)
    reloaded = predict(load_pretrained(export(tmp_path / 'run', tmp_path / 'model')), new)
    assert table.id.tolist() == ['v0', 'v1', 'v2'] and np.array_equal(table.prediction, reloaded.prediction)
