"""Nothing the user has is lost: --overwrite never deletes inputs or folders cdm did not write, two
inputs never share an output, and two runs never silently replace each other's files."""

import hashlib
import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from conftest import TINY, build_pipeline, make_cascade, run_cli, sr_stage

from cdm.errors import UserError
from cdm.files import write_file
from cdm.stage_io import save_stage


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def fake_run(run: Path) -> Path:
    """A finished training run folder: checkpoints, config, samples and the exported stage."""
    save_stage(build_pipeline(sr_stage(8, 32), TINY, 0), run / "export")
    (run / "checkpoints" / "checkpoint-0000004").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint-0000004" / "trainer.json").write_text('{"step": 4}')
    (run / "config.json").write_text("{}")
    (run / "run_info.json").write_text('{"steps": 4}')
    (run / "samples").mkdir()
    (run / "samples" / "step-0000004.png").write_bytes(b"png")
    return run


@pytest.mark.parametrize(
    "case", ["out-is-the-run", "out-holds-the-run", "out-inside-the-run", "foreign-folder"]
)
def test_export_overwrite_never_deletes_inputs_or_foreign_folders(tmp_path, case):
    parent = tmp_path / "parent"
    run = fake_run(parent / "runA")
    fake_run(parent / "runB")
    (parent / "notes.txt").write_text("mine")
    out = {
        "out-is-the-run": run,
        "out-holds-the-run": parent,
        "out-inside-the-run": run / "export" / "x",
        "foreign-folder": tmp_path / "foreign",
    }[case]
    if case == "foreign-folder":
        out.mkdir()
        (out / "thesis.tex").write_text("years of work")
    before = tree_hashes(tmp_path)
    res = run_cli(["cdm-export", str(run), "--out", str(out), "--overwrite"], tmp_path)
    assert res.returncode == 2, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert str(out) in res.stderr
    assert tree_hashes(tmp_path) == before


