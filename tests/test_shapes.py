"""Benchmark-only building blocks: the base-shaped random BERT and the real-shaped synthetic MOSI/MOSEI."""
import numpy as np
import pytest
import torch

from thne_nb.core import ThneError
from thne_nb.data import load_dataset, write_mmsa
from thne_nb.encoding import (EMBEDDED_TEXT_MODEL, RANDOM_BASE_TEXT_MODEL, TINY_TEXT_MODEL, TextEncoder, is_benchmark_only,
                              load_text_model, load_tokenizer, random_bert_base_config, tiny_bert_config)
from thne_nb.synthetic import make_default, make_shaped, shaped_sizes

BERT_BASE_PARAMS = 109_482_240  # bert-base-uncased's BertModel, pooler included
POOLER_PARAMS = 768 * 768 + 768


def test_random_base_config_is_bert_base_shaped():
    c = random_bert_base_config()
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size) == (12, 768, 12, 3072)
    assert (c.max_position_embeddings, c.type_vocab_size, c.vocab_size) == (512, 2, 30522)
    tiny, base = tiny_bert_config().to_diff_dict(), c.to_diff_dict()
    assert {k for k in tiny.keys() | base.keys() if tiny.get(k) != base.get(k)} == {
        'hidden_size', 'num_hidden_layers', 'num_attention_heads', 'intermediate_size'}


def test_random_base_tokenizer_has_its_vocabulary():
    tokenizer = load_tokenizer(RANDOM_BASE_TEXT_MODEL)
    assert tokenizer.vocab_size == 30522 == random_bert_base_config().vocab_size
    assert tokenizer('a fine film')['input_ids'] == load_tokenizer(EMBEDDED_TEXT_MODEL)('a fine film')['input_ids']


def test_random_base_parameter_count_on_meta():
    with torch.device('meta'):
        model = load_text_model(RANDOM_BASE_TEXT_MODEL)
        encoder = TextEncoder(RANDOM_BASE_TEXT_MODEL)
    assert model.pooler is None and next(model.parameters()).device.type == 'meta'
    assert sum(p.numel() for p in model.parameters()) + POOLER_PARAMS == BERT_BASE_PARAMS
    assert encoder.dim == 768 and encoder.name == RANDOM_BASE_TEXT_MODEL


def test_is_benchmark_only():
    assert is_benchmark_only(RANDOM_BASE_TEXT_MODEL) and is_benchmark_only('random-bert-base')
    for name in (EMBEDDED_TEXT_MODEL, TINY_TEXT_MODEL, 'bert-base-uncased', '/models/bert', None, random_bert_base_config()):
        assert not is_benchmark_only(name)


@pytest.mark.parametrize('name, splits, dims, frames', [
    ('mosi', {'train': 1284, 'valid': 229, 'test': 686}, {'vision': 20, 'audio': 5}, 375),
    ('mosei', {'train': 16326, 'valid': 1871, 'test': 4659}, {'vision': 35, 'audio': 74}, 500)])
def test_shaped_sizes_are_the_real_ones(name, splits, dims, frames):
    sizes = shaped_sizes(name)
    assert sizes['splits'] == splits and sizes['dims'] == dims and sizes['text_tokens'] == 50
    assert sizes['frames'] == {'vision': frames, 'audio': frames}
    assert sizes['nbytes'] == 4 * sum(splits.values()) * frames * sum(dims.values())


def test_shaped_sizes_of_a_fraction_and_bad_arguments():
    assert shaped_sizes('mosei', 0.01)['splits'] == {'train': 163, 'valid': 19, 'test': 47}
    assert min(shaped_sizes('mosi', 1e-6)['splits'].values()) == 2
    for bad in (dict(name='sims'), dict(name='mosi', fraction=0), dict(name='mosi', fraction=1.5)):
        with pytest.raises(ThneError): shaped_sizes(**bad)


@pytest.mark.parametrize('name', ['mosi', 'mosei'])
def test_make_shaped_fraction(name, tmp_path):
    sizes = shaped_sizes(name, 0.01)
    data = make_shaped(name, fraction=0.01, seed=1)
    assert data.keys() == make_default(n_clips=10).keys()
    assert data['thne_nb']['name'] == name and data['thne_nb']['generator']['shaped']['fraction'] == 0.01
    for split, n in sizes['splits'].items():
        s = data[split]
        for m in ('vision', 'audio'):
            T = sizes['frames'][m]
            assert s[m].shape == (n, T, sizes['dims'][m]) and s[m].dtype == np.float32
            assert s[f'{m}_lengths'].min() >= round(0.3 * T) and s[f'{m}_lengths'].max() <= T
            assert not s[m][np.arange(T)[None] >= s[f'{m}_lengths'][:, None]].any()  # padding stays zero
        assert s['id'][0].startswith(f'{name}-shaped1_{split}_')
    dataset = load_dataset(write_mmsa(data, tmp_path/'shaped.pkl'))
    assert dataset.name == name and dataset.dims == sizes['dims']
    assert {s: len(d) for s, d in dataset.splits.items()} == sizes['splits']
    assert (dataset.splits['train'].attention_mask.sum(1) == 50).float().mean() > 0.9


def test_make_shaped_is_deterministic():
    a, b = make_shaped('mosi', 0.005, seed=2), make_shaped('mosi', 0.005, seed=2)
    assert all(np.array_equal(a[s][k], b[s][k]) for s in ('train', 'valid', 'test') for k in ('audio', 'raw_text'))
    assert not np.array_equal(a['train']['audio'], make_shaped('mosi', 0.005, seed=3)['train']['audio'])
