"""Every python block of a generated model card runs: against a tiny exported cascade or stage, with the
Hub replaced by the local folder, and the plain-diffusers blocks in a process where cdm cannot be imported."""

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
from conftest import TINY, build_pipeline, make_cascade, run_cli, sr_stage

from cdm.stage_io import save_stage

SITE = """
import sys, importlib.abc
import huggingface_hub
REPOS = {repos!r}
_real = huggingface_hub.snapshot_download
def snapshot_download(repo_id, *args, **kwargs):  # the Hub, served from local folders
    return REPOS[repo_id] if repo_id in REPOS else _real(repo_id, *args, **kwargs)
huggingface_hub.snapshot_download = snapshot_download
if {block_cdm!r}:
    class NoCdm(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("cdm", "cdm_pipelines"):
                raise ImportError(f"{{name}} is not installed here")
            return None
    sys.meta_path.insert(0, NoCdm())
"""


def python_blocks(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, flags=re.S)


def run_block(code: str, repos: dict, tmp_path, name: str):
    plain = "cdm" not in code.replace("cdm_pipelines", "").replace("trust_remote_code", "")
    site = tmp_path / f"site-{name}"
    site.mkdir()
    repos = {**repos, **{path: path for path in repos.values()}}  # the id is replaced by the path below
    (site / "sitecustomize.py").write_text(SITE.format(repos=repos, block_cdm=plain))
    for repo, path in repos.items():  # from_pretrained("user/x") reads the local folder
        code = code.replace(f'"{repo}"', repr(path))
    env = {"PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"}
    return plain, subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("kind", ["cascade", "sr-stage", "base-stage"])
