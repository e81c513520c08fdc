"""New DICOM UIDs under a configurable root.

The default root "2.25." turns a random UUID into a UID (PS3.5 B.2), which needs no
registration. A site with its own registered root passes it as ``uid_root``; the rest of the
UID is then drawn from a UUID as well, so two writers never collide.
"""

from __future__ import annotations

import re
import uuid

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
    """A fresh UID: ``root`` followed by digits of a random UUID, at most 64 characters."""
    root = check_uid_root(root or DEFAULT_UID_ROOT)
    value = uuid.uuid4().int
    if root == DEFAULT_UID_ROOT:
        return f"{root}{value}"
    # Under a site root the full 39-digit UUID integer may not fit: keep as many bits as fit.
    digits = str(value)[: _MAX_UID_LEN - len(root)].lstrip("0") or "1"
    return f"{root}{digits}"


def stable_uid(name: str, root: str | None = None) -> str:
    """The same UID for the same ``name`` (UUID v5), under ``root``: e.g. one device UID per model."""
    root = check_uid_root(root or DEFAULT_UID_ROOT)
    value = uuid.uuid5(uuid.NAMESPACE_OID, name).int
    digits = str(value)[: _MAX_UID_LEN - len(root)].lstrip("0") or "1"
    return f"{root}{digits}"
