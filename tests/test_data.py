"""Data layer: safe loading, validation messages for every kind of bad input, cleaning, batching, the generator."""
import json, pickle

import numpy as np
import pytest
import torch

from thne_nb.core import ThneError
from thne_nb.data import load_dataset, make_loader, normalise_padding, safe_load, write_mmsa
from thne_nb.encoding import get_tokenizer
from thne_nb.synthetic import make_default


def mmsa_split(n=4, dv=20, da=5, T=6, labels=None, text_len=8):
    "A tiny valid MMSA split: every clip full length, constant features."
    return {'raw_text': np.array([f'clip {i} was a fine film' for i in range(n)], dtype=object),
            'text_bert': np.zeros((n, 3, text_len), np.int64),
            'vision': np.ones((n, T, dv), np.float32), 'audio': np.ones((n, T, da), np.float32),
            'vision_lengths': [T] * n, 'audio_lengths': [T] * n,
            'regression_labels': np.linspace(-1, 1, n).astype(np.float32) if labels is None else np.asarray(labels, np.float32),
            'id': np.array([f'vid[{i}]' for i in range(n)], dtype=object)}


def mmsa(**overrides):
    data = {'train': mmsa_split(), 'valid': mmsa_split(), 'test': mmsa_split()}
    data.update(overrides)
    return data


def dump(tmp_path, obj, name='unaligned_50.pkl', protocol=4):
    path = tmp_path / name
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


def expect_error(path_or_thunk, *fragments):
    "Loading must fail with a one-line ThneError containing every fragment."
    with pytest.raises(ThneError) as info:
        path_or_thunk() if callable(path_or_thunk) else load_dataset(path_or_thunk)
    message = str(info.value)
    assert '\n' not in message, message
    for fragment in fragments: assert fragment in message, message
    return message


# --- safe loading --------------------------------------------------------------------------------------------------

class RunsShell:
    def __init__(self, marker): self.marker = marker
    def __reduce__(self):
        import os
        return (os.system, (f'touch {self.marker}',))


class RunsEval:
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize('payload', [RunsShell, RunsEval])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, payload):
    marker = tmp_path / 'marker'
    path = dump(tmp_path, {'train': mmsa_split(), 'valid': payload(marker), 'test': mmsa_split()})
    expect_error(path, str(path), 'refused to unpickle', 'nothing was executed')
    assert not marker.exists()
    # plain pickle would indeed have run it: the test's payload is real
    pickle.loads(path.read_bytes())
    assert marker.exists()


def test_numpy1_and_protocol5_pickles_load(tmp_path):
    data = mmsa()
    legacy = pickle.dumps(data, protocol=2).replace(b'numpy._core.multiarray', b'numpy.core.multiarray')
    assert b'numpy.core.multiarray' in legacy
    (tmp_path / 'legacy.pkl').write_bytes(legacy)
    for path in (tmp_path / 'legacy.pkl', dump(tmp_path, data, 'p5.pkl', protocol=5)):
        dataset = load_dataset(path)
        assert dataset.name == 'mosi' and len(dataset['train']) == 4
        assert torch.equal(dataset['train'].vision, torch.ones(4, 6, 20))


def test_unpickler_admits_plain_containers(tmp_path):
    obj = {'a': [1, 2.5, 'x'], 'b': (None, True), 'c': {3, 4}, 'd': b'raw', 'e': np.int64(7)}
    assert safe_load(dump(tmp_path, obj, 'plain.pkl', protocol=2)) == obj


# --- unreadable files ----------------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    expect_error(tmp_path / 'nope.pkl', 'nope.pkl', 'no such file')


def test_empty_file(tmp_path):
    (tmp_path / 'empty.pkl').write_bytes(b'')
    expect_error(tmp_path / 'empty.pkl', 'empty.pkl', 'empty file')


