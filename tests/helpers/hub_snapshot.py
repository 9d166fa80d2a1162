"""Test helper: lay out files like a Hugging Face Hub cache snapshot, for offline Hub tests.

``huggingface_hub`` (and through it ``PeftModel.from_pretrained``) resolves ``owner/name`` offline
by reading ``<cache>/models--owner--name/refs/<revision>`` (a commit hash) and serving files from
``snapshots/<commit>/``. Real downloads store blobs and symlink them into the snapshot; plain files
are what the cache holds on systems without symlinks, and both are read the same way.

Import it from a test module as ``from helpers.hub_snapshot import make_fake_hub_snapshot`` (pytest puts
``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path


def make_fake_hub_snapshot(
    cache_dir: str | Path,
    repo_id: str,
    files: Mapping[str, bytes | Path],
    *,
    revision: str = "main",
    repo_type: str = "model",
) -> Path:
    """Write ``files`` (repo path -> bytes, or a local file to copy) as a cached snapshot of ``repo_id``.

    The commit hash is derived from the contents, so the same files give the same snapshot folder.
    Returns the snapshot folder ``<cache>/<type>s--owner--name/snapshots/<commit>``.
    """
    contents = {name: data.read_bytes() if isinstance(data, Path) else data for name, data in files.items()}
    commit_hash = _fake_commit_hash(repo_id, contents)

    repo_folder = Path(cache_dir) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snapshot = repo_folder / "snapshots" / commit_hash
    for name, data in contents.items():
        target = snapshot / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)

    ref = repo_folder / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit_hash)  # no trailing newline: huggingface_hub reads the file verbatim
    return snapshot


def _fake_commit_hash(repo_id: str, contents: Mapping[str, bytes]) -> str:
    """40 hex digits, like a git commit id, stable for the same repo and files."""
    digest = hashlib.sha1(repo_id.encode())
    for name in sorted(contents):
        digest.update(name.encode() + b"\0" + contents[name])
    return digest.hexdigest()
