"""Files on the gateway's disk: `partial/` (downloads and pushed images on their way) and
`images/<sha256>` (verified images, shared by every job that needs them).

Names from job documents never reach a path here: a part file is named by its typed key,
whose thing name and job id were checked against AWS's patterns ([A-Za-z0-9:_-]) before
they were stored, and an image by the hex digest of its own bytes.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

from .state import FileKey, JobKey

log = logging.getLogger("gatewayd.store")


class FileStore:
    def __init__(self, state_dir: Path) -> None:
        self.partial = state_dir / "partial"
        self.images = state_dir / "images"
        # not 0777 under a umask of 0: whoever may write here may swap a verified file
        self.partial.mkdir(mode=0o750, parents=True, exist_ok=True)
        self.images.mkdir(mode=0o750, parents=True, exist_ok=True)

    def part_path(self, key: FileKey) -> Path:
        safe_thing = key.thing.replace(":", "_")
        return self.partial / f"{safe_thing}__{key.job_id}__{key.idx}.part"

    def image_path(self, sha256_hex: str) -> Path:
        if len(sha256_hex) != 64 or any(c not in "0123456789abcdef" for c in sha256_hex):
            raise ValueError(f"{sha256_hex!r} is not a SHA-256 in lowercase hex")
        return self.images / sha256_hex

    def stored_image(self, sha256_hex: str | None) -> Path | None:
        """The verified image with this digest, if it is in the store."""
        if not sha256_hex:
            return None
        path = self.image_path(sha256_hex)
        return path if path.exists() else None

    def move_in(self, part: Path, sha256_hex: str) -> Path:
        """Make a verified part file the image `images/<sha256>`, durably."""
        target = self.image_path(sha256_hex)
        if part != target:
            os.replace(part, target)
            fsync_dir(self.images)
        return target

    def discard_part(self, key: FileKey) -> None:
        self.part_path(key).unlink(missing_ok=True)

    def discard_parts(self, key: JobKey, indexes: list[int]) -> None:
        for idx in indexes:
            self.discard_part(FileKey(key.thing, key.job_id, idx))

    def collect(self, in_use: set[str]) -> None:
        """Remove every image no undecided job needs."""
        for path in self.images.iterdir():
            if path.name not in in_use:
                log.debug("removing %s: no open job needs it", path.name)
                path.unlink(missing_ok=True)


def pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """os.pwrite until every byte is written (it may write less than asked)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if written == 0:  # a regular file never does this; a loop on it would never end
            raise OSError(errno.EIO, f"pwrite wrote nothing at offset {offset}")
        view = view[written:]
        offset += written


def fsync_dir(path: Path) -> None:
    """Make the directory's entries (a new or renamed file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
