"""Typed refusals of the writers: the source cannot carry the requested result.

Every class subclasses ValueError (through SourceError), so callers that treat ValueError as
"bad input" keep working; each message is one readable sentence naming the reason, without
patient data, so the pipeline can show it as a job's failure reason as it is.
"""

from __future__ import annotations


class SourceError(ValueError):
    """The source datasets cannot carry the result (mixed studies, missing geometry, wrong shape)."""


class NoFrameOfReferenceError(SourceError):
    """The source has no Frame of Reference UID, so a SEG/TID 1500 cannot be placed on it (PS3.3 C.7.4.1)."""


class NoPatientGeometryError(SourceError):
    """The source lacks Image Plane attributes (position, orientation, spacing: PS3.3 C.7.6.2)."""


class UnsupportedSourceError(SourceError):
    """The writer does not write this kind of source (pixel format, frame layout); the reason is named."""


__all__ = ["NoFrameOfReferenceError", "NoPatientGeometryError", "SourceError", "UnsupportedSourceError"]
