"""Shared test setup: telemetry off, the session's S3 server fixtures (tests/s3server.py), the
Prefect test API, and the markers `make test-fast` filters on (registered in pyproject.toml)."""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

from s3server import s3_bucket, s3_server  # noqa: E402,F401

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """One ephemeral Prefect API for the whole session (each harness costs seconds), with its
    home and result storage in a temporary folder."""
    home = tmp_path_factory.mktemp("prefect-home")
    os.environ["PREFECT_HOME"] = str(home)
    os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(home / "storage")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def pytest_collection_modifyitems(items):
    """A test that needs the Prefect API (flows, and tasks run as tasks) is a `flow` test, one
    through the local stack a `stack` test, whatever its file says."""
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "prefect_harness" in names:
            item.add_marker(pytest.mark.flow)
        if "stack" in names:
            item.add_marker(pytest.mark.stack)
