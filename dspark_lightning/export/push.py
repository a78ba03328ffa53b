"""``python -m dspark_lightning push DIR --repo_id ORG/NAME``: upload an export directory to the Hugging Face Hub.

One commit through ``huggingface_hub`` (``create_repo`` with ``exist_ok``, ``create_branch`` for a new
``--revision``, ``upload_folder``). The token is whatever ``huggingface_hub`` finds (``HF_TOKEN`` or the ``hf auth
login`` file); this module only checks that one exists and never prints or stores it. ``HF_ENDPOINT`` (read at
call time) or ``--endpoint`` selects another Hub deployment.
"""

from __future__ import annotations

import os
from pathlib import Path

from .common import package_version
from .fileio import PARTIAL_MARK, read_json
from .loading import detect_format

REPO_ID_HELP = "ORG/NAME: letters, digits, '-', '_' or '.', no '--' or '..', at most 96 characters"
_IGNORED_DIRS = (".git", ".cache")


def check_repo_id(repo_id: str) -> None:
    """Raise ``ValueError`` naming ``repo_id`` unless it is a valid ``ORG/NAME`` model repository id."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        if not isinstance(repo_id, str) or repo_id.count("/") != 1:
            raise HFValidationError("expected exactly one '/'")
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f"Invalid --repo_id {repo_id!r}: expected {REPO_ID_HELP} ({e}).") from None


def files_to_upload(folder: Path) -> list[tuple[str, int]]:
    """(relative path, bytes) of every file ``upload_folder`` sends (``.git`` and ``.cache`` are skipped)."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in _IGNORED_DIRS)
        for name in sorted(files):
            path = Path(root) / name
            found.append((path.relative_to(folder).as_posix(), path.stat().st_size))
    return found


def push(
    folder: str,
    *,
    repo_id: str,
    revision: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    dry_run: bool = False,
    endpoint: str | None = None,
) -> str:
    """Upload an export directory (``export``'s ``--out``) to a Hub model repository.

    Args:
        folder: the export directory.
        repo_id: target repository, ``ORG/NAME`` (created if missing).
        revision: branch to commit to (created from main if missing); default ``main``.
        private: create the repository private (an existing repository keeps its visibility).
        commit_message: commit title (default names the layout and the drafter).
        dry_run: only print the operations; needs no token or network.
        endpoint: Hub URL (default ``HF_ENDPOINT`` or huggingface.co).

    Returns:
        The commit URL, or ``"dry-run"``.
    """
    check_repo_id(repo_id)
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"Export directory {folder} does not exist.")
    if PARTIAL_MARK in path.name:
        raise ValueError(f"{folder} is an unfinished export (staging directory); export again and push the result.")
    fmt = detect_format(path)  # refuses directories that are not drafter exports
    config = read_json(path / ("dspark/config.json" if fmt == "attached-subfolder" else "config.json"))
    algorithm = (config.get("drafter") or (config.get("exported_by") or {}).get("drafter") or {}).get("algorithm")
    message = commit_message or (f"Upload {fmt} export of a {algorithm or 'drafter'} "
                                 f"(dspark_lightning {package_version()})")
    files = files_to_upload(path)
    branch = revision or "main"
    total = sum(size for _, size in files)
    plan = [f"create_repo {repo_id} (private={private}, exist_ok=True)"]
    if branch != "main":
        plan.append(f"create_branch {repo_id}@{branch} (exist_ok=True)")
    plan.append(f"upload_folder {path} -> {repo_id}@{branch}: {len(files)} files, {total / 2**20:.2f} MiB, "
                f"commit message {message!r}")
    plan += [f"  {name} ({size} bytes)" for name, size in files]
    if dry_run:
        print("Dry run; would run:\n" + "\n".join(plan))
        return "dry-run"

    from huggingface_hub import HfApi, constants, get_token

    if constants.is_offline_mode():
        raise RuntimeError("HF_HUB_OFFLINE is set: pushing needs the Hub. Unset HF_HUB_OFFLINE (or use --dry_run).")
    token = get_token()
    if not token:
        raise RuntimeError("No Hugging Face token found: set HF_TOKEN or run `hf auth login`, then push again.")
    api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None, token=token)
    # private=None (not False) lets a new repository follow its organisation's default visibility.
    api.create_repo(repo_id, private=True if private else None, exist_ok=True, repo_type="model")
    if branch != "main":
        api.create_branch(repo_id, branch=branch, exist_ok=True, repo_type="model")
    info = api.upload_folder(repo_id=repo_id, folder_path=str(path), revision=branch, commit_message=message,
                             repo_type="model", ignore_patterns=[f"{d}/**" for d in _IGNORED_DIRS])
    print(f"Pushed {len(files)} files ({total / 2**20:.2f} MiB) to {repo_id}@{branch}: {info.commit_url}")
    return info.commit_url
