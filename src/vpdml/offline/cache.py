"""Where the offline default keeps what it builds (converted backbone, emoji dataset, npm tarballs)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

CACHE_ENV_VAR = "VPDML_CACHE"


def default_cache_dir() -> Path:
    """Return ``$VPDML_CACHE`` when set, else ``~/.cache/vpdml``.

    The directory is not created here: callers create the sub-folder they write to, so that merely
    asking for the location never touches the file system.
    """
    configured = os.environ.get(CACHE_ENV_VAR)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "vpdml"


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    """Turn an optional user-supplied cache directory into an absolute path."""
    chosen = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    return chosen.resolve()


def built_dataset_dir(
    cache_dir: str | os.PathLike[str] | None, name: str, format_version: int, image_size: int
) -> Path:
    """Where the offline dataset ``name`` built at ``image_size`` px is cached (whether or not it exists yet)."""
    return resolve_cache_dir(cache_dir) / "datasets" / f"{name}-v{format_version}-{image_size}px"


def check_image_size(image_size: object) -> None:
    """The offline builders draw square images of 16 to 1024 px."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 16 <= image_size <= 1024:
        raise ValueError(f"image_size must be an int pixel size in [16, 1024], got {image_size!r}.")


def publish_staged_dir(staging: Path, target: Path, *, replace: bool) -> None:
    """Move a fully built cache entry from ``staging`` into place at ``target``.

    Another process (a second test worker, a benchmark beside the demo) may have published the same entry while
    this one was building: its copy is kept unless ``replace`` (a forced rebuild, or an outdated entry).
    """
    if target.exists():
        if not replace:
            return
        shutil.rmtree(target, ignore_errors=True)
    try:
        staging.rename(target)
    except OSError:
        if not target.exists():  # lost the race to a concurrent publisher: theirs is as good as ours
            raise


def save_dataset_build(
    dataset: Any,
    target: Path,
    write_build_info: Callable[[Path], None],
    *,
    info_file: str,
    format_version: int,
    force: bool,
) -> None:
    """Save a built ``datasets.Dataset`` to a sibling staging dir, write its build info there (last, so that an
    interrupted build never looks finished) and publish it at ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        dataset.save_to_disk(str(staging))
        write_build_info(staging)
        publish_staged_dir(
            staging, target, replace=force or not is_complete_build(target, info_file, format_version)
        )
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def is_complete_build(
    target: Path,
    info_file: str,
    format_version: int,
    *,
    version_key: str = "format_version",
    required_files: tuple[str, ...] = (),
) -> bool:
    """Whether ``target`` holds a finished build of this format: ``required_files`` exist and its build-info JSON
    (written last) is readable and records ``format_version`` under ``version_key`` (a stale or half-written cache
    is rebuilt)."""
    info_path = target / info_file
    if not info_path.is_file() or not all((target / name).is_file() for name in required_files):
        return False
    try:
        info = json.loads(info_path.read_text())
    except json.JSONDecodeError:
        return False
    return info.get(version_key) == format_version
