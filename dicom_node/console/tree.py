"""`unimedvl timeline` as a readable tree (rich), from `dicom_node.jobs.admin.study_timeline`."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.tree import Tree

_COLOUR = {"failed": "red", "done": "green", "running": "blue", "sending": "blue", "pending": "yellow"}


def _state(state: str | None) -> str:
    colour = _COLOUR.get(state or "", "white")
    return f"[{colour}]{escape(state or '?')}[/]"


def _t(value: str | None) -> str:
    return (value or "–").replace("T", " ")[:19]


def timeline_tree(data: dict[str, Any]) -> Tree:
    """Study -> revisions (received, complete and why, each series' state and why, planned)
    -> jobs (rule, state, attempts, reason) -> deliveries per destination."""
    root = Tree(f"[bold]study {escape(data['study_instance_uid'])}[/]")
    for rev in data.get("revisions", []):
        r = root.add(
            f"revision {rev['revision']}: {rev['instances']} instance(s) received {_t(rev['received_first'])}"
            f" .. {_t(rev['received_last'])}, {_state(rev['state'])}"
        )
        if rev.get("completed_at"):
            r.add(f"complete {_t(rev['completed_at'])} ({escape(rev.get('completed_because') or '')})")
        for x in rev.get("series", []):
            why = f" ({escape(x['completed_because'])})" if x.get("completed_because") else ""
            r.add(f"series {escape(x['series_instance_uid'])}: {escape(x['state'])}{why}")
        if rev.get("planned_at"):
            r.add(f"planned {_t(rev['planned_at'])}: {rev.get('tasks_planned') or 0} task(s)")
        if rev.get("unmatched_series"):
            r.add(f"[yellow]{len(rev['unmatched_series'])} series matched no rule[/]")
        for j in rev.get("jobs", []):
            node = r.add(
                f"job {j['id']} {escape(j['kind'])} (rule {escape(j['rule'])}): {_state(j['state'])},"
                f" {j['attempts']} attempt(s), {j['outputs']} output(s)"
            )
            if j.get("error"):
                node.add(f"[red]reason:[/] {escape(j['error'])}")
            for d in j.get("deliveries", []):
                extra = f" at {_t(d['done_at'])}" if d.get("done_at") else ""
                if d.get("last_error") and d["state"] != "done":
                    extra += f": {escape(d['last_error'])}"
                node.add(f"-> {escape(d['destination'])}: {_state(d['state'])} ({d['attempts']} attempt(s)){extra}")
    return root
