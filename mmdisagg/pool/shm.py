"""Named POSIX shared-memory segments for pools a same-host peer writes into.

We do not use ``multiprocessing.shared_memory``: before Python 3.13 every process that attaches
registers the segment with its resource tracker, which unlinks it when that process exits and
pulls the pool from under its owner. Here only the owner ever unlinks, exactly once (on close,
at exit, or, after the owner was killed, by the next owner's sweep of segments whose creator
is gone). Segments are created with owner-only permissions (0600).
"""

from __future__ import annotations

import atexit
import json
import logging
import mmap
import os
import secrets
import threading
from pathlib import Path

SHM_DIR = Path("/dev/shm")
PREFIX = "mmdisagg-"
MAGIC = b"MMDISAGG-POOL-1\n"

log = logging.getLogger(__name__)


class SegmentError(RuntimeError):
    """A segment that cannot be created or attached as asked."""


def _creator_pid(name: str) -> int | None:
    try:
        return int(name[len(PREFIX):].split("-", 1)[0])
    except ValueError:
        return None


def sweep_stale_segments() -> list[str]:
    """Unlink segments left by owners that no longer run (killed before they could close)."""
    removed = []
    for path in SHM_DIR.glob(PREFIX + "*"):
        pid = _creator_pid(path.name)
        if pid is None or pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            try:
                if path.stat().st_uid == os.getuid():
                    path.unlink()
                    removed.append(path.name)
            except FileNotFoundError:
                pass
        except PermissionError:
            pass
    if removed:
        log.info("removed %d stale shared-memory segments: %s", len(removed), removed)
    return removed


class SharedSegment:
    """A mapped segment. The creator owns it and unlinks it; attachers only map it."""

    def __init__(self, name: str, mapping: mmap.mmap, owner: bool) -> None:
        self.name = name
        self.mmap = mapping
        self.owner = owner
        self._closed = False
        self._lock = threading.Lock()
        if owner:
            atexit.register(self.unlink)

    @classmethod
    def create(cls, size: int, header: dict) -> SharedSegment:
        sweep_stale_segments()
        name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
        fd = os.open(SHM_DIR / name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, size)
            mapping = mmap.mmap(fd, size)
        except OSError as exc:
            os.close(fd)
            (SHM_DIR / name).unlink(missing_ok=True)
            raise SegmentError(f"cannot create a {size}-byte shared-memory segment: {exc}") from exc
        os.close(fd)
        encoded = MAGIC + json.dumps(header, sort_keys=True).encode()
        mapping[: len(encoded)] = encoded
        return cls(name, mapping, owner=True)

    @classmethod
    def attach(cls, name: str, size: int, header: dict) -> SharedSegment:
        """Map an existing segment; refuse one whose size or header is not what we expect."""
        if not name.startswith(PREFIX) or "/" in name:
            raise SegmentError(f"refusing to attach {name!r}: not an mmdisagg pool segment")
        try:
            fd = os.open(SHM_DIR / name, os.O_RDWR)
        except OSError as exc:
            raise SegmentError(f"cannot open shared-memory segment {name}: {exc}") from exc
        try:
            actual = os.fstat(fd).st_size
            if actual != size:
                raise SegmentError(
                    f"segment {name} has {actual} bytes, the layout expects {size}")
            mapping = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        expected = MAGIC + json.dumps(header, sort_keys=True).encode()
        if mapping[: len(expected)] != expected or mapping[len(expected)] != 0:
            found = bytes(mapping[: 512]).split(b"\0", 1)[0]
            mapping.close()
            raise SegmentError(
                f"segment {name} holds layout {found[len(MAGIC):].decode(errors='replace')}, "
                f"expected {json.dumps(header, sort_keys=True)}")
        return cls(name, mapping, owner=False)

    def close(self) -> None:
        """Unmap; the owner also unlinks. Tensor views of the mapping must be gone first."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self.mmap.close()
        except BufferError:
            log.warning("segment %s still has live views; leaving it mapped", self.name)
        if self.owner:
            self.unlink()

    def unlink(self) -> None:
        if self.owner:
            (SHM_DIR / self.name).unlink(missing_ok=True)
            atexit.unregister(self.unlink)
