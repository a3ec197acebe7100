"""The chunked LM-head loss (``kernels/chunked.py``, the fp32 torch path of ``linear_cross_entropy``) against the
reference evaluated in fp64: same loss and gradients, ignored targets skipped, a row count that is not a multiple
of the chunk, and no gradient work when none is needed."""

import pytest
import torch

from nanogrow import kernels as K
from nanogrow.kernels import chunked
from nanogrow.kernels import reference as R


def _inputs(n, d, v, seed=0, ignore=()):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g) * 0.3
    t = torch.randint(0, v, (n,), generator=g)
    for i in ignore:
        t[i] = -100
    return h, w, t


@pytest.mark.parametrize("n,v,ignore", [(1100, 8192, ()), (77, 200, (0, 5, 76)), (300, 200, (0, 130, 255, 299)),
                                        (1, 64, ())],
                         ids=["chunks-tail", "small-vocab-ignored", "ignored-across-chunks", "one-row"])
def test_chunked_linear_cross_entropy_matches_the_fp64_reference(n, v, ignore):
    assert chunked.chunk_rows(8192, 24) < 300  # the first and third cases run several chunks
    h, w, t = _inputs(n, 24, v, ignore=ignore)
    hs, ws = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = K.linear_cross_entropy(hs, ws, t, backend="torch")
    (2.5 * loss).backward()
    hd, wd = h.double().requires_grad_(), w.double().requires_grad_()
    ref = R.linear_cross_entropy(hd, wd, t)
    (2.5 * ref).backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(hs.grad.double(), hd.grad, rtol=0, atol=1e-5 * hd.grad.abs().max().item())
    torch.testing.assert_close(ws.grad.double(), wd.grad, rtol=0, atol=1e-5 * wd.grad.abs().max().item())
    for i in ignore:
        assert not hs.grad[i].any()


def test_chunked_path_is_taken_for_fp32_only_and_without_grad_computes_the_loss_alone():
    h, w, t = _inputs(40, 16, 50)
    with torch.no_grad():
        torch.testing.assert_close(K.linear_cross_entropy(h, w, t, backend="torch"), R.linear_cross_entropy(h, w, t))
    hb, wb = h.bfloat16(), w.bfloat16()  # other dtypes take the reference
    assert torch.equal(K.linear_cross_entropy(hb, wb, t, backend="torch"), R.linear_cross_entropy(hb, wb, t))
    ws = w.clone().requires_grad_()  # only the weight needs a gradient (a frozen trunk)
    K.linear_cross_entropy(h, ws, t, backend="torch").backward()
    wd = w.double().requires_grad_()
    R.linear_cross_entropy(h.double(), wd, t).backward()
    torch.testing.assert_close(ws.grad.double(), wd.grad, rtol=0, atol=1e-5 * wd.grad.abs().max().item())
