"""Services shared by the whole test run, started for real on 127.0.0.1 and stopped at the end.

- ``s3_server``: moto's S3-compatible HTTP server; AWS_* variables point every client at it.
- ``s3_bucket``: a fresh bucket on that server for one test.
"""

from __future__ import annotations

import os
import uuid

import pytest


@pytest.fixture(scope="session")
def s3_server():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in (
        "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
        "AWS_DEFAULT_REGION", "AWS_REGION")}
    os.environ.update({
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    })
    os.environ.pop("AWS_ENDPOINT_URL", None)
    try:
        yield {"endpoint": endpoint, "host": host, "port": port, "server": server}
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    import boto3

    name = f"k2pipe-test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server["endpoint"]).create_bucket(Bucket=name)
    return name
