"""Property-based fuzzing of every reader behind the `thne` command: damaged and hostile MMSA pickles, MISA records,
run folders with one file damaged, and `--set` values.

The property, for every generated input: `thne` exits 0 with a valid result, or exits 2 with one line on stderr;
it never ends in a traceback, never runs code from a file, and never changes an input file.

Profiles (choose with HYPOTHESIS_PROFILE): `ci` (default, bounded and deterministic; what CI runs) and `long`
(random, 20x more cases, for a night: `HYPOTHESIS_PROFILE=long python -m pytest tests/test_fuzz.py`).
"""
import hashlib, json, os, pickle, random, shutil, subprocess

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings, strategies as st

from thne_nb.data import ThneError, make_default, write_mmsa
from thne_nb.model import Config, get_config
from conftest import thne

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                                     HealthCheck.data_too_large, HealthCheck.filter_too_much])
settings.register_profile('ci', max_examples=60, derandomize=True, database=None, **_COMMON)
settings.register_profile('long', max_examples=1200, **_COMMON)
settings.load_profile(os.environ.get('HYPOTHESIS_PROFILE', 'ci'))


# ---------------------------------------------------------------- the property


def digest(path):
    "A hash of a file, or of every file under a folder (names and bytes), to prove inputs are not changed."
    path = os.fspath(path)
    h = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    for name in files:
        h.update(os.path.relpath(name, path).encode())
        with open(name, 'rb') as f: h.update(f.read())
    return h.hexdigest()


def assert_contract(status, out, err):
    "Exit 0, or exit 2 with exactly one line `thne: error: ...`; never a traceback."
    assert 'Traceback' not in err, err
    assert status in (0, 2), (status, err)
    event(f'exit {status}')
    if status == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith('thne: error: '), err


# ---------------------------------------------------------------- hostile payloads
class Payload:
    "Pickles as a call to a function that would create MARKER; loading must refuse it before the call."
    def __init__(self, marker, how):
        self.marker, self.how = marker, how

    def __reduce__(self):
        command = f'touch {self.marker}'
        if self.how == 'os.system': return (os.system, (command,))
        if self.how == 'subprocess': return (subprocess.call, (['touch', str(self.marker)],))
        if self.how == 'eval': return (eval, (f"open({str(self.marker)!r}, 'w').close()",))
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


HOW = st.sampled_from(['os.system', 'subprocess', 'eval', 'exec'])


# ---------------------------------------------------------------- MMSA dicts
def mmsa_split(n=3, T=4, dv=3, da=2, seed=0):
    rng = np.random.default_rng(seed)
    return {'raw_text': np.array([f'clip {i} was fine' for i in range(n)], dtype=object),
            'vision': rng.standard_normal((n, T, dv)).astype(np.float32),
            'audio': rng.standard_normal((n, T, da)).astype(np.float32),
            'vision_lengths': np.full(n, T), 'audio_lengths': np.full(n, T),
            'regression_labels': np.linspace(-1, 1, n).astype(np.float32),
            'id': np.array([f'v{i}' for i in range(n)], dtype=object)}


hostile_values = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8), st.binary(max_size=8),
    st.sampled_from(['\ud800 lone surrogate', b'\xff\xfe not utf-8', 'x' * 2000]),
    st.lists(st.one_of(st.integers(), st.text(max_size=3), st.floats()), max_size=4),
    st.lists(st.lists(st.floats(), max_size=3), max_size=3),  # ragged rows
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.builds(lambda shape, dtype, fill: np.full(shape, fill).astype(dtype, casting='unsafe') if dtype != 'U3'
              else np.full(shape, 'abc'),
              st.lists(st.integers(0, 4), min_size=0, max_size=4).map(tuple),
              st.sampled_from(['float32', 'float64', 'int64', 'bool', 'complex64', 'U3', 'object', 'float16']),
              st.sampled_from([0.0, 1.0, -5.0, np.nan, np.inf, -np.inf, 1e30])),
)

MMSA_KEYS = ['raw_text', 'vision', 'audio', 'vision_lengths', 'audio_lengths', 'regression_labels', 'id', 'text_bert']


