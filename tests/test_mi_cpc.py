"Integration checks for the auxiliary losses of t-HNE (Eq. 5 and Eq. 7) as the model and the trainer use them."
import math, subprocess, sys

import pytest
import torch

from thne_nb.cpc import CPC
from thne_nb.mi import DIMBound, nce_loss


def _auxiliary_losses(bound, cpc, h_t, h_m, fusion):
    return bound(h_t, h_m), cpc(fusion, h_m)


def test_losses_train_the_encoders_that_feed_them():
    # One optimiser step over a stand-in encoder must move it through both auxiliary losses.
    torch.manual_seed(0)
    encoder = torch.nn.Linear(12, 32)
    bound, cpc = DIMBound(768, 32), CPC(128, 32)
    x, h_t, fusion = torch.randn(16, 12), torch.randn(16, 768), torch.randn(16, 128)
    l_tm, l_fm = _auxiliary_losses(bound, cpc, h_t, encoder(x), fusion)
    (l_tm + l_fm).backward()
    assert encoder.weight.grad is not None and encoder.weight.grad.abs().sum() > 0


@pytest.mark.parametrize('include_positive', [True, False])
def test_state_dict_round_trip_with_weights_only(tmp_path, include_positive):
    # Checkpoints are loaded with weights_only=True; both modules must survive it and give the same loss.
    torch.manual_seed(0)
    bound, cpc = DIMBound(768, 32, include_positive=include_positive), CPC(128, 32, include_positive=include_positive)
    torch.save({'bound': bound.state_dict(), 'cpc': cpc.state_dict()}, tmp_path / 'ck.pt')
    state = torch.load(tmp_path / 'ck.pt', weights_only=True)
    torch.manual_seed(1)
    bound2, cpc2 = DIMBound(768, 32, include_positive=include_positive), CPC(128, 32, include_positive=include_positive)
    bound2.load_state_dict(state['bound']); cpc2.load_state_dict(state['cpc'])
    h_t, h_m, fusion = torch.randn(8, 768), torch.randn(8, 32), torch.randn(8, 128)
    assert torch.equal(bound(h_t, h_m), bound2(h_t, h_m))
    assert torch.equal(cpc(fusion, h_m), cpc2(fusion, h_m))


def test_batch_of_one_under_autocast_backpropagates():
    bound, cpc = DIMBound(768, 32), CPC(128, 32)
    h_t = torch.randn(1, 768, requires_grad=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = bound(h_t, torch.randn(1, 32)) + cpc(torch.randn(1, 128), torch.randn(1, 32))
    loss.backward()
    assert loss.item() == 0. and torch.isfinite(h_t.grad).all()


def test_nce_loss_matches_cross_entropy():
    # InfoNCE is cross-entropy with the diagonal as the label; an independent check of the arithmetic.
    logits = torch.randn(10, 10)
    expected = torch.nn.functional.cross_entropy(logits, torch.arange(10))
    assert torch.allclose(nce_loss(logits), expected, atol=1e-6)
    off_diagonal = logits.masked_fill(torch.eye(10, dtype=torch.bool), -math.inf)
    expected_paper = (off_diagonal.logsumexp(1) - logits.diagonal()).mean()
    assert torch.allclose(nce_loss(logits, include_positive=False), expected_paper, atol=1e-6)


def test_importing_the_losses_does_not_import_pyplot():
    code = 'import sys, thne_nb.mi, thne_nb.cpc; assert "matplotlib.pyplot" not in sys.modules'
    subprocess.run([sys.executable, '-c', code], check=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_bfloat16_matches_float32():
    torch.manual_seed(0)
    bound, cpc = DIMBound(768, 32).cuda(), CPC(128, 32).cuda()
    h_t, h_m, fusion = (torch.randn(64, d, device='cuda') for d in (768, 32, 128))
    with torch.autocast('cuda', dtype=torch.bfloat16):
        mixed = _auxiliary_losses(bound, cpc, h_t, h_m, fusion)
    exact = _auxiliary_losses(bound, cpc, h_t, h_m, fusion)
    for m, e in zip(mixed, exact):
        assert m.dtype == torch.float32 and abs(m.item() - e.item()) < 0.05
