"""Prefect flows, one per DVC stage, plus the pipeline that chains them.

Importing this package sets the offline/loopback environment before Prefect, Ray or MLflow
read their settings.
"""

from flows.env import setup as _setup

_setup()
