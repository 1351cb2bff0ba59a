"""Files the suite writes and checks: an atomic write (no reader ever sees half a file) and a file digest."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: Path | str, write: Callable[[str], None]) -> None:
    """Write ``path`` whole or not at all: ``write(tmp)`` fills a temporary file in the same folder, which then
    replaces ``path`` in one ``os.replace``. The file gets the umask's usual mode (mkstemp's 0600 would make a
    shared cache private to its writer); the temporary file is removed if ``write`` fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes_atomic(path: Path | str, data: bytes) -> None:
    """``data`` as the whole content of ``path``, atomically (``write_atomic``)."""
    write_atomic(path, lambda tmp: Path(tmp).write_bytes(data))


def file_sha256(path: Path | str) -> str:
    """The sha256 hex digest of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
