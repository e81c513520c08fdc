"""Will the folder pynetdicom writes a received data set into take the next bytes?

pynetdicom's chunked receive (`_config.STORE_RECV_CHUNKED_DATASET`) writes each data fragment
to its temporary file in its DUL thread; a failed write (ENOSPC, EFBIG, ...) raises there and
the connection closes without a response, so the sender never hears why (docs/upstream/pynetdicom.md #6).
The connection guard (dicom_node/transport_guard.py) therefore asks `WriteCheck` before it hands
pynetdicom a fragment; when the answer is an error it hands empty fragments instead, and the
C-STORE handler answers 0xA700 on an association that stays usable.

The check is what the kernel would refuse the write for, cheaply enough to run for every P-DATA
fragment (about 2 us: one statvfs):
- ENOSPC: fewer bytes available to this user (statvfs f_bavail) than the fragment plus
  `margin`, which also leaves room for the file's small File Meta written with the first data
  fragment and for other associations writing at the same moment;
- EROFS: the filesystem is mounted read-only (what ext4 does after an I/O error, errors=remount-ro);
- EFBIG: the file would grow past RLIMIT_FSIZE (the process limit; Python ignores SIGXFSZ, so
  writes past it fail with EFBIG) or past the largest file the filesystem holds (FILESIZEBITS).

What it cannot foresee: a quota (EDQUOT is per user and not in statvfs), a device error (EIO),
or another process taking the space between the check and the write. The connection then still
closes without a response; the listener's temp-file sweeper removes what the write left.
"""

from __future__ import annotations

import errno
import os
import resource
from pathlib import Path

# Bytes kept free beyond the fragment: File Meta of files started concurrently, filesystem
# metadata (indirect blocks, journal), fragments of other associations checked at the same time.
DEFAULT_MARGIN = 1024 * 1024


class WriteCheck:
    """Checks a write of `n` bytes ending at a file offset, in one folder (see module docstring)."""

    def __init__(self, folder: Path | str, margin: int = DEFAULT_MARGIN) -> None:
        self.folder = str(folder)
        self.margin = margin
        try:
            bits = os.pathconf(self.folder, "PC_FILESIZEBITS")
        except (OSError, ValueError):
            bits = 64
        self.fs_max_file = (1 << (bits - 1)) - 1 if 0 < bits < 64 else (1 << 63) - 1

    def __call__(self, end_offset: int, n: int) -> int:
        """0 if writing `n` bytes that end at byte `end_offset` of a new file should succeed,
        else the errno (ENOSPC, EROFS, EFBIG, or that of a failed statvfs, e.g. EIO)."""
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY and end_offset > limit:
            return errno.EFBIG
        if end_offset > self.fs_max_file:
            return errno.EFBIG
        try:
            st = os.statvfs(self.folder)
        except OSError as exc:
            return exc.errno or errno.EIO
        if st.f_flag & os.ST_RDONLY:
            return errno.EROFS
        if st.f_bavail * st.f_frsize < n + self.margin:
            return errno.ENOSPC
        return 0


def errno_name(code: int) -> str:
    """'ENOSPC' for errno.ENOSPC (the number as text if it has no name)."""
    return errno.errorcode.get(code, str(code))