def test_export_overwrite_replaces_its_own_earlier_export(tmp_path):
    run = fake_run(tmp_path / "run")
    out = tmp_path / "stage"
    assert run_cli(["cdm-export", str(run), "--out", str(out)], tmp_path).returncode == 0
    assert (out / ".cdm-export.json").is_file()
    res = run_cli(["cdm-export", str(run), "--out", str(out), "--overwrite"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert (out / "model_index.json").is_file() and not list(tmp_path.glob(".stage-*"))


def test_an_exported_folder_used_as_a_stage_does_not_carry_its_marker_into_the_cascade(tmp_path):
    """The marker says cdm-export wrote that folder; a cascade built from it marks only its own root."""
    src = make_cascade(tmp_path / "src", sizes=(8, 32))
    stage = tmp_path / "sr"
    assert run_cli(["cdm-export", str(src / "sr64to256"), "--out", str(stage)], tmp_path).returncode == 0
    assert (stage / ".cdm-export.json").is_file()
    res = run_cli(["cdm-export", str(src / "base64"), str(stage), "--out", str(tmp_path / "c")], tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "c" / ".cdm-export.json").is_file()
    assert sorted(p.parent.name for p in (tmp_path / "c").rglob(".cdm-export.json")) == ["c"]


def test_export_copies_only_the_installed_pipeline_file_and_rewrites_the_class_name(tmp_path):
    stage = save_stage(build_pipeline(sr_stage(8, 32), TINY, 0), tmp_path / "st")
    (stage / "evil.py").write_text("import os; os.system('touch pwned')\n")
    (stage / "pipeline_sr3.py").write_text("raise SystemExit('planted')\n")
    index = json.loads((stage / "model_index.json").read_text())
    index["_class_name"] = ["evil", "SR3Pipeline"]
    (stage / "model_index.json").write_text(json.dumps(index))
    res = run_cli(["cdm-export", str(stage), "--out", str(tmp_path / "out")], tmp_path)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.py")) == ["pipeline_sr3.py"]
    import cdm_pipelines.pipeline_sr3 as installed

    assert (out / "pipeline_sr3.py").read_text() == Path(installed.__file__).read_text()
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == [
        "pipeline_sr3",
        "SR3Pipeline",
    ]


def test_upscale_refuses_two_inputs_that_would_share_an_output(tmp_path):
    stage = save_stage(build_pipeline(sr_stage(8, 32), TINY, 0), tmp_path / "st")
    for sub in ("in", "in2"):
        (tmp_path / sub).mkdir()
        PIL.Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(tmp_path / sub / "a.png")
    res = run_cli(
        [
            "cdm-upscale",
            str(tmp_path / "in" / "a.png"),
            str(tmp_path / "in2" / "a.png"),
            "--model",
            str(stage),
            "--out",
            str(tmp_path / "dup"),
            "--steps",
            "1",
        ],
        tmp_path,
    )
    assert res.returncode == 2 and "same output file" in res.stderr
    assert not (tmp_path / "dup").exists()


def test_a_file_created_by_another_run_meanwhile_is_never_replaced(tmp_path):
    target = tmp_path / "grid.png"

    def slow_save(tmp):
        target.write_text("the other run's grid")  # another process claims the name while we write
        Path(tmp).write_text("ours")

    with pytest.raises(UserError, match="already exists"):
        write_file(target, slow_save, overwrite=False)
    assert target.read_text() == "the other run's grid"
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]  # no temporary file left behind
    with pytest.raises(UserError, match="was not written by cdm"):  # not even with --overwrite
        write_file(target, lambda tmp: Path(tmp).write_text("ours"), overwrite=True)
    assert target.read_text() == "the other run's grid"


def test_generate_writes_complete_files_and_refuses_existing_ones(tmp_path):
    root = make_cascade(tmp_path / "c", sizes=(8, 32))
    args = ["cdm-generate", "--model", str(root), "--class", "0", "--out", str(tmp_path / "s"), "--quiet"]
    assert run_cli(args, tmp_path).returncode == 0
    before = tree_hashes(tmp_path / "s")
    again = run_cli(args, tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr
    assert tree_hashes(tmp_path / "s") == before
    assert [p.name for p in (tmp_path / "s").glob(".*")] == [".cdm-outputs.json"]  # no temporary file


class Planted:
    """A pickle that leaves a file behind if anything ever unpickles it."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "unpickled"))


@pytest.mark.parametrize("planted", ["shard-index", "bin-beside"])
def test_a_pickled_shard_is_refused_before_anything_is_unpickled(tmp_path, planted):
    import pickle

    root = make_cascade(tmp_path / "c", sizes=(8, 32))
    unet = root / "sr64to256" / "unet"
    witness = tmp_path / "PWNED"
    (unet / "evil.bin").write_bytes(pickle.dumps({"conv_in.weight": Planted(witness)}))
    if planted == "shard-index":
        index = {"metadata": {}, "weight_map": {"conv_in.weight": "evil.bin"}}
        (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    res = run_cli(
        ["cdm-generate", "--model", str(root), "--class", "0", "--out", str(tmp_path / "s")], tmp_path
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert "evil.bin" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not witness.exists() and not (tmp_path / "s").exists()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (no image data): a decompression bomb's calling card."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))


@pytest.mark.parametrize("case", ["folder", "bomb", "too-large"])
def test_upscale_bad_images_get_one_line(tmp_path, case):
    stage = save_stage(build_pipeline(sr_stage(8, 32), TINY, 0), tmp_path / "st")
    target = tmp_path / "in.png"
    if case == "folder":
        target.mkdir()
    elif case == "bomb":
        target.write_bytes(png_header_only(100_000, 100_000))
    else:
        PIL.Image.new("RGB", (2100, 2100)).save(target)
    res = run_cli(["cdm-upscale", str(target), "--model", str(stage), "--out", str(tmp_path / "o")], tmp_path)
    assert res.returncode == 2 and str(target) in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert {"folder": "is a folder", "bomb": "decompression bomb", "too-large": "too large"}[
        case
    ] in res.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("device", ["tpu9", "cuda:7"])
def test_an_unavailable_device_is_one_line(tmp_path, device):
    import torch

    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.fail("this check needs a machine with fewer than 8 GPUs")
    res = run_cli(
        ["cdm-generate", "--class", "0", "--device", device, "--out", str(tmp_path / "s")], tmp_path
    )
    assert res.returncode == 2 and f"--device {device}" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "s").exists()


@pytest.mark.parametrize("mode", ["I;16", "F"])
def test_high_bit_depth_grey_images_are_scaled_not_clipped(tmp_path, mode):
    from cdm.images import decode_image

    if mode == "I;16":
        image = PIL.Image.fromarray(np.full((4, 4), 32768, np.uint16))
        path = tmp_path / "grey16.png"
    else:
        image = PIL.Image.fromarray(np.full((4, 4), 0.5, np.float32), mode="F")
        path = tmp_path / "float.tiff"
    image.save(path)
    decoded = np.asarray(decode_image({"path": str(path)}))
    assert decoded.shape == (4, 4, 3) and abs(int(decoded[0, 0, 0]) - 128) <= 1


FULL_DISK = """
import errno, PIL.Image
_save, _calls = PIL.Image.Image.save, [0]
def save(self, fp, *args, **kwargs):  # the disk fills up after {ok} images
    _calls[0] += 1
    if _calls[0] > {ok}:
        raise OSError(errno.ENOSPC, "No space left on device", str(fp))
    return _save(self, fp, *args, **kwargs)
PIL.Image.Image.save = save
"""


def test_a_full_disk_is_one_line_and_leaves_no_partial_output(tmp_path):
    root = make_cascade(tmp_path / "c", sizes=(8, 32))
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FULL_DISK.format(ok=3))
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("the user's")
    res = run_cli(
        ["cdm-generate", "--model", str(root), "--class", "0", "--num-images", "4", "--out", str(out)],
        tmp_path,
        env_extra={"PYTHONPATH": str(site)},
    )
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()  # progress bars of the stages that ran, then the error, last
    assert "Traceback" not in res.stderr and [ln for ln in lines if ln.startswith("error:")] == lines[-1:]
    assert "No space left on device" in lines[-1] and "-32px.png" in lines[-1]  # the final name
    assert sorted(p.name for p in out.rglob("*")) == ["mine.txt"]  # the 3 PNGs written first are gone