@st.composite
def damaged_mmsa(draw):
    n = draw(st.integers(1, 4))
    data = {s: mmsa_split(n=n, seed=i) for i, s in enumerate(('train', 'valid', 'test'))}
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(['replace', 'delete', 'nonfinite', 'rows', 'top', 'text']))
        split = data[draw(st.sampled_from(['train', 'valid', 'test']))]
        key = draw(st.sampled_from(MMSA_KEYS))
        if not isinstance(split, dict): continue
        if kind == 'replace': split[key] = draw(hostile_values)
        elif kind == 'delete': split.pop(key, None)
        elif kind == 'nonfinite' and isinstance(split.get('vision'), np.ndarray) and split['vision'].size:
            split['vision'].flat[draw(st.integers(0, split['vision'].size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf, 3e38]))
        elif kind == 'rows' and isinstance(split.get(key), np.ndarray) and split[key].ndim:
            split[key] = split[key][:draw(st.integers(0, len(split[key])))]
        elif kind == 'text': split['raw_text'] = np.array([draw(st.text(max_size=30))] * n, dtype=object)
        elif kind == 'top':
            victim = draw(st.sampled_from(['train', 'valid', 'test']))
            data[victim] = draw(st.one_of(hostile_values, st.just({})))
    return data


@given(data=damaged_mmsa())
def test_damaged_mmsa_pickles(data, tmp_path_factory):
    path = tmp_path_factory.mktemp('mmsa') / 'unaligned_50.pkl'
    path.write_bytes(pickle.dumps(data, protocol=4))
    before = digest(path)
    status, out, err = thne('data', 'inspect', path)
    assert_contract(status, out, err)
    if status == 0:
        summary = json.loads(out)
        assert set(summary['splits']) == {'train', 'valid', 'test'} and all(v >= 1 for v in summary['dims'].values())
    assert digest(path) == before


@given(cut=st.floats(0, 1), flips=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)), max_size=4),
       protocol=st.sampled_from([2, 4, 5]))
def test_truncated_and_bit_flipped_pickles(cut, flips, protocol, tmp_path_factory):
    raw = bytearray(pickle.dumps({s: mmsa_split(seed=i) for i, s in enumerate(('train', 'valid', 'test'))}, protocol=protocol))
    raw = raw[:max(0, int(len(raw) * cut)) if cut < 1 else len(raw)]
    for where, xor in flips:
        if raw: raw[min(len(raw) - 1, int(where * len(raw)))] ^= xor
    path = tmp_path_factory.mktemp('bytes') / 'unaligned_50.pkl'
    path.write_bytes(bytes(raw))
    before = digest(path)
    assert_contract(*thne('data', 'inspect', path))
    assert digest(path) == before


@given(how=HOW, where=st.sampled_from(['top', 'split', 'array', 'record', 'words']))
def test_hostile_pickles_never_run(how, where, tmp_path_factory):
    folder = tmp_path_factory.mktemp('hostile')
    marker = folder / 'payload_ran'
    evil = Payload(marker, how)
    if where == 'top': obj = evil
    elif where == 'split': obj = {'train': evil, 'valid': mmsa_split(), 'test': mmsa_split()}
    elif where == 'array': obj = {'train': {**mmsa_split(), 'vision': evil}, 'valid': mmsa_split(), 'test': mmsa_split()}
    elif where == 'record': obj = [misa_record(), ((np.zeros(2), evil, np.zeros((2, 3)), ['a', 'b']), [[0.5]], 'v1')]
    else: obj = [((np.zeros(2), np.ones((2, 4)), np.ones((2, 3)), ['a', evil]), [[0.5]], 'v1')]
    path = folder / 'test.pkl'
    path.write_bytes(pickle.dumps(obj, protocol=4))
    status, out, err = thne('data', 'inspect', path)
    assert_contract(status, out, err)
    assert status == 2 and 'refused to unpickle' in err and not marker.exists()


# ---------------------------------------------------------------- MISA records
def misa_record(L=2, dv=4, da=3, label=0.5, words=('a', 'b'), i=0):
    return ((np.arange(L), np.ones((L, dv), np.float32), np.ones((L, da), np.float32), list(words)[:L] or ['x']),
            np.array([[label]]), f'video[{i}]')


@st.composite
def damaged_misa(draw):
    records = [misa_record(L=draw(st.integers(1, 3)), i=i) for i in range(draw(st.integers(1, 4)))]
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, len(records) - 1))
        if not (isinstance(records[i], tuple) and len(records[i]) == 3 and len(records[i][0]) == 4): continue
        (ids, v, a, words), label, segment = records[i]
        part = draw(st.sampled_from(['visual', 'acoustic', 'label', 'words', 'segment', 'shape', 'record', 'empty']))
        value = draw(hostile_values)
        if part == 'visual': v = value
        elif part == 'acoustic': a = value
        elif part == 'label': label = value
        elif part == 'words': words = draw(st.one_of(st.lists(st.one_of(st.text(max_size=5), st.binary(max_size=5)), max_size=3),
                                                     st.just(['\ud800']), st.just([b'\xff\xfe']), hostile_values))
        elif part == 'segment': segment = value
        elif part == 'empty': v, a, words = np.array([]), np.zeros((0, 3), np.float32), []
        elif part == 'shape': v = np.ones((len(v) if hasattr(v, '__len__') else 1, draw(st.integers(0, 6))), np.float32)
        records[i] = value if part == 'record' else ((ids, v, a, words), label, segment)
    return records


