import pytest
import torch
import torch.nn.functional as F

from tessera.nn.resample import bicubic_matrix, bicubic_resample, bicubic_resize
from tessera.registry import build_model


@pytest.mark.parametrize("n_in,n_out", [(1, 16), (2, 16), (3, 16), (5, 16), (13, 16), (6, 17), (16, 10)])
def test_bicubic_matrix_matches_interpolate(n_in, n_out):
    x = torch.randn(3, 4, n_in, n_in)
    expected = F.interpolate(x, size=(n_out, n_out), mode="bicubic", align_corners=False)
    assert torch.allclose(bicubic_resample(x, bicubic_matrix(n_in, n_out)), expected, atol=1e-5)


def test_bicubic_resample_stays_float32_under_autocast():
    x = torch.randn(2, 3, 5, 5)
    with torch.autocast("cpu", torch.bfloat16):
        out = bicubic_resample(x, bicubic_matrix(5, 16))
    assert out.dtype == torch.float32
    assert torch.allclose(out, F.interpolate(x, size=(16, 16), mode="bicubic"), atol=1e-5)


def test_multiscale_upsampling_equals_the_interpolate_path():
    torch.manual_seed(0)
    vq = build_model("multiscale_vq", "small").eval()
    codes = torch.randint(0, vq.config.codebook_size, (2, 3, 3))
    k = vq.scales.index(3)
    h = vq.quantizer.embed(codes)
    expected = vq.phi(k)(F.interpolate(h, size=(vq.side, vq.side), mode="bicubic"))
    assert torch.allclose(vq.upsampled(codes, k), expected, atol=1e-5)
    assert not any(name.startswith("bicubic_") for name in vq.state_dict())  # not saved in checkpoints


def test_bicubic_resize_is_interpolate_and_refuses_non_square_maps():
    x = torch.randn(2, 3, 4, 4)
    assert torch.allclose(bicubic_resize(x, 9), F.interpolate(x, size=(9, 9), mode="bicubic"), atol=1e-5)
    with pytest.raises(ValueError, match="square"):
        bicubic_resize(torch.randn(1, 1, 4, 5), 9)
