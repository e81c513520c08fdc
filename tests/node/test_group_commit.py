"""Group commit of index rows: many waiting C-STOREs share one transaction, each gets its own
result, one bad item fails alone, and a directory to sync is synced before the commit."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, insert, select

from dicom_node.group_commit import GroupCommit

META = MetaData()
ROWS = Table("rows", META, Column("id", Integer, primary_key=True), Column("name", String, unique=True))


def _engine(tmp_path: Path) -> Any:
    engine = create_engine(f"sqlite:///{tmp_path / 'g.db'}")
    META.create_all(engine)
    return engine


def _apply(conn: Any, created: dict[Any, Any], item: str) -> int:
    if item == "bad":
        raise ValueError("bad item")
    pk = conn.execute(insert(ROWS).values(name=item)).inserted_primary_key[0]
    created[item] = pk
    return int(pk)


def test_waiting_items_share_one_transaction_and_a_bad_one_fails_alone(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    gate = threading.Lock()
    remembered: dict[Any, Any] = {}
    gc = GroupCommit(engine, _apply, lock=gate, on_commit=remembered.update)
    names = [f"item{i}" for i in range(8)] + ["bad"]
    results: dict[str, Any] = {}

    def submit(name: str) -> None:
        try:
            results[name] = gc.submit(name)
        except ValueError as exc:
            results[name] = exc

    gate.acquire()  # the committer blocks on its first item while the others queue up
    threads = [threading.Thread(target=submit, args=(n,)) for n in names]
    for t in threads:
        t.start()
    while gc._queue.qsize() < len(names) - 1:  # noqa: SLF001 - wait for the recorded signal: all queued
        threading.Event().wait(0.01)
    gate.release()
    for t in threads:
        t.join(30)
    gc.close()
    assert isinstance(results["bad"], ValueError)
    with engine.connect() as conn:
        stored = dict(conn.execute(select(ROWS.c.name, ROWS.c.id)).all())
    assert set(stored) == set(names) - {"bad"}
    assert all(results[n] == stored[n] for n in stored)  # each waiter got its own row's id
    assert remembered == stored  # ids reported only for what committed
    assert gc.stats.items == len(names) - 1 and gc.stats.largest >= 2


def test_directory_sync_failure_fails_the_batch_before_any_commit(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    gc = GroupCommit(engine, _apply)
    with pytest.raises(OSError):
        gc.submit("x", tmp_path / "no-such-dir")
    assert gc.submit("y", tmp_path) > 0
    gc.close()
    with engine.connect() as conn:
        assert [r.name for r in conn.execute(select(ROWS.c.name))] == ["y"]
