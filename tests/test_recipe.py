"Issue 9: every switch of the training recipe, the ledger, MOSEI's 7-value MISA labels and the [UNK] guard."
import dataclasses, json, math, os, pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from thne_nb.cpc import CPC
from thne_nb.data import ThneError, load_dataset, make_default, write_mmsa, SPLITS
from thne_nb.encoding import load_tokenizer
from thne_nb.mi import nce_loss
from thne_nb.model import Config, available_configs, build_model, example_batch, get_config
from thne_nb.baselines.mmim import MMIMConfig
from thne_nb.baselines.mcen import MCENConfig
from thne_nb.reproduce import plan_runs
from thne_nb.train import (RECIPE_LEDGER, ConstantRate, clipped_parameters, configure_determinism, cpu_bf16,
                           autocast_for, ledger_markdown, make_optimizers, train)
from conftest import run_cli

DIMS = {'vision': 20, 'audio': 5}
OFFICIAL_RECIPE = ('mosi', 'mosei', 'sims', 'mmim-mosi', 'mmim-mosei', 'mmim-sims', 'mcen-mosi', 'mcen-mosei', 'mcen-sims')


# --- configuration ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('assignment, fragment', [
    ('optimizer=sgd', 'optimizer=sgd: must be one of adam, adamw'),
    ('lr_scheduler=cosine', 'lr_scheduler=cosine: must be one of none, plateau'),
    ('init=kaiming', 'init=kaiming: must be one of default, xavier'),
    ('cpc_softmax_over=rows', 'cpc_softmax_over=rows: must be one of targets, predictions'),
    ('cpc_layers=0', 'cpc_layers=0: must be at least 1'),
    ('lr_factor=1', 'lr_factor=1.0: must be in (0, 1)'),
    ('lr_patience=-1', 'lr_patience=-1: must not be negative'),
    ('deterministic=maybe', 'expected a boolean'),
])
def test_bad_recipe_values_are_one_line_errors(assignment, fragment):
    with pytest.raises(ThneError) as err: get_config('tiny').set_from_strings([assignment])
    assert fragment in str(err.value) and '\n' not in str(err.value)


def test_presets_follow_the_official_recipe():
    for name in OFFICIAL_RECIPE:
        cfg = get_config(name)
        assert (cfg.optimizer, cfg.weight_decay, cfg.lr_scheduler, cfg.init) == ('adam', 1e-4, 'plateau', 'xavier'), name
        # ReduceLROnPlateau(patience=20) under early stopping at 10: the official rate is in effect constant
        assert cfg.lr_patience == 20 and cfg.patience == 10 and cfg.lr_factor == 0.5, name
    mmim = get_config('mmim-mosi')
    assert (mmim.cpc_layers, mmim.cpc_softmax_over, mmim.grad_clip) == (1, 'predictions', 1.0)
    thne = get_config('mosi')
    assert (thne.cpc_layers, thne.cpc_softmax_over, thne.grad_clip) == (2, 'targets', 5.0)


def test_sims_presets_for_every_model():
    for name in ('sims', 'mmim-sims', 'mcen-sims'):
        cfg = get_config(name)
        assert (cfg.dataset, cfg.text_model) == ('sims', 'bert-base-chinese'), name
    assert get_config('sims').model == 'thne' and get_config('mmim-sims').model == 'mmim'


def test_literal_presets_differ_only_in_the_denominators():
    for name in ('mosi', 'mosei', 'sims'):
        literal, default = get_config(f'{name}-literal').to_dict(), get_config(name).to_dict()
        assert {k for k in default if default[k] != literal[k]} == {'include_positive'}
        assert literal['include_positive'] is False


# --- the ledger ---------------------------------------------------------------------------------------------------

