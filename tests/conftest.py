"""Shared test setup: telemetry off, and the session's S3 server fixtures (tests/s3server.py)."""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

from s3server import s3_bucket, s3_server  # noqa: E402,F401