@given(records=damaged_misa(), as_folder=st.booleans())
def test_damaged_misa_records(records, as_folder, tmp_path_factory):
    folder = tmp_path_factory.mktemp('misa')
    if as_folder:
        for name in ('train.pkl', 'dev.pkl', 'test.pkl'): (folder / name).write_bytes(pickle.dumps(records, protocol=4))
        target = folder
    else:
        target = folder / 'test.pkl'
        target.write_bytes(pickle.dumps(records, protocol=4))
    before = digest(folder)
    status, out, err = thne('data', 'inspect', target)
    assert_contract(status, out, err)
    if status == 0: assert json.loads(out)['format'] == 'misa'
    assert digest(folder) == before


def test_empty_first_misa_record_is_like_any_other(tmp_path):
    "An empty record is accepted wherever it is, first or later."
    empty = ((np.array([]), np.array([]), np.array([]), []), np.array([[0.0]]), 'empty[0]')
    for order in ([empty, misa_record(), misa_record(i=1)], [misa_record(), empty, misa_record(i=1)]):
        path = tmp_path / 'test.pkl'
        path.write_bytes(pickle.dumps(order, protocol=4))
        status, out, err = thne('data', 'inspect', path)
        assert status == 0, err
        split = json.loads(out)['splits']['test']
        assert split['count'] == 3 and split['vision']['dim'] == 4 and split['vision']['zero_length'] == 1


# ---------------------------------------------------------------- run folders
@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
    "A finished 1-epoch tiny run on 40 synthetic clips, and its data file."
    root = tmp_path_factory.mktemp('fuzz_run')
    data = root / 'small.pkl'
    write_mmsa(make_default(n_clips=40, seed=0), data)
    run = root / 'run'
    status, _, err = thne('train', '--config', 'tiny', '--data', data, '--seeds', '1111', '--device', 'cpu', '--quiet',
                          '--epochs', '1', '--out', run)
    assert status == 0, err
    return run, data


RUN_FILES = ['config.json', 'metrics.json', 'history.csv', 'seed_1111/best.pt', 'seed_1111/last.pt',
             'seed_1111/metrics.json', 'seed_1111/test_predictions.csv']


def json_damage(rng, obj):
    "One edit to a JSON value: a key removed, a value of another type, an edited size, or not an object at all."
    kind = rng.choice(['not_object', 'delete', 'retype', 'size', 'nested'])
    if kind == 'not_object' or not isinstance(obj, dict) or not obj:
        return rng.choice([[1, 2], 'text', 7, None, [obj]])
    key = rng.choice(sorted(obj))
    if kind == 'delete': obj.pop(key)
    elif kind == 'retype': obj[key] = rng.choice([None, True, -5, 10**6, 'x', [1], {}, float('nan'), 1e308])
    elif kind == 'size':
        for name in ('hidden_v', 'hidden_a', 'd_fusion', 'vision', 'audio'):
            if name in obj: obj[name] = rng.randint(-1, 64)
        if isinstance(obj.get('dims'), dict): obj['dims'] = {k: rng.randint(-1, 64) for k in obj['dims']}
    else: obj[key] = {'seeds': {'x': 1}, 'dims': 'nope'}
    return obj


