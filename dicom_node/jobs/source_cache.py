"""The parsed source instances of a worker's last job, kept for its next job of the same study.

A routing rule's tasks on one series (report + segmentation, report + VQA) are separate jobs that
one worker normally runs back to back, and each would parse the same files again: for a 100-slice
CT that is ~0.03-0.1 s of the job's own I/O per job (pydicom parsing, not the disk), more with a
remote worker, which fetches them over WADO-RS. `SourceCache` hands the next job the datasets the
last one parsed.

Safe because:
- Entries are keyed by the sha256 the index recorded for each instance: a stored object never
  changes, and equal digests are equal bytes, so a hit is exactly what reading the file gives.
- Only a job that recorded its outputs puts its sources back (`hold`, then `keep_held`); a failed or crashed job's
  datasets are dropped, whatever state it left them in.
- Pipelines and writers never modify their source datasets (writers work on
  `sr_writers.source_prep` copies; `tests/pipelines/test_sources_unchanged.py` checks every task).

Memory: between jobs a worker now keeps its last job's sources, unless their stored files add up
to more than `max_bytes` (then nothing). `take` empties the cache before the next job reads what
it lacks, so during a job a worker still holds only that job's sources.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pydicom import Dataset

DEFAULT_MAX_BYTES = 512 * 1024 * 1024


@dataclass
class SourceCache:
    """Datasets by the sha256 of their stored bytes, from the last job that completed (see module doc)."""

    max_bytes: int = DEFAULT_MAX_BYTES
    _entries: dict[str, Dataset] = field(default_factory=dict, repr=False)
    _held: dict[str, Dataset] = field(default_factory=dict, repr=False)
    _held_bytes: int = field(default=0, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def take(self, digests: Iterable[str]) -> dict[str, Dataset]:
        """The cached datasets among `digests`; the cache is empty afterwards (the caller owns
        them), and whatever an earlier job held without recording (claim lost) is dropped."""
        with self._lock:
            entries, self._entries = self._entries, {}
            self._held, self._held_bytes = {}, 0
        return {d: entries[d] for d in digests if d in entries}

    def hold(self, datasets: Mapping[str, Dataset], total_bytes: int) -> None:
        """The running job's sources (sha256 -> dataset, `total_bytes` as stored), kept for the
        next job only if this one records its outputs (`keep_held`)."""
        with self._lock:
            self._held, self._held_bytes = dict(datasets), total_bytes

    def keep_held(self) -> None:
        """The job recorded its outputs: what it held serves the next job, if it fits `max_bytes`."""
        with self._lock:
            held, self._held = self._held, {}
            self._entries = held if 0 <= self._held_bytes <= self.max_bytes else {}

    def clear(self) -> None:
        with self._lock:
            self._entries, self._held = {}, {}

    def __len__(self) -> int:
        return len(self._entries)