@pytest.mark.parametrize('keep', [0.3, 0.9])
def test_truncated_file(tmp_path, keep):
    whole = pickle.dumps(mmsa(), protocol=4)
    (tmp_path / 'cut.pkl').write_bytes(whole[:int(len(whole) * keep)])
    expect_error(tmp_path / 'cut.pkl', 'cut.pkl', 'truncated')


def test_not_a_pickle(tmp_path):
    (tmp_path / 'notes.pkl').write_text('id,label\nvid1,0.5\n')
    expect_error(tmp_path / 'notes.pkl', 'notes.pkl', 'not a readable pickle')


@pytest.mark.parametrize('obj,what', [({'features': np.zeros(3)}, 'dict with keys features'), ([1, 2, 3], 'list'),
                                      ('hello', 'str')])
def test_unknown_format(tmp_path, obj, what):
    expect_error(dump(tmp_path, obj, 'odd.pkl'), 'odd.pkl', 'unknown format', what)


# --- MMSA validation -----------------------------------------------------------------------------------------------

def test_missing_split(tmp_path):
    data = mmsa(); del data['valid']
    expect_error(dump(tmp_path, data), "missing split 'valid'", 'found: test, train')


def test_missing_field(tmp_path):
    split = mmsa_split(); del split['audio']
    expect_error(dump(tmp_path, mmsa(train=split)), '[train]', "missing 'audio'")


def test_mismatched_split_sizes(tmp_path):
    split = mmsa_split(); split['audio'] = split['audio'][:3]
    expect_error(dump(tmp_path, mmsa(test=split)), '[test]', "'audio' has 3 clips but 'regression_labels' has 4")
    split = mmsa_split(); split['raw_text'] = split['raw_text'][:2]
    expect_error(dump(tmp_path, mmsa(valid=split)), '[valid]', "'raw_text' has 2 clips")


def test_dims_differ_between_splits(tmp_path):
    expect_error(dump(tmp_path, mmsa(test=mmsa_split(dv=35))), 'vision feature dim differs between splits', 'test 35')
    expect_error(dump(tmp_path, mmsa(valid=mmsa_split(da=74))), 'audio feature dim differs between splits', 'valid 74')


def test_bad_text_bert_shape(tmp_path):
    split = mmsa_split(); split['text_bert'] = np.zeros((4, 8), np.int64)
    expect_error(dump(tmp_path, mmsa(train=split)), "'text_bert' must be (N, 3, L)", '(4, 8)')
    split['text_bert'] = np.zeros((4, 2, 8), np.int64)
    expect_error(dump(tmp_path, mmsa(train=split)), "'text_bert' must be (N, 3, L)")


def test_sequences_not_3d(tmp_path):
    split = mmsa_split(); split['vision'] = np.ones((4, 20), np.float32)
    expect_error(dump(tmp_path, mmsa(train=split)), "'vision' must be an (N, T, d) array", '(4, 20)')


def test_labels_out_of_range(tmp_path):
    expect_error(dump(tmp_path, mmsa(test=mmsa_split(labels=[0, 1, 2, 3.4]))), '[test]', 'labels outside [-3, 3] for mosi', 'max 3.4')
    sims = {s: mmsa_split(dv=709, da=33, labels=[0, 0.5, -1, 1.6]) for s in ('train', 'valid', 'test')}
    expect_error(dump(tmp_path, sims, 'unaligned_39.pkl'), 'labels outside [-1, 1] for sims')


def test_nan_labels(tmp_path):
    expect_error(dump(tmp_path, mmsa(train=mmsa_split(labels=[0, np.nan, 1, 1]))), '[train]', 'labels contain NaN')


def test_empty_split(tmp_path):
    expect_error(dump(tmp_path, mmsa(valid=mmsa_split(n=0))), '[valid]', 'split is empty')


def test_negative_lengths(tmp_path):
    split = mmsa_split(); split['audio_lengths'] = [6, -1, 6, 6]
    expect_error(dump(tmp_path, mmsa(train=split)), 'audio_lengths', 'negative sequence length -1')