def test_every_ledger_key_is_a_config_field():
    fields = {f.name for cls in (Config, MMIMConfig, MCENConfig) for f in dataclasses.fields(cls)}
    keys = [k for entry in RECIPE_LEDGER for k in entry['keys']]
    assert keys and set(keys) <= fields, set(keys) - fields
    for entry in RECIPE_LEDGER:
        assert entry['paper'] and entry['mmim'], entry['choice']
        for key in entry['keys']:
            cfg = get_config('mmim-tiny') if not hasattr(Config, key) else get_config('tiny')
            value = getattr(cfg, key)
            text = ','.join(map(str, value)) if isinstance(value, tuple) else str(value)
            assert getattr(cfg.replace().set_from_strings([f'{key}={text}']), key) == value  # a working --set key


def test_ledger_covers_the_issue_and_the_notebook_shows_its_rendering():
    choices = ' '.join(entry['choice'] for entry in RECIPE_LEDGER).lower()
    for topic in ('optimiser', 'schedule', 'initialisation', 'clipping', 'cpc softmax', 'cpc predictor', 'nce denominators',
                  "eq. 2", 's(f, h_t)', 'dropout', 'weight decay', 'epochs', 'selection', 'spread', 'precision',
                  'determinism'):
        assert topic in choices, topic
    notebook = json.loads((Path(__file__).parents[1] / 'nbs' / '07_train.ipynb').read_text())
    markdown = [''.join(cell['source']) for cell in notebook['cells'] if cell['cell_type'] == 'markdown']
    assert any(ledger_markdown() in text for text in markdown), 'the ledger table in 07_train is stale'


# --- optimiser, schedule, initialisation, clipping ------------------------------------------------------------------

@pytest.fixture(scope='module')
def tiny_thne():
    torch.manual_seed(0)
    return build_model(get_config('tiny'), DIMS)


def test_optimizer_switch(tiny_thne):
    cfg = get_config('tiny')
    assert type(make_optimizers(tiny_thne, cfg)[0]) is torch.optim.Adam
    assert type(make_optimizers(tiny_thne, cfg.replace(optimizer='adamw'))[0]) is torch.optim.AdamW
    main, first, _ = make_optimizers(build_model(get_config('mmim-tiny'), DIMS), get_config('mmim-tiny'))
    assert type(main) is torch.optim.Adam and type(first) is torch.optim.Adam
    assert all(group['weight_decay'] == 1e-4 for group in first.param_groups)


