"""The pipeline's reporting steps (provenance tags, run summary) fail loudly but not fatally."""

from __future__ import annotations

import logging

import pytest

from flows.pipeline import not_fatal


def test_a_failing_report_is_logged_with_its_cause(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("durian-test-pipeline")
    with caplog.at_level(logging.WARNING, logger=log.name), not_fatal("the summary", log):
        {}["missing"]  # noqa: B018 - the failure under test
    assert caplog.messages == ["the summary failed (the run goes on): KeyError: 'missing'"]


def test_a_stop_request_is_not_swallowed() -> None:
    """Only errors are reported and passed over; an interrupt (a stop request) still ends the
    run."""
    with pytest.raises(KeyboardInterrupt), not_fatal("the summary", logging.getLogger()):
        raise KeyboardInterrupt
