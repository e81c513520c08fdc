"""Model jobs: planning from completed studies, publishing, claiming, outputs, retry.

    jobs = JobService.from_settings(settings, engine, embedded_worker=True)  # planner + sweeper (+ worker)
    jobs.attach(node.monitor)   # completed revision -> committed jobs -> messages
    jobs.start() ... jobs.stop()
    retry_jobs(engine, ids=[3])  # failed -> planned (the sweeper publishes)

Workers (`unimedvl worker`, dicom_node/jobs/worker.py; the Celery app is
`dicom_node.jobs.celery_app`) run `dicom_node.jobs.tasks.run_job`, which builds the process's
`dicom_node.jobs.context.WorkerContext` and calls `dicom_node.jobs.runner.execute_job`.
"""

from dicom_node.jobs.admin import get_job, jobs_status, list_jobs, retry_jobs, study_plan
from dicom_node.jobs.models import DONE, FAILED, PLANNED, QUEUED, RUNNING, STATES, Job, JobOutput, StudyPlanRecord
from dicom_node.jobs.planner import TASK_NAME, Planner, PlanResult, Publisher, SweepResult
from dicom_node.jobs.service import JobService
from dicom_node.jobs.settings import JobSettings, job_settings, model_version

__all__ = [
    "DONE",
    "FAILED",
    "PLANNED",
    "QUEUED",
    "RUNNING",
    "STATES",
    "TASK_NAME",
    "Job",
    "JobOutput",
    "JobService",
    "JobSettings",
    "PlanResult",
    "Planner",
    "Publisher",
    "StudyPlanRecord",
    "SweepResult",
    "get_job",
    "job_settings",
    "jobs_status",
    "list_jobs",
    "model_version",
    "retry_jobs",
    "study_plan",
]
