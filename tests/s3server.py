"""A real S3 server for tests: moto's server mode on loopback, one per test session.

Use the ``s3_server`` (session) fixture for the endpoint, or ``s3_bucket`` for a fresh, empty
bucket per test. Credentials are dummies set in the environment for the session only; the
host's AWS config files are hidden so nothing real is ever picked up.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass, field

import pytest

DUMMY_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_CONFIG_FILE": "/nonexistent/saev-test-aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/saev-test-aws-credentials",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@dataclass
class S3Server:
    endpoint_url: str
    bucket: str = ""
    storage_options: dict = field(default_factory=dict)

    def uri(self, *parts: str) -> str:
        if not self.bucket:
            raise ValueError("no bucket: use the s3_bucket fixture")
        return "/".join([f"s3://{self.bucket}", *(p.strip("/") for p in parts)])

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(**self.storage_options)


@pytest.fixture(scope="session")
def s3_server():
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in DUMMY_ENV}
    os.environ.update(DUMMY_ENV)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        yield S3Server(
            endpoint_url=endpoint,
            storage_options={
                "endpoint_url": endpoint,
                "key": DUMMY_ENV["AWS_ACCESS_KEY_ID"],
                "secret": DUMMY_ENV["AWS_SECRET_ACCESS_KEY"],
            },
        )
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the session's S3 server."""
    import s3fs

    name = f"saev-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(**s3_server.storage_options)
    fs.mkdir(name)
    fs.invalidate_cache()
    return S3Server(s3_server.endpoint_url, name, dict(s3_server.storage_options))
