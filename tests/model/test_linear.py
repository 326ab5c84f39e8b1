"""punica_core.model.linear: every formulation equals F.linear to fp32 rounding."""
import pytest
import torch
import torch.nn.functional as F

from punica_core.model import linear as lin

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (4096, 576), (40, 24)]
ROWS = [0, 1, 2, 3, 4, 5, 8, 17, 64, 130]
HOWS = ["f.linear", "wxt"] + (["onednn"] if lin._DNN is not None else [])


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("shape", SHAPES)
def test_formulations_match_f_linear(how, shape):
    g = torch.Generator().manual_seed(shape[0] + shape[1])
    out_f, in_f = shape
    w = torch.randn(out_f, in_f, generator=g) / in_f ** 0.5
    bias = torch.randn(out_f, generator=g)
    for rows in ROWS:
        x = torch.randn(rows, in_f, generator=g)
        want = F.linear(x.double(), w.double()).float()
        for b in (None, bias):
            ref = F.linear(x, w, b)
            got = lin.linear(x, w, b, how=how)
            assert got.shape == ref.shape and got.dtype == torch.float32
            assert got.is_contiguous()
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
            if rows == 0:
                continue
            exact = want if b is None else want + b
            # no worse than F.linear against a float64 product
            assert (got - exact).abs().max() <= 4 * (ref - exact).abs().max() + 1e-5


def test_default_picks():
    w, wide = torch.randn(960, 576) / 24, torch.randn(576, 1536) / 40
    assert lin.formulation(torch.randn(3, 576), w) == "wxt"
    assert lin.formulation(torch.randn(3, 1536), wide) != "wxt"
    assert lin.formulation(torch.randn(8, 576), w) == ("onednn" if lin._DNN else "f.linear")
    assert lin.formulation(torch.randn(8, 576, dtype=torch.float64), w.double()) == "f.linear"
    assert lin.formulation(torch.randn(8, 576).half(), w.half()) == "f.linear"
    # non-contiguous weights, inputs
    x = torch.randn(576, 8).t()
    torch.testing.assert_close(lin.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    wt = torch.randn(576, 960).t()
    assert lin.formulation(torch.randn(8, 576), wt) == "f.linear"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_is_exactly_f_linear():
    w = torch.randn(960, 576, device="cuda")
    x = torch.randn(8, 576, device="cuda")
    assert lin.formulation(x, w) == "f.linear"
    assert torch.equal(lin.linear(x, w), F.linear(x, w))