@st.composite
def damage(draw):
    "(relative file, function(path) that damages it) for one file of a run folder."
    name = draw(st.sampled_from(RUN_FILES))
    kind = draw(st.sampled_from(['truncate', 'empty', 'garbage', 'json', 'foreign', 'hostile', 'resized', 'delete']))
    cut, garbage, how = draw(st.floats(0, 0.99)), draw(st.binary(min_size=1, max_size=64)), draw(HOW)
    edit = draw(st.integers(0, 2**16))

    def apply(path):
        if kind == 'truncate': path.write_bytes(path.read_bytes()[:int(path.stat().st_size * cut)])
        elif kind == 'empty': path.write_bytes(b'')
        elif kind == 'garbage': path.write_bytes(garbage)
        elif kind == 'delete': path.unlink()
        elif kind == 'json' and path.suffix == '.json':
            path.write_text(json.dumps(json_damage(random.Random(edit), json.loads(path.read_text()))))
        elif kind == 'foreign' and path.suffix == '.pt': torch.save({'weights': torch.zeros(3), 'epoch': 'x'}, path)
        elif kind == 'hostile' and path.suffix == '.pt':
            torch.save({'model': Payload(path.parent.parent.parent / 'payload_ran', how)}, path)
        elif kind == 'resized' and path.suffix == '.pt':
            state = torch.load(path, weights_only=True)
            weights = state['model'] if 'model' in state else state
            key = sorted(weights)[edit % len(weights)]
            weights[key] = torch.zeros(*(s + 1 for s in weights[key].shape))
            torch.save(state, path)
        else: path.write_bytes(garbage)
    return name, kind, apply


def damaged_copy(finished_run, tmp_path_factory, name, apply):
    run, data = finished_run
    root = tmp_path_factory.mktemp('damaged')
    copy = root / 'run'
    shutil.copytree(run, copy)
    apply(copy / name)
    return copy, data, root


@settings(max_examples=max(5, settings().max_examples // 3))
@given(damaged=damage())
def test_damaged_run_folder_eval(damaged, finished_run, tmp_path_factory):
    name, kind, apply = damaged
    event(f'{name} {kind}')
    copy, data, root = damaged_copy(finished_run, tmp_path_factory, name, apply)
    before = digest(copy)
    status, out, err = thne('eval', copy, '--data', data, '--device', 'cpu')
    assert_contract(status, out, err)
    if status == 0: assert 'MAE' in out
    assert digest(copy) == before and not (root / 'payload_ran').exists()


@settings(max_examples=max(4, settings().max_examples // 10))
@given(damaged=damage())
def test_damaged_run_folder_resume(damaged, finished_run, tmp_path_factory):
    "A resumed training on a damaged folder repairs what it can rebuild, or stops with one line and changes nothing."
    name, kind, apply = damaged
    event(f'{name} {kind}')
    copy, data, root = damaged_copy(finished_run, tmp_path_factory, name, apply)
    before = digest(copy)
    status, out, err = thne('train', '--config', 'tiny', '--data', data, '--seeds', '1111', '--device', 'cpu', '--quiet',
                            '--epochs', '1', '--out', copy)
    assert_contract(status, out, err)
    if status == 2: assert digest(copy) == before, 'a refused resume changed the run folder'
    else: assert thne('eval', copy, '--data', data, '--device', 'cpu')[0] == 0
    assert not (root / 'payload_ran').exists()


# ---------------------------------------------------------------- --set values
def field_values():
    return st.one_of(st.text(max_size=12), st.sampled_from(['nan', 'inf', '-inf', '1e309', '-1', '0', '1', '2**40', 'true',
                                                            'none', '1,2', '(3, -4)', '4294967296', '1e-400', '9' * 30,
                                                            '0x10', ' 7 ', '513', '1_000']),
                     st.integers(-2**40, 2**40).map(str), st.floats().map(repr))


# `model` is chosen with --model (which also picks the model's own config class), so it is left out here
@given(key=st.sampled_from([f for f in Config.__dataclass_fields__ if f != 'model'] + ['no_such_key', '']), value=field_values())
def test_set_values_give_a_usable_config_or_one_line(key, value):
    "Every accepted --set value gives a config that survives config.json (strict JSON) and validates again."
    try: cfg = get_config('tiny').set_from_strings([f'{key}={value}'])
    except ThneError as err:
        assert '\n' not in str(err) and str(err)
        return
    text = json.dumps(cfg.to_dict(), allow_nan=False)
    assert Config.from_dict(json.loads(text)) == cfg


@settings(max_examples=max(5, settings().max_examples // 4))
@given(key=st.sampled_from(['lr_main', 'patience', 'seeds', 'max_text_len', 'dropout', 'batch_size', 'amp', 'epochs']),
       value=field_values())
def test_set_values_on_the_command_line(key, value, tmp_path_factory):
    "Through `thne train`: a bad value is one line before anything is written; the missing data file ends the rest."
    out = tmp_path_factory.mktemp('set') / 'run'
    status, stdout, err = thne('train', '--config', 'tiny', '--data', out.parent / 'missing.pkl', '--quiet', '--out', out,
                               '--set', f'{key}={value}')
    assert_contract(status, stdout, err)
    assert status == 2 and not out.exists()
