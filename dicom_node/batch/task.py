"""Celery task `unimedvl.run_batch_item(item_id)` on the `unimedvl.batch` queue.

Registered by `dicom_node.jobs.celery_app` (its include list), so every `unimedvl worker --queue batch`
(and the worker `unimedvl batch` starts on the embedded defaults) runs batch items with the
model it already keeps warm. The message carries only the item id; a duplicate is harmless
(the item is claimed with one conditional UPDATE).
"""

from __future__ import annotations

from dicom_node.batch.execute import RUN_ITEM
from dicom_node.jobs.celery_app import app


@app.task(name=RUN_ITEM, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_batch_item(item_id: int) -> str:
    from dicom_node.batch.execute import run_item
    from dicom_node.jobs.context import current_context

    ctx = current_context()
    try:
        ctx.engine()
    except Exception:
        # Same policy as clinical jobs: a worker that cannot load its model stops without
        # consuming items (the message goes back; no attempt is counted).
        return ctx.run(-1)  # WorkerContext.run raises Reject(requeue=True) and stops this worker
    return run_item(ctx.db, ctx.engine, int(item_id))
