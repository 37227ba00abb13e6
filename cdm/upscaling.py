"""Upscaling any image with one SR stage: load the stage, read the image, tile it through the pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import torch
from cdm_pipelines import SR3Pipeline

from cdm.cascade import Cascade
from cdm.devices import Speed
from cdm.errors import UserError
from cdm.images import UNREADABLE, open_image, to_pil, to_rgb
from cdm.stage_io import CASCADE_FILE, load_stage, resolve_model, stage_info, stage_settings

PHOTO_STAGE = Path(__file__).resolve().parent / "photo_sr4x"  # the shipped 4x photo SR stage


def load_sr_stage(model: str, stage: str | None):
    """An SR3Pipeline from a stage folder or from a cascade (by name, or its first SR stage)."""
    root = resolve_model(model)
    if (root / CASCADE_FILE).is_file():
        cascade = Cascade.from_pretrained(root)
        names = [n for n, p in zip(cascade.names, cascade.pipes) if isinstance(p, SR3Pipeline)]
        name = stage or (names[0] if names else None)
        if name not in names:
            raise UserError(f"--stage={stage}: expected one of the cascade's SR stages {names}")
        k = cascade.names.index(name)
        return cascade.pipes[k], cascade.settings[k]
    pipe = load_stage(root)
    if not isinstance(pipe, SR3Pipeline):
        raise UserError(f"{model} is a {type(pipe).__name__}, not an SR stage")
    return pipe, stage_settings(stage_info(root))


def read_image(path: Path, scale: int | None = None) -> PIL.Image.Image:
    """Open an image file, upright by its EXIF orientation, in its own mode: `upscale` gives the model its
    RGB form (`to_rgb`) and the result the source's grey or alpha back (`as_output_mode`). With `scale`,
    the size is checked from the header (`check_size`) before any pixel is decoded."""
    if path.is_dir():
        raise UserError(f"{path} is a folder: expected an image file")
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        with PIL.Image.open(path) as header:
            if scale is not None:
                check_size(path, header, scale)
        image = open_image({"path": str(path)})
    except UserError:
        raise
    except PIL.Image.DecompressionBombError:
        raise UserError(
            f"{path}: the image header claims more pixels than PIL allows (a decompression bomb?)"
        ) from None
    except UNREADABLE:
        raise UserError(f"{path}: not a readable image (corrupt, or not an image format)") from None
    return image


GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F")


def has_alpha(image: PIL.Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def as_output_mode(result: PIL.Image.Image, source: PIL.Image.Image) -> PIL.Image.Image:
    """Give the RGB result the source's layers back: grey stays grey, and an alpha channel is
    upscaled by bicubic interpolation and re-attached (the model sees the image composited on white)."""
    grey = source.mode in GREY_MODES or (source.mode == "P" and source.palette.mode == "L")
    out = result.convert("L") if grey else result
    if has_alpha(source):
        alpha = source.convert("RGBA" if not grey else "LA").getchannel("A")
        out = out.convert("LA" if grey else "RGBA")
        out.putalpha(alpha.resize(result.size, PIL.Image.BICUBIC))
    return out


MAX_OUTPUT_PIXELS = 8192 * 8192  # the output and the sample are held whole in memory: about 0.8 GB each


def check_size(path, image: PIL.Image.Image, scale: int) -> None:
    """Refuse inputs whose output would not fit in memory (the tiles bound the UNet's memory, not the image's)."""
    if image.width * image.height * scale * scale > MAX_OUTPUT_PIXELS:
        side = int((MAX_OUTPUT_PIXELS / scale**2) ** 0.5)
        raise UserError(
            f"{path}: {image.width}x{image.height} is too large to upscale {scale}x: expected at most "
            f"{side * side} input pixels (e.g. {side}x{side}); crop or split the image first"
        )


DIHEDRAL = [(k, flip) for k in range(4) for flip in (False, True)]  # the 8 rotations and mirror images


def dihedral(x: torch.Tensor, k: int, flip: bool, inverse: bool = False) -> torch.Tensor:
    """Rotate by k quarter turns after an optional left-right flip, or undo that."""
    if inverse:
        x = torch.rot90(x, -k, (-2, -1))
        return x.flip(-1) if flip else x
    return torch.rot90(x.flip(-1) if flip else x, k, (-2, -1))


def upscale(
    pipe,
    image: PIL.Image.Image,
    tile: int | None = None,
    overlap: int | None = None,
    steps: int | None = None,
    noise_level: int | None = None,
    seed: int = 0,
    self_ensemble: bool = False,
    autoguidance_scale: float | None = None,
    speed: Speed | None = None,
    detail_threshold: float | None = None,
) -> PIL.Image.Image:
    """Super-resolve a whole image: one call of the stage's pipeline, as plain diffusers makes it.

    Settings left as `None` are the stage's own (its folder's `call_defaults`), so the result equals
    `pipe(image, generator=torch.Generator().manual_seed(seed))` pixel for pixel. `tile` and `overlap`
    are in input pixels. `self_ensemble` averages the results for the 8 rotations and mirror images of
    the input (as in EDSR's "+" models): 8x the time, a higher PSNR, and a smoother result. `speed` sets
    the UNets' autocast dtype and memory layout (default: `Speed.exact()`, plain diffusers' arithmetic).
    `autoguidance_scale` and `detail_threshold` are the pipeline's call arguments of those names.
    """
    speed = speed or Speed.exact()
    speed.apply(pipe)
    with speed.autocast(pipe.device):
        call = {
            "num_inference_steps": steps,
            "noise_level": noise_level,
            "autoguidance_scale": autoguidance_scale,
            "detail_threshold": detail_threshold,
        }
        return upscale_image(pipe, image, tile, overlap, seed, self_ensemble, call)


def upscale_image(pipe, image, tile, overlap, seed, self_ensemble, call: dict):
    f = pipe.scale_factor
    kwargs = {
        **call,
        "tile_size": None if tile is None else tile * f,
        "tile_overlap": None if overlap is None else overlap * f,
    }
    if tile is None and not pipe.config.call_defaults.get("tile_size"):  # a folder without tiling defaults
        kwargs.update(tile_size=pipe.unet.config.sample_size, tile_overlap=pipe.unet.config.sample_size // 4)
    rgb = to_rgb(image)
    if not self_ensemble:
        out = pipe(rgb, generator=torch.Generator().manual_seed(seed), allow_any_size=True, **kwargs)
        return as_output_mode(out.images[0], image)
    x = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    total = 0
    for k, flip in DIHEDRAL:
        out = pipe(
            dihedral(x, k, flip),
            generator=torch.Generator().manual_seed(seed),
            output_type="pt",
            allow_any_size=True,
            **kwargs,
        ).images
        total = total + dihedral(out.float().cpu(), k, flip, inverse=True)
    return as_output_mode(to_pil(total[0] / len(DIHEDRAL)), image)