def test_unknown_name_and_tokenizer(tmp_path):
    path = dump(tmp_path, mmsa())
    expect_error(lambda: load_dataset(path, name='iemocap'), "unknown data set name 'iemocap'")
    expect_error(lambda: load_dataset(path, tokenizer=str(tmp_path / 'no_tokenizer_here')), 'no_tokenizer_here: no such model folder')


# --- MISA / MMIM ---------------------------------------------------------------------------------------------------

def misa_records(n=5, dv=47, da=74, seed=0):
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        L = 3 + i
        words = [f'word{k}' for k in range(L - 1)] + ['good']
        records.append(((np.arange(L), rng.standard_normal((L, dv)), rng.standard_normal((L, da)), np.array(words)),
                        np.array([[0.4 * i - 1]]), f'vid{i}[{i}]'))
    return records


def write_misa(folder, files=('train.pkl', 'dev.pkl', 'test.pkl'), **kw):
    folder.mkdir(parents=True, exist_ok=True)
    for f in files: (folder / f).write_bytes(pickle.dumps(misa_records(**kw), protocol=2))
    return folder


def test_misa_directory(tmp_path):
    dataset = load_dataset(write_misa(tmp_path / 'MOSEI'))
    assert (dataset.format, dataset.name, dataset.dims) == ('misa', 'mosei', {'vision': 47, 'audio': 74})
    train = dataset['train']
    assert train.raw_text[0] == 'word0 word1 good' and train.ids[2] == 'vid2[2]'
    assert train.vision_lengths.tolist() == [3, 4, 5, 6, 7] and train.vision.shape == (5, 7, 47)
    assert not train.vision[0, 3:].any() and train.vision[0, 2].abs().sum() > 0
    assert torch.allclose(train.labels, torch.tensor([-1, -0.6, -0.2, 0.2, 0.6]))
    assert load_dataset(write_misa(tmp_path / 'other')).name == 'mosi'  # small and unnamed: MOSI-sized


def test_misa_single_split_file(tmp_path):
    folder = write_misa(tmp_path / 'mosi', files=('dev.pkl',))
    dataset = load_dataset(folder / 'dev.pkl')
    assert list(dataset.splits) == ['valid'] and dataset.name == 'mosi'


def test_misa_missing_split_file(tmp_path):
    expect_error(write_misa(tmp_path / 'mosi', files=('train.pkl', 'test.pkl')), 'missing split file dev.pkl')


def test_misa_bad_records(tmp_path):
    records = misa_records()
    records[1] = (records[1][0][:2], records[1][1], records[1][2])
    expect_error(dump(tmp_path, records, 'train.pkl'), 'train.pkl', 'record 1 is not ((word_ids, visual, acoustic, words), label, id)')
    records = misa_records()
    (w, v, a, t), y, s = records[2]
    records[2] = ((w, v[:, :40], a, t), y, s)
    expect_error(dump(tmp_path, records, 'train.pkl'), 'record 2: visual feature size 40 differs from record 0 (47)')
    records = misa_records()
    records[3] = (records[3][0], np.array([[0.1, 0.2]]), records[3][2])
    expect_error(dump(tmp_path, records, 'test.pkl'), 'record 3: label must be a single value')


# --- cleaning ------------------------------------------------------------------------------------------------------

def test_nonfinite_values_replaced_and_counted(tmp_path):
    split = mmsa_split(dv=35, da=74)
    split['audio'][0, 0, :3] = -np.inf; split['audio'][1, 2, 5] = np.inf; split['vision'][2, 1, 1] = np.nan
    data = {'train': split, 'valid': mmsa_split(dv=35, da=74), 'test': mmsa_split(dv=35, da=74)}
    dataset = load_dataset(dump(tmp_path, data))
    assert dataset.name == 'mosei'
    summary = json.loads(json.dumps(dataset.summary()))
    assert summary['splits']['train']['audio']['inf_replaced'] == 4
    assert summary['splits']['train']['vision']['nan_replaced'] == 1
    assert summary['splits']['valid']['audio']['inf_replaced'] == 0
    assert torch.isfinite(dataset['train'].audio).all() and dataset['train'].audio[0, 0, 0] == 0


