"""New DICOM UIDs under a configurable root.

The default root "2.25." turns a random UUID into a UID (PS3.5 B.2), which needs no
registration. A site with its own registered root passes it as ``uid_root``; the rest of the
UID is then random digits (pydicom's generate_uid), so two writers never collide.
"""

from __future__ import annotations

import re
import uuid

from pydicom.uid import generate_uid

DEFAULT_UID_ROOT = "2.25."
_MAX_UID_LEN = 64
_ROOT_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\.$")


def check_uid_root(root: str) -> str:
    """Return ``root`` with a trailing dot, or raise ValueError if it cannot start a UID."""
    if not root.endswith("."):
        root += "."
    if not _ROOT_RE.match(root):
        raise ValueError(f"uid_root {root!r} is not a dotted numeric UID prefix (e.g. '1.2.826.0.1.3680043.10.999.')")
    # Leave room for at least 20 digits of randomness (about 66 bits).
    if len(root) > _MAX_UID_LEN - 20:
        raise ValueError(f"uid_root {root!r} is too long: at most {_MAX_UID_LEN - 20} characters")
    return root


def new_uid(root: str | None = None) -> str:
    """A fresh UID, at most 64 characters: under "2.25." the decimal value of a random UUID
    (PS3.5 B.2); under a site root, random digits filling the rest (pydicom's generate_uid).

    Raises ValueError for a root that cannot start a UID (check_uid_root).
    """
    root = check_uid_root(root or DEFAULT_UID_ROOT)
    return str(generate_uid(prefix=None if root == DEFAULT_UID_ROOT else root))


def stable_uid(name: str, root: str | None = None) -> str:
    """The same UID for the same ``name`` under ``root``: e.g. one device UID per model.

    Under a site root: pydicom's generate_uid with ``name`` as its entropy source. Under "2.25."
    a UUID v5 of ``name``: generate_uid's entropy path would append a 59-digit hash there, and a
    2.25 UID must be the value of a UUID (PS3.5 B.2). Raises ValueError for a bad root.
    """
    root = check_uid_root(root or DEFAULT_UID_ROOT)
    if root == DEFAULT_UID_ROOT:
        return f"{root}{uuid.uuid5(uuid.NAMESPACE_OID, name).int}"
    return str(generate_uid(prefix=root, entropy_srcs=[name]))
