"Integration tests of thne_nb.model: presets, overrides, registry, and a forward pass free of host synchronisation."
import contextlib, importlib, json, subprocess, sys

import pytest
import torch
from torch import nn

from thne_nb.core import ThneError
from thne_nb.model import (Config, THNE, build_model, example_batch, get_config, available_configs, MODELS,
                           architecture_boxes)
from thne_nb.encoding import SequenceEncoder

DIMS = {'vision': 20, 'audio': 5}


class BagOfWordsText(nn.Module):
    "A stand-in text encoder (mean of token embeddings) so that only t-HNE's own code is under test."
    def __init__(self, dim=16):
        super().__init__()
        self.dim, self.embed = dim, nn.Embedding(30522, dim)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        mask = attention_mask.unsqueeze(-1).to(self.embed.weight.dtype)
        return (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1)


def test_table2_presets():
    mosi, mosei = get_config('mosi'), get_config('mosei')
    assert (mosi.batch_size, mosi.lr_main, mosi.alpha, mosi.beta, mosi.hidden_v, mosi.hidden_a) == (32, 1e-3, 0.3, 0.1, 32, 32)
    assert (mosei.batch_size, mosei.lr_main, mosei.alpha, mosei.beta, mosei.hidden_v, mosei.hidden_a) == (64, 5e-4, 0.1, 0.05, 64, 16)
    for cfg in (mosi, mosei):
        assert (cfg.grad_clip, cfg.lr_text, cfg.d_fusion, cfg.text_model) == (5.0, 5e-5, 128, 'bert-base-uncased')
    eq10 = get_config('mosei-eq10')
    assert eq10.residual and eq10.alpha == 0.05


def test_config_json_round_trip_and_overrides():
    cfg = get_config('demo').set_from_strings(['seeds=[1, 2, 3]', 'use_re=off', 'weight_decay=1e-4'])
    assert cfg.seeds == (1, 2, 3) and cfg.use_re is False and cfg.weight_decay == 1e-4
    assert Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ThneError, match='unknown config key'): cfg.replace(colour='red')
    with pytest.raises(ThneError, match='dropout'): cfg.set_from_strings(['dropout=1.5'])


def test_baseline_presets_resolve_lazily():
    if importlib.util.find_spec('thne_nb.baselines') is None: pytest.skip('baselines not installed')
    names = available_configs()
    for name in ('mmim-demo', 'mcen-demo'):
        if name in names:
            cfg = get_config(name)
            assert cfg.model in MODELS and isinstance(Config.from_dict(cfg.to_dict()), type(cfg))


def test_unknown_model_and_bad_dims():
    with pytest.raises(ThneError, match='unknown model'): build_model(Config(model='nope'), DIMS)
    with pytest.raises(ThneError, match='vision'): build_model(get_config('tiny'), {'audio': 5})


def test_config_module_stands_alone_and_model_reexports_it():
    "thne_nb.config never imports the model at load time, yet its registry builds t-HNE on demand."
    code = ("import sys, thne_nb.config as c; assert 'thne_nb.model' not in sys.modules; "
            "m = c.build_model(c.get_config('tiny'), {'vision': 3, 'audio': 4}); print(type(m).__name__)")
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == 'THNE', done.stderr[-2000:]
    from thne_nb import config, model
    for name in ('Config', 'CONFIGS', 'MODELS', 'CHOICES', 'PRESET_NOTES', 'get_config', 'build_model', 'available_configs',
                 'describe_config', 'register_model', 'register_config', 'initialise_parameters', '_config_class', '_load_plugins'):
        assert getattr(model, name) is getattr(config, name), name


def test_architecture_boxes_are_the_submodules():
    for switches in ({}, {'use_deno1': False}, {'use_re': False, 'probe_text': False}, {'residual': True}):
        cfg = get_config('tiny').replace(**switches)
        model = THNE(cfg, DIMS, text_encoder=BagOfWordsText())
        boxes = architecture_boxes(model)
        assert set(boxes) == {n for n, _ in model.named_children()}
        assert f'{16 + cfg.hidden_v + cfg.hidden_a} → F ∈ R^{cfg.d_fusion}' in boxes['fusion']['label']
        if cfg.use_deno1: assert boxes['attend_v']['eq'] == ('Eq. 10' if cfg.residual else 'Eq. 2')


@contextlib.contextmanager
def host_reads_forbidden():
    "Fail on any tensor-to-host read: each one is a device synchronisation on a GPU."
    names = ('item', 'tolist', 'cpu', 'numpy', '__bool__', '__float__', '__int__', '__index__')
    saved = {n: getattr(torch.Tensor, n) for n in names}
    def forbid(name):
        def raise_(*args, **kwargs): raise AssertionError(f'Tensor.{name} called in the forward/backward pass')
        return raise_
    try:
        for n in names: setattr(torch.Tensor, n, forbid(n))
        yield
    finally:
        for n, f in saved.items(): setattr(torch.Tensor, n, f)


@pytest.mark.parametrize('switches', [{}, {'use_deno1': False}, {'residual': True}, {'include_positive': False}])
def test_forward_backward_reads_nothing_back(switches):
    torch.manual_seed(0)
    cfg = get_config('tiny').replace(**switches)
    model = THNE(cfg, DIMS, text_encoder=BagOfWordsText())
    for m in model.modules():
        if isinstance(m, SequenceEncoder): m.packed = False      # the GPU path: lengths never leave the device
    batch = example_batch(DIMS, batch_size=5)
    with host_reads_forbidden():
        out = model(batch)
        out.losses['total'].backward()
    assert torch.isfinite(out.losses['total'])
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_bf16_step_without_synchronisation():
    torch.manual_seed(0)
    model = THNE(get_config('tiny'), DIMS, text_encoder=BagOfWordsText()).cuda()
    batch = {k: v.cuda() for k, v in example_batch(DIMS, batch_size=8).items()}
    reference = THNE(get_config('tiny'), DIMS, text_encoder=BagOfWordsText()).cuda()
    reference.load_state_dict(model.state_dict())
    torch.cuda.set_sync_debug_mode('error')
    try:
        with torch.autocast('cuda', dtype=torch.bfloat16):
            out = model(batch)
        out.losses['total'].backward()
    finally: torch.cuda.set_sync_debug_mode('default')
    assert torch.isfinite(out.losses['total']).all()
    # the masked LSTM path used on CUDA agrees with packing
    for m in reference.modules():
        if isinstance(m, SequenceEncoder): m.packed = True
    with torch.no_grad():
        model.eval(); reference.eval()
        torch.testing.assert_close(model(batch).prediction, reference(batch).prediction, atol=1e-4, rtol=1e-4)
