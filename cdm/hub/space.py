"""A Hugging Face Space for a published cascade: `app.py` runs cdm's Gradio app on the model repo."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

from cdm.errors import UserError
from cdm.files import OutputFolder
from cdm.hub.cards import DISTRIBUTION

APP_PY = '''"""A Gradio Space for the cascade {repo}: cdm's app, generating stage by stage and upscaling photos."""

from cdm.app import build_app

demo = build_app(model={repo!r})
demo.queue(default_concurrency_limit=1)  # one generation at a time on a CPU Space; the rest wait in line

if __name__ == "__main__":
    demo.launch()
'''

PINNED = ("torch", "diffusers", "accelerate", "safetensors", "huggingface_hub", "gradio", "pillow", "numpy")


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            f"writing a Space needs {package} installed: pip install 'cdm-diffusion[app]'"
        ) from None


def space_files(repo: str, title: str) -> dict[str, str]:
    """app.py, requirements.txt (the versions installed here, pinned) and README.md with the Space's YAML."""
    requirements = [f"{DISTRIBUTION}=={version(DISTRIBUTION)}"] + [f"{p}=={version(p)}" for p in PINNED]
    front = {
        "title": title,
        "emoji": "🌀",
        "sdk": "gradio",
        "sdk_version": version("gradio"),
        "app_file": "app.py",
        "models": [repo],
        "pinned": False,
    }
    yaml = "\n".join(f"{k}: {json.dumps(v, ensure_ascii=False)}" for k, v in front.items())
    readme = (
        f"---\n{yaml}\n---\n\n# {title}\n\nGenerate with the cascade [{repo}](https://huggingface.co/{repo}), "
        "every stage's output as it arrives, and upscale a photo 4x against bicubic. The app is "
        "`cdm.app.build_app`; it runs one request at a time and queues the rest.\n"
    )
    return {
        "app.py": APP_PY.format(repo=repo),
        "requirements.txt": "\n".join(requirements) + "\n",
        "README.md": readme,
    }


SPACE_FILES = ("app.py", "requirements.txt", "README.md")


def check_space(out: Path, overwrite: bool) -> OutputFolder:
    """Before any work: the Space folder may exist, but its files only with `overwrite` (and only files
    cdm wrote there)."""
    writer = OutputFolder(out, overwrite, flag="--space")
    writer.plan([out / name for name in SPACE_FILES])
    return writer


def write_space(out: Path, repo: str, overwrite: bool) -> list[Path]:
    """Write the Space folder through one `OutputFolder`."""
    files = space_files(repo, title=f"{repo.split('/')[-1]} (cdm)")
    targets = [out / name for name in files]
    with check_space(out, overwrite) as writer:
        for target, text in zip(targets, files.values()):
            writer.write(target, lambda tmp, text=text: tmp.write_text(text))
    return targets