def padded_split(side):
    "Three clips of lengths 2, 4, 0 in a T=5 array, padded on `side`; feature value = frame number + 1."
    split = mmsa_split(n=3, T=5)
    for m, dim in (('vision', 20), ('audio', 5)):
        x = np.zeros((3, 5, dim), np.float32)
        for i, length in enumerate((2, 4, 0)):
            frames = np.arange(1, length + 1, dtype=np.float32)[:, None].repeat(dim, 1)
            if length: x[i, :length] = frames if side == 'right' else 0
            if length and side == 'left': x[i, 5 - length:] = frames
        split[m], split[f'{m}_lengths'] = x, np.array([2, 4, 0])
    return split


@pytest.mark.parametrize('side', ['left', 'right'])
def test_padding_side_and_zero_lengths(tmp_path, side):
    data = {s: padded_split(side) for s in ('train', 'valid', 'test')}
    dataset = load_dataset(dump(tmp_path, data))
    train = dataset['train']
    assert train.vision_lengths.tolist() == [1 + 1, 4, 1] and train.audio_lengths.tolist() == [2, 4, 1]
    assert train.vision[0, :, 0].tolist() == [1, 2, 0, 0, 0]
    assert train.audio[1, :, 0].tolist() == [1, 2, 3, 4, 0]
    assert not train.vision[2].any()
    report = dataset.summary()['splits']['train']['vision']
    assert report['padding'] == side and report['zero_length'] == 1
    # a clip with no frames must go through an LSTM with packing
    batch = next(iter(make_loader(train, batch_size=3)))
    lstm = torch.nn.LSTM(20, 4, batch_first=True)
    packed = torch.nn.utils.rnn.pack_padded_sequence(batch['vision'], batch['vision_lengths'], batch_first=True,
                                                     enforce_sorted=False)
    lstm(packed)


def test_lengths_inferred_when_absent_and_clipped_when_too_long(tmp_path):
    data = {s: padded_split('left') for s in ('train', 'valid', 'test')}
    for split in data.values():
        del split['vision_lengths']
        split['audio_lengths'] = np.array([2, 9, 0])
    # the 9 is longer than the sequence: clipped to T and counted; clip 1 of audio is then full length
    dataset = load_dataset(dump(tmp_path, data, 'aligned_50.pkl'))
    train = dataset['train']
    assert train.vision_lengths.tolist() == [2, 4, 1] and train.vision[1, :, 0].tolist() == [1, 2, 3, 4, 0]
    report = dataset.summary()['splits']['train']
    assert report['vision']['lengths_inferred'] and report['audio']['lengths_clipped'] == 1
    assert train.audio_lengths.tolist() == [2, 5, 1]


def test_normalise_padding_overlapping_shift():
    x = np.zeros((1, 5, 1), np.float32); x[0, 1:, 0] = [1, 2, 3, 4]
    x2 = np.zeros((1, 5, 1), np.float32); x2[0, 3:, 0] = [7, 8]  # evidence clip: clearly left-padded
    both = np.concatenate([x, x2])
    lengths, report = normalise_padding(both, [4, 2], 'test')
    assert report['padding'] == 'left' and both[0, :, 0].tolist() == [1, 2, 3, 4, 0]


# --- batching and tokenisation -------------------------------------------------------------------------------------

class CountingTokenizer:
    "Wraps a tokenizer and counts calls, to show text is tokenised once at load time."
    def __init__(self, inner): self.inner, self.calls = inner, 0
    def __call__(self, *args, **kw):
        self.calls += 1
        return self.inner(*args, **kw)