def test_lr_scheduler_switch(tiny_thne):
    cfg = get_config('tiny').replace(lr_patience=3, lr_factor=0.25)
    _, _, plateau = make_optimizers(tiny_thne, cfg)
    assert isinstance(plateau, torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert (plateau.patience, plateau.factor) == (3, 0.25)
    for _ in range(5): plateau.step(1.0)
    assert math.isclose(plateau.optimizer.param_groups[0]['lr'], cfg.lr_text * 0.25)
    _, _, constant = make_optimizers(tiny_thne, cfg.replace(lr_scheduler='none'))
    assert isinstance(constant, ConstantRate) and constant.state_dict() == {}


def test_init_switch_leaves_the_text_encoder_alone():
    built = {}
    for scheme in ('default', 'xavier'):
        torch.manual_seed(0)
        built[scheme] = dict(build_model(get_config('tiny').replace(init=scheme), DIMS).named_parameters())
    default, xavier = built['default'], built['xavier']
    text = [n for n in default if n.startswith('text_encoder.')]
    assert text and all(torch.equal(default[n], xavier[n]) for n in text)
    matrices = [n for n in default if not n.startswith('text_encoder.') and default[n].dim() > 1]
    assert matrices and not any(torch.equal(default[n], xavier[n]) for n in matrices)
    vectors = [n for n in default if not n.startswith('text_encoder.') and default[n].dim() == 1]
    assert vectors and all(torch.equal(default[n], xavier[n]) for n in vectors)  # biases keep their init, as MMIM
    weight = xavier['fusion.layers.1.weight']
    assert abs(weight.std().item() / math.sqrt(2 / sum(weight.shape)) - 1) < 0.1


def test_mmim_clipping_covers_the_mi_module_and_thne_leaves_its_probe_out(tiny_thne):
    mmim = build_model(get_config('mmim-tiny'), DIMS)
    main, _, _ = make_optimizers(mmim, get_config('mmim-tiny'))
    clipped = {id(p) for p in clipped_parameters(mmim, main)}
    updated = {id(p) for group in main.param_groups for p in group['params']}
    mi = {id(p) for p in mmim.mi.parameters()}
    assert mi <= clipped and not mi & updated and updated <= clipped
    thne_main, _, _ = make_optimizers(tiny_thne, get_config('tiny'))
    probes = {id(p) for p in tiny_thne.probe_parameters()}
    assert probes and not probes & {id(p) for p in clipped_parameters(tiny_thne, thne_main)}


# --- model details ------------------------------------------------------------------------------------------------

def test_cpc_direction_and_depth_follow_the_config():
    thne = build_model(get_config('tiny'), DIMS)
    mmim = build_model(get_config('mmim-tiny'), DIMS)
    assert thne.cpc_v.softmax_over == 'targets' and mmim.cpc['v'].softmax_over == 'predictions'
    assert isinstance(mmim.cpc['v'].predictor, nn.Linear) and isinstance(thne.cpc_v.predictor, nn.Sequential)
    flipped = build_model(get_config('tiny').replace(cpc_softmax_over='predictions', cpc_layers=1), DIMS)
    assert flipped.cpc_v.softmax_over == 'predictions' and isinstance(flipped.cpc_v.predictor, nn.Linear)
    deeper = build_model(get_config('mmim-tiny').replace(cpc_layers=2), DIMS)
    first, last = deeper.cpc['v'].predictor[0], deeper.cpc['v'].predictor[-1]
    assert first.out_features == get_config('mmim-tiny').hidden_v == last.in_features  # official: hidden = target width
    torch.manual_seed(0)
    F, h = torch.randn(6, 16), torch.randn(6, 8)
    head = CPC(16, 8, softmax_over='predictions')
    cosines = head.cosine_matrix(F, h)
    assert torch.allclose(head(F, h), nce_loss(cosines.T)) and not torch.allclose(head(F, h), nce_loss(cosines))


@pytest.mark.parametrize('name', ['tiny', 'mmim-tiny', 'mcen-tiny'])
def test_predictions_stay_float32_under_bf16_autocast(name):
    torch.manual_seed(0)
    model = build_model(get_config(name), DIMS).eval()
    batch = example_batch(DIMS)
    with torch.no_grad(), cpu_bf16(), autocast_for(torch.device('cpu'), True): out = model(batch)
    assert out.prediction.dtype == torch.float32
    head = {'tiny': lambda F: model.regressor(F), 'mmim-tiny': lambda F: model.fusion_network.head(F).squeeze(-1),
            'mcen-tiny': lambda F: model.core.head(F).squeeze(-1)}[name]
    with torch.no_grad(): expected = head(out.fusion.float())
    assert torch.equal(out.prediction, expected)  # the head itself ran in float32 on the (bf16) fusion vector


def test_deterministic_switch_sets_and_clears_the_flags(monkeypatch):
    monkeypatch.delenv('CUBLAS_WORKSPACE_CONFIG', raising=False)
    try:
        configure_determinism(True)
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ['CUBLAS_WORKSPACE_CONFIG'] == ':4096:8'
    finally:
        configure_determinism(False)
    assert not torch.backends.cudnn.deterministic and not torch.are_deterministic_algorithms_enabled()


# --- data ---------------------------------------------------------------------------------------------------------

def mosei_like_records(n, words, seed=0, dv=35, da=74):
    "MMIM-style unaligned MOSEI records: lengths after the words, a (1, 7) label (sentiment, six emotions)."
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        T_v, T_a = 4 + i % 3, 6 + i % 4
        label = np.concatenate([[0.5 * i - 1.5], rng.uniform(0, 3, 6)]).reshape(1, 7)
        records.append(((np.arange(len(words)), rng.standard_normal((T_v, dv)), rng.standard_normal((T_a, da)),
                         np.array(words), T_v, T_a), label, f'clip{i}[{i}]'))
    return records


def write_folder(folder, words, n=8):
    folder.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(('train.pkl', 'dev.pkl', 'test.pkl')):
        (folder / name).write_bytes(pickle.dumps(mosei_like_records(n, words, seed), protocol=2))
    return folder


def test_mosei_misa_labels_take_the_sentiment_column(tmp_path, capsys):
    folder = write_folder(tmp_path / 'MOSEI', ['a', 'really', 'good', 'film'])
    dataset = load_dataset(folder)
    train = dataset['train']
    assert dataset.name == 'mosei' and train.labels.tolist() == pytest.approx([0.5 * i - 1.5 for i in range(8)])
    assert train.extras['emotions'].shape == (8, 6)
    status, out, _ = run_cli(['data', 'inspect', folder], capsys)
    assert status == 0 and 'column 0 used' in json.loads(out)['splits']['train']['labels']['note']


def test_misa_labels_of_another_width_are_refused(tmp_path, capsys):
    records = mosei_like_records(3, ['fine'])
    records[1] = (records[1][0], np.zeros((1, 3)), records[1][2])
    folder = tmp_path / 'MOSI'; folder.mkdir()
    for name in ('train.pkl', 'dev.pkl', 'test.pkl'): (folder / name).write_bytes(pickle.dumps(records, protocol=2))
    status, _, err = run_cli(['data', 'inspect', folder], capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1 and 'record 1: label must be a single value' in err


def test_chinese_text_with_an_english_tokenizer_names_the_sims_preset(tmp_path, capsys):
    folder = write_folder(tmp_path / 'chinese', ['这个', '电影', '真的', '很', '好看'])
    status, _, err = run_cli(['train', '--config', 'tiny', '--data', folder, '--device', 'cpu', '--quiet',
                              '--out', tmp_path / 'run'], capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert 'into [UNK]' in err and '--config sims, mmim-sims or mcen-sims' in err
    assert load_dataset(write_folder(tmp_path / 'MOSEI', ['fine', 'words'])).name == 'mosei'  # English passes


# --- whole runs ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def small_dataset(tmp_path_factory):
    path = write_mmsa(make_default(n_clips=40, seed=3), tmp_path_factory.mktemp('data') / 'small.pkl')
    return load_dataset(path, tokenizer=load_tokenizer('tiny'), max_text_len=24)


@pytest.mark.parametrize('name, changes', [
    ('tiny', dict(optimizer='adamw', lr_scheduler='none', init='default', cpc_softmax_over='predictions',
                  cpc_layers=1, include_positive=False, deterministic=True)),
    ('mmim-tiny', {}),
    ('mcen-tiny', {}),
])
def test_one_epoch_with_each_changed_recipe(small_dataset, tmp_path, name, changes):
    cfg = get_config(name).replace(device='cpu', **changes)
    try: summary = train(cfg, tmp_path / 'run', dataset=small_dataset, progress=False)
    finally: configure_determinism(False)
    assert math.isfinite(summary['mean']['MAE'])
    assert json.loads((tmp_path / 'run' / 'config.json').read_text())['optimizer'] == cfg.optimizer


def test_reproduce_demo_still_plans():
    plan = plan_runs('demo')
    assert {cfg.model for cfg in plan.values()} == {'thne', 'mmim', 'mcen'}
    assert all(cfg.optimizer == 'adam' and cfg.init == 'xavier' for cfg in plan.values())
    assert 'mosi-literal' in available_configs() and 'mmim-sims' in available_configs()
