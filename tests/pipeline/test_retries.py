"""The one retry layer of the flows (flows.retries): the count from params, backoff, and only
transient failures retried. The ingest flow's behaviour on a real server is in
tests/preprocessing/test_hostile_manifest.py."""

from __future__ import annotations

from prefect.states import Completed, Failed

from flows.preprocess import preprocess_batch
from flows.retries import RETRY_DELAY_S, transient, with_retries
from preprocessing.ingest import DownloadError


def test_preprocess_task_retries_as_often_as_params_say_with_backoff():
    task = with_retries(preprocess_batch, 3)
    assert task.retries == 3
    assert task.retry_delay_seconds == [RETRY_DELAY_S, 2 * RETRY_DELAY_S, 4 * RETRY_DELAY_S]
    assert with_retries(preprocess_batch, 0).retries == 0


def test_only_transient_failures_are_retried():
    assert all(map(transient, [OSError("disk"), DownloadError("timeout"),
                               DownloadError("error"), DownloadError("http_503")]))
    assert not any(map(transient, [DownloadError("http_404"), DownloadError("too_large"),
                                   ValueError("bad input"), KeyError("bug")]))
    should_retry = with_retries(preprocess_batch, 2).retry_condition_fn
    assert should_retry(preprocess_batch, None, Failed(data=TimeoutError("read")))
    assert not should_retry(preprocess_batch, None, Failed(data=ValueError("bad")))
    assert not should_retry(preprocess_batch, None, Completed(data=1))
