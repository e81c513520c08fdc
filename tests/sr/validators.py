"""Run the 2022 validators on written objects and judge their findings against the allow-list.

Policy: an object passes when every Error and every Warning line of ``dciodvfy -new`` (and every
E:/W: line of ``dsrdump`` for SR) matches an entry of dciodvfy_allowlist.txt. So an unknown
warning fails too: our objects are warning-free apart from listed validator-age artefacts and
attributes copied from the source, and a new warning is worth a look.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ALLOWLIST = Path(__file__).with_name("dciodvfy_allowlist.txt")


@dataclass(frozen=True)
class Entry:
    tool: str
    kind: str
    pattern: re.Pattern[str]
    reason: str


@cache
def allowlist() -> tuple[Entry, ...]:
    entries = []
    for line in ALLOWLIST.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        tool, kind, pattern, reason = (part.strip() for part in line.split(" | ", 3))
        assert reason, f"allow-list entry without a reason: {line}"
        entries.append(Entry(tool, kind, re.compile(pattern), reason))
    return tuple(entries)


def _allowed(tool: str, kind: str, message: str) -> bool:
    return any(e.tool == tool and e.kind == kind and e.pattern.search(message) for e in allowlist())


def dciodvfy(path: Path) -> tuple[str, list[tuple[str, str]]]:
    """(IOD name line, [(Error|Warning, message)]) from ``dciodvfy -new``."""
    proc = subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True, text=True, timeout=60)
    findings = []
    iod = ""
    for line in (proc.stdout + proc.stderr).splitlines():
        m = re.match(r"^(Error|Warning) - (.*)$", line)
        if m:
            findings.append((m.group(1), m.group(2)))
        elif line.startswith("Abort"):
            findings.append(("Error", line))
        elif line.strip() and not iod:
            iod = line.strip()
    return iod, findings


def unexpected_dciodvfy(path: Path) -> list[str]:
    _, findings = dciodvfy(path)
    return [f"{kind} - {msg}" for kind, msg in findings if not _allowed("dciodvfy", kind, msg)]


def unexpected_dsrdump(path: Path) -> list[str]:
    """dsrdump must exit 0 and print no E: line; W: lines only if allow-listed."""
    proc = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, timeout=60)
    problems = [] if proc.returncode == 0 else [f"dsrdump exit code {proc.returncode}"]
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.startswith(("E:", "F:")) or (line.startswith("W:") and not _allowed("dsrdump", "W", line)):
            problems.append(line)
    return problems
