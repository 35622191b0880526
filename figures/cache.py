"""Content-addressed on-disk cache for trained weights and spectra.

An entry's key is the SHA-256 of its full configuration written as canonical JSON
(sorted keys, no whitespace): the preset, the seed, the data identity, the model,
the optimizer and a code version all belong in it, so any change to any of them
is a different entry and nothing stale is ever read.

Layout: ``<root>/<key>/`` holds the entry's files, ``config.json`` (the configuration
the key was made from, for humans) and ``COMPLETE`` (the marker).  An entry is built
in a temporary sibling folder and renamed into place with ``os.replace``; the marker
is written last, holding the SHA-256 of every file.  :meth:`Cache.load` reads an entry
only if the marker is present, names the same key and every checksum matches; anything
else (a crash mid-write, a truncated or edited file, a reader that raises) counts as a
miss: the entry is removed and recomputed.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from spectra.checkpoint import atomic_write_bytes as write_atomic

__all__ = ["Cache", "config_key", "canonical_json", "code_version", "MARKER"]

T = TypeVar("T")
MARKER = "COMPLETE"
_CONFIG = "config.json"


def canonical_json(config: Mapping[str, Any]) -> str:
    """``config`` as canonical JSON: sorted keys, compact separators, no NaN."""
    return json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=False)


def config_key(config: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of :func:`canonical_json` of ``config``."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def code_version(sources: Iterable[str | os.PathLike | Any]) -> str:
    """SHA-256 over source code, so editing the code that computes a result changes the
    key of that result (and editing, say, plotting code does not).

    Each item is a file path (its contents; a missing file contributes its name only)
    or a module, class or function (its source text, via ``inspect.getsource``).
    """
    h = hashlib.sha256()
    for item in sources:
        if isinstance(item, str | os.PathLike):
            path = Path(item)
            h.update(path.name.encode())
            if path.is_file():
                h.update(path.read_bytes())
        else:
            h.update(getattr(item, "__qualname__", getattr(item, "__name__", "")).encode())
            h.update(inspect.getsource(item).encode())
    return h.hexdigest()[:16]


class Cache:
    """A folder of content-addressed entries.

    Args:
        root: the cache folder (created on first store).
        enabled: with False, :meth:`get_or_compute` always computes and stores nothing
            (``--no-cache``).
    """

    def __init__(self, root: str | os.PathLike, enabled: bool = True) -> None:
        self.root = Path(root)
        self.enabled = enabled

    def entry_dir(self, key: str) -> Path:
        return self.root / key

    # --- reading ------------------------------------------------------------------
    def is_complete(self, key: str) -> bool:
        """True if the entry exists, its marker names ``key`` and every checksum matches."""
        folder = self.entry_dir(key)
        try:
            marker = json.loads((folder / MARKER).read_text())
            if marker.get("key") != key or not isinstance(marker.get("files"), dict):
                return False
            return all(
                file_sha256(folder / name) == digest for name, digest in marker["files"].items()
            )
        except (OSError, ValueError, AttributeError):
            return False

    def load(self, key: str, reader: Callable[[Path], T]) -> T | None:
        """``reader(entry folder)`` for a complete entry, else None (a broken entry is removed)."""
        folder = self.entry_dir(key)
        if not folder.exists():
            return None
        if self.is_complete(key):
            try:
                return reader(folder)
            except Exception:  # noqa: BLE001 - any unreadable entry is a miss
                pass
        self.remove(key)
        return None

    # --- writing ------------------------------------------------------------------
    def store(self, key: str, config: Mapping[str, Any], writer: Callable[[Path], None]) -> Path:
        """Build an entry: ``writer(tmp folder)`` writes the files, then ``config.json``
        and the checksum marker are added and the folder is renamed to ``<root>/<key>``.

        If a complete entry appeared meanwhile (another process), it is kept and ours is
        discarded; an incomplete one is replaced.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{key[:16]}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            writer(tmp)
            write_atomic(tmp / _CONFIG, json.dumps(config, indent=1, sort_keys=True).encode())
            files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            write_atomic(tmp / MARKER, json.dumps({"key": key, "files": files}).encode())
            final = self.entry_dir(key)
            if final.exists():
                if self.is_complete(key):
                    shutil.rmtree(tmp, ignore_errors=True)
                    return final
                self.remove(key)
            try:
                os.replace(tmp, final)
            except OSError:  # a concurrent writer won the rename
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def remove(self, key: str) -> None:
        """Delete an entry (moved aside first, so a reader never sees half of it)."""
        folder = self.entry_dir(key)
        if not folder.exists():
            return
        trash = self.root / f".trash-{key[:16]}-{uuid.uuid4().hex[:8]}"
        try:
            os.replace(folder, trash)
        except OSError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def get_or_compute(
        self,
        config: Mapping[str, Any],
        compute: Callable[[], T],
        save: Callable[[T, Path], None],
        read: Callable[[Path], T],
    ) -> tuple[T, bool]:
        """The cached value for ``config`` or a freshly computed (and stored) one.

        Returns ``(value, hit)``.  ``save(value, folder)`` writes the files of an entry,
        ``read(folder)`` rebuilds the value from them.
        """
        key = config_key(config)
        if self.enabled:
            value = self.load(key, read)
            if value is not None:
                return value, True
        value = compute()
        if self.enabled:
            self.store(key, config, lambda folder: save(value, folder))
        return value, False