def test_every_python_block_of_a_generated_card_runs(tmp_path, kind):
    if kind == "cascade":
        sources = [
            str(p)
            for p in (make_cascade(tmp_path / "src", sizes=(8, 32)) / n for n in ("base64", "sr64to256"))
        ]
    elif kind == "sr-stage":
        sources = [str(save_stage(build_pipeline(sr_stage(8, 32), TINY, 0), tmp_path / "sr"))]
    else:
        sources = [str(make_cascade(tmp_path / "src", sizes=(8, 32)) / "base64")]
    out = tmp_path / "published"  # the card names the repo after the folder
    res = run_cli(["cdm-export", *sources, "--out", str(out)], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    card = (out / "README.md").read_text()
    repo = out.name
    PIL.Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(tmp_path / "photo.png")
    blocks = python_blocks(card)
    assert blocks, card
    kinds = []
    for k, code in enumerate(blocks):
        plain, result = run_block(code, {repo: str(out)}, tmp_path, str(k))
        kinds.append(plain)
        assert result.returncode == 0, f"block {k}:\n{code}\n{result.stderr[-2000:]}"
    assert any(kinds)  # at least one plain-diffusers block, run without cdm


@pytest.mark.parametrize("mode", ["non-truncated", "truncated"])
def test_the_cascade_root_loads_as_one_pipeline_without_cdm(tmp_path, mode):
    root = make_cascade(tmp_path / "c", sizes=(8, 32, 128), modes=(mode, mode), levels=(100, 100))
    weights = sorted(p.relative_to(root) for p in root.rglob("*.safetensors"))
    assert all(len(p.parts) > 1 for p in weights)  # every weight file in its stage's folder, none at the root
    code = """
import json, numpy as np, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(ROOT, trust_remote_code=True)
kw = dict(class_labels=[0, "two"], num_images_per_prompt=2, output_type="np")
out = pipe(**kw, generator=torch.Generator().manual_seed(0), return_all_stages=True)
again = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
other = pipe(**kw, generator=torch.Generator().manual_seed(1)).images
print(json.dumps({
    "cls": type(pipe).__name__,
    "shapes": [list(x.shape) for x in out.stage_images],
    "finite": bool(np.isfinite(out.images).all()),
    "same_seed": bool((out.images == again).all()),
    "other_seed": bool((out.images != other).any()),
}))
""".replace("ROOT", repr(str(root)))
    plain, result = run_block(code + "# plain diffusers\n", {}, tmp_path, "root")
    assert plain and result.returncode == 0, result.stderr[-2000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got == {
        "cls": "CDMCascadePipeline",
        "shapes": [[4, 8, 8, 3], [4, 32, 32, 3], [4, 128, 128, 3]],
        "finite": True,
        "same_seed": True,
        "other_seed": True,
    }


NO_CDM_RUN = """
import json, sys, numpy as np, PIL.Image, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(FOLDER, trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
CALL
np.save(OUT, np.asarray(image))
print(type(pipe).__name__)
"""


def plain_diffusers(tmp_path, folder, call: str, name: str) -> np.ndarray:
    """Load `folder` with plain diffusers in a process where cdm cannot be imported, run `call` (which
    sets `image`), and return the image as an array."""
    out = tmp_path / f"{name}.npy"
    code = NO_CDM_RUN.replace("FOLDER", repr(str(folder))).replace("OUT", repr(str(out)))
    plain, result = run_block(code.replace("CALL", call), {}, tmp_path, name)
    assert plain and result.returncode == 0, result.stderr[-2000:]
    return np.load(out)


def test_the_shipped_photo_stage_called_alone_equals_cdm_upscale_pixel_for_pixel(tmp_path):
    from cdm.upscaling import PHOTO_STAGE

    rng = np.random.default_rng(0)
    small = PIL.Image.fromarray(rng.integers(0, 255, (6, 7, 3), dtype=np.uint8))
    small.resize((50, 42), PIL.Image.BICUBIC).save(tmp_path / "in.png")  # not a multiple of the UNet's stride
    for out, flags in (("up", ["--exact"]), ("fast", [])):
        res = run_cli(["cdm-upscale", "in.png", "--seed", "3", "--out", out, *flags], tmp_path)
        assert res.returncode == 0, res.stderr[-2000:]
    cli = np.asarray(PIL.Image.open(tmp_path / "up" / "in-x4.png"))
    fast = np.asarray(PIL.Image.open(tmp_path / "fast" / "in-x4.png")).astype(int)
    call = 'image = pipe(image=PIL.Image.open("in.png").convert("RGB"), generator=torch.Generator().manual_seed(3)).images[0]'
    folder = shutil.copytree(PHOTO_STAGE, tmp_path / "published")  # a path without "cdm" in it
    plain = plain_diffusers(tmp_path, folder, call, "photo")
    assert plain.shape == cli.shape == (168, 200, 3)
    assert np.array_equal(plain, cli)
    # the default's speed settings (channels-last, bf16 where the CPU has it) change rounding only
    diff = np.abs(fast - cli.astype(int))
    assert diff.mean() < 0.5 and np.mean(diff <= 2) > 0.99, (diff.mean(), diff.max())


@pytest.mark.parametrize(
    "flags, call_args",
    [
        ([], ""),
        (["--steps", "3,1", "--noise-level", "0,250"], "num_inference_steps=[3, 1], noise_level=[0, 250]"),
        (["--guidance", "3"], "guidance_scale=3.0"),
    ],
    ids=["defaults", "per-stage", "one-guidance"],
)
def test_the_cascade_root_called_alone_equals_cdm_generate(tmp_path, flags, call_args):
    root = make_cascade(tmp_path / "c", sizes=(8, 32))
    res = run_cli(
        [
            "cdm-generate",
            "--model",
            str(root),
            "--class",
            "1",
            "--seed",
            "4",
            "--out",
            "o",
            "--exact",
            *flags,
        ],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    (png,) = (tmp_path / "o").glob("*-32px.png")
    cli = np.asarray(PIL.Image.open(png))
    call = (
        f"image = pipe(class_labels=[1], generator=torch.Generator().manual_seed(4), {call_args}).images[0]"
    )
    plain = plain_diffusers(tmp_path, root, call, "root")
    assert np.array_equal(plain, cli)
    if flags:  # the settings took effect: they differ from the defaults' image
        default = plain_diffusers(tmp_path, root, call.replace(call_args, ""), "root-default")
        assert not np.array_equal(default, cli)


def test_a_cascade_written_with_the_old_level_key_still_loads(tmp_path):
    from cdm.cascade import Cascade

    root = make_cascade(tmp_path / "c", sizes=(8, 32), levels=(250,))
    for name in ("cascade.json", "model_index.json"):
        path = root / name
        path.write_text(path.read_text().replace('"noise_level"', '"aug_level"'))
    assert '"aug_level": 250' in (root / "cascade.json").read_text()
    assert Cascade.from_pretrained(root).settings[1].noise_level == 250
    call = "image = pipe(class_labels=[0], generator=torch.Generator().manual_seed(0), output_type='np').images[0]"
    old = plain_diffusers(tmp_path, root, call, "old")
    new = plain_diffusers(tmp_path, root, call.replace("output_type", "noise_level=250, output_type"), "new")
    assert np.array_equal(old, new)
