"""Research batch: run the model over whole archives (folders, DICOMDIR, DIMSE and DICOMweb PACS),
de-identified, resumable, on the gateway's Celery workers.

- ``models``: batch, item and result tables (durable state, migration 0005_batch);
- ``sources``: where studies come from and how a worker fetches one into scratch space;
- ``deidentify``: PS3.15 Annex E Basic Profile (dicognito) with the study's options;
- ``execute``: one item on a worker: claim, fetch, de-identify, plan, run, write, record;
- ``driver``: the `unimedvl batch` process: enumerate, publish in a window, sweep, progress;
- ``results``: the results table (parquet + csv) and the status summary;
- ``cli``: `unimedvl batch ...` commands.
"""
