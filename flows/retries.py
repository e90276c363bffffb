"""The pipeline's one retry layer: Prefect's task retries, the count from params, a wait that
doubles from :data:`RETRY_DELAY_S`, and only failures that may pass on another try.

The library below (``preprocessing``) tries everything once; the Ray runner of ``preprocess``
retries the same failures with Ray's own task retries.
"""

from __future__ import annotations

from typing import Any

from prefect import Task
from prefect.tasks import exponential_backoff

from preprocessing.ingest import DownloadError

RETRY_DELAY_S = 1.0  # the first wait; then 2, 4, … seconds


def transient(exc: BaseException) -> bool:
    """Worth another try: file-system or network I/O, a download's timeout, dropped connection
    or 5xx. A bad input or a bug fails the same way every time."""
    if isinstance(exc, DownloadError):
        return exc.transient
    return isinstance(exc, OSError)


def _retry_if_transient(task: Task, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except BaseException as exc:  # the failure the task run ended with
        return transient(exc)
    return False


def with_retries(task: Task, retries: int) -> Task:
    """``task`` retried up to ``retries`` times on transient failures, with backoff."""
    return task.with_options(
        retries=retries,
        retry_delay_seconds=exponential_backoff(RETRY_DELAY_S)(retries) or 0,
        retry_condition_fn=_retry_if_transient,
    )
