"""Publishing a cascade or stage folder to the Hugging Face Hub: the files a repo should hold, nothing else."""

from __future__ import annotations

from pathlib import Path

from cdm.errors import UserError
from cdm.stage_io import HUB_FILES

NEVER_UPLOAD = [
    ".cdm-export.json",
    "*.pkl",
    "*.pickle",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "checkpoints/*",
    "**/checkpoints/*",
    "logs/*",
    "**/.tmp-*",
]


def push_to_hub(folder: Path, repo_id: str, private: bool = False, token: str | None = None, api=None) -> str:
    """Create the repo if needed and upload the folder: safetensors, JSON, the card, images, pipeline files."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    try:
        api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            allow_patterns=HUB_FILES,
            ignore_patterns=NEVER_UPLOAD,
            commit_message="Upload cascade with cdm",
        )
    except Exception as err:
        if not is_hub_error(err):
            raise
        reason = " ".join(str(err).split()) or type(err).__name__
        raise UserError(
            f"--push-to-hub {repo_id}: the Hub refused or could not be reached: {reason} "
            f"(the folder {folder} is complete; push it again later)"
        ) from None
    return str(getattr(info, "commit_url", info))


def is_hub_error(err: Exception) -> bool:
    """Network, offline-mode and Hub HTTP errors: faults of the connection or the account, not of cdm."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    network = type(err).__module__.split(".")[0] in {"httpx", "httpx2", "httpcore", "requests", "urllib3"}
    return network or isinstance(err, (HfHubHTTPError, OfflineModeIsEnabled, ConnectionError, TimeoutError))
