"""Which SOP classes the listener stores.

Every storage SOP class PS3.6 Table A-1 has ever listed, retired ones included (old modalities
still send e.g. the retired Ultrasound Image Storage 1.2.840.10008.5.1.4.1.1.6), taken from
pydicom's copy of that table. Private SOP classes (UIDs outside the table) are stored only when
`node.accept_private_sop_classes` is on.
"""

from __future__ import annotations

from functools import lru_cache

from pydicom.uid import UID_dictionary

VERIFICATION = "1.2.840.10008.1.1"
# UID roots of the standard (PS3.5 9.1): anything else is private.
STANDARD_ROOT = "1.2.840.10008."


@lru_cache(maxsize=1)
def _storage() -> frozenset[str]:
    uids = set()
    for uid, (name, kind, *_rest) in UID_dictionary.items():
        if kind != "SOP Class" or "Storage" not in name:
            continue
        if "Commitment" in name or "Directory Storage" in name:  # not C-STORE of instances
            continue
        uids.add(str(uid))
    return frozenset(uids)


def storage_sop_classes() -> list[str]:
    """Every storage SOP class UID PS3.6 defines or defined (about 200), sorted."""
    return sorted(_storage())


def storage_keyword(uid: str) -> str:
    """A Python identifier for the class (PS3.6 keyword, e.g. UltrasoundImageStorageRetired)."""
    entry = UID_dictionary.get(uid)
    keyword = entry[4] if entry else ""
    return keyword if keyword.isidentifier() else "Storage_" + uid.replace(".", "_")


def is_storage_sop_class(uid: str) -> bool:
    return uid in _storage()


def is_private_sop_class(uid: str) -> bool:
    """A UID outside the DICOM root and outside PS3.6 (PS3.5 9.1)."""
    return not uid.startswith(STANDARD_ROOT) and uid not in UID_dictionary


def storable(uid: str, *, accept_private: bool) -> bool:
    """Whether a C-STORE of this SOP class is stored (True) or refused 0x0122."""
    return is_storage_sop_class(uid) or (accept_private and is_private_sop_class(uid))
