"""Every python block of a generated model card runs: against a tiny exported cascade or stage, with the
Hub replaced by the local folder, and the plain-diffusers blocks in a process where cdm cannot be imported."""

import re
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