def test_text_tokenised_once_with_any_tokenizer(tmp_path):
    tok = CountingTokenizer(get_tokenizer(None))
    dataset = load_dataset(dump(tmp_path, mmsa()), tokenizer=tok, max_text_len=5)
    assert tok.calls == 3 and dataset['train'].input_ids.shape == (4, 5)
    for _ in range(2):
        for batch in make_loader(dataset['train'], batch_size=3, shuffle=True): pass
    assert tok.calls == 3
    assert dataset['train'].input_ids[0, 0].item() == get_tokenizer(None).cls_token_id


def test_loader_shapes_and_batch_of_one():
    dataset = load_dataset()
    train = dataset['train']
    batches = list(make_loader(train, batch_size=1))
    assert len(batches) == len(train)
    first = batches[0]
    assert first['vision'].shape == (1, train.vision_lengths[0].item(), 20)
    assert first['input_ids'].shape == (1, train.attention_mask[0].sum().item())
    assert first['labels'].dtype == torch.float32 and first['index'].tolist() == [0]
    big = next(iter(make_loader(train, batch_size=64, shuffle=True, seed=3)))
    assert big['audio'].shape[1] == big['audio_lengths'].max() and big['vision_lengths'].min() >= 1
    assert torch.equal(big['index'], next(iter(make_loader(train, 64, shuffle=True, seed=3)))['index'])
    assert len(list(make_loader(train, 100, drop_last=True))) == len(train) // 100


def test_loader_with_workers_and_pinning():
    dataset = load_dataset(None)
    loader = make_loader(dataset['valid'], batch_size=50, num_workers=2, pin_memory=torch.cuda.is_available())
    indices = torch.cat([b['index'] for b in loader])
    assert sorted(indices.tolist()) == list(range(len(dataset['valid'])))


# --- the embedded default ------------------------------------------------------------------------------------------

def test_default_is_deterministic_and_round_trips(tmp_path):
    path = write_mmsa(make_default(n_clips=120, seed=5), tmp_path / 'synth.pkl')
    from_file, in_memory = load_dataset(path), load_dataset()
    assert (from_file.name, from_file.format, in_memory.format) == ('default', 'mmsa', 'default')
    again = make_default(n_clips=120, seed=5)
    assert list(again['test']['raw_text']) == from_file['test'].raw_text
    assert np.array_equal(again['train']['vision'], from_file['train'].vision.numpy())
    assert list(from_file['train'].extras['noise']) == list(again['train']['noise'])


@pytest.mark.parametrize('intra,inter', [(0.0, 0.0), (0.5, 0.25)])
def test_default_noise_fractions(intra, inter):
    data = make_default(n_clips=300, seed=2, intra_noise=intra, inter_noise=inter)
    for split in ('train', 'valid', 'test'):
        kinds = [k.split('_')[0] for k in data[split]['noise']]
        n = len(kinds)
        assert kinds.count('intra') == round(intra * n) and kinds.count('inter') == round(inter * n)


def test_default_rejects_impossible_noise():
    expect_error(lambda: make_default(intra_noise=0.8, inter_noise=0.4), 'noise fractions')


def test_moved_names_stay_importable_from_data():
    "make_default moved to thne_nb.synthetic and tokenizer lookup to thne_nb.encoding; the old names still work."
    import subprocess, sys
    from thne_nb import data, encoding, synthetic
    assert data.make_default is synthetic.make_default and data.plot_dataset is synthetic.plot_dataset
    assert data.SIGNAL_ENVELOPE == synthetic.SIGNAL_ENVELOPE
    assert data.get_tokenizer(None) is encoding.get_tokenizer() is encoding.get_tokenizer('minilm')
    assert data.minilm_path() == encoding.embedded_model_dir() == encoding.minilm_path()
    # reading arrays must not pull in transformers: the text model is only looked up when text is tokenised
    code = 'import sys, thne_nb.data, thne_nb.synthetic; print("transformers" in sys.modules)'
    assert subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout.strip() == 'False'
