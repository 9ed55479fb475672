"""Services shared by the whole test run, started for real on 127.0.0.1 and stopped at the end, and the
CPU kind the run behaves as.

- ``s3_server``: moto's S3-compatible HTTP server; AWS_* variables point every client at it.
- ``s3_bucket``: a fresh bucket on that server for one test.
- ``--cpu-kind=amx|avx2``: ``optimizer.ns_dtype=auto`` resolves as it would on that kind of CPU (``amx``:
  native bf16 matrix instructions, so bf16; ``avx2``: none, so fp32), here and in every process the tests
  start; explicit dtypes are untouched. With ``-m auto_dtype`` it reruns only the tests whose numbers
  depend on what ``auto`` resolves to (``make test`` does so for the kind this machine is not).
- ``--fault-matrix``: run the tests marked ``fault_matrix`` too (the multi-node fault scenarios beyond the
  node kill, minutes each); without it they skip, saying so.
"""

from __future__ import annotations

import os
import uuid

import pytest

from k2model.optim import CPU_KIND_ENV, SIMULATED_CPU_KINDS


def pytest_addoption(parser):
    parser.addoption("--cpu-kind", choices=sorted(SIMULATED_CPU_KINDS), default=None,
                     help="make optimizer.ns_dtype=auto resolve as on this CPU kind (amx: bf16, avx2: fp32)")
    parser.addoption("--fault-matrix", action="store_true",
                     help="also run the multi-node fault scenarios beyond the node kill (make test-all)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--fault-matrix"):
        return
    skip = pytest.mark.skip(reason="a fault-matrix scenario: `make test-all` (pytest --fault-matrix) runs it")
    for item in items:
        if "fault_matrix" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    kind = config.getoption("--cpu-kind")
    if kind:
        os.environ[CPU_KIND_ENV] = kind  # before anything resolves a dtype; inherited by worker processes


def pytest_sessionstart(session):
    """The log's first line: the CPU's bf16 capability and what ``auto`` resolves to (shown under -q too)."""
    from k2model.optim import cpu_bf16_flags, native_bf16_matmul, resolve_ns_dtype

    flags = ", ".join(sorted(cpu_bf16_flags())) or "none"
    kind = os.environ.get(CPU_KIND_ENV)
    simulated = f" (simulating --cpu-kind={kind})" if kind else ""
    line = (f"k2pipe: CPU bf16 matrix flags: {flags}{simulated}; native bf16: {native_bf16_matmul('cpu')}; "
            f"optimizer.ns_dtype=auto resolves to {resolve_ns_dtype('auto', 'cpu')}")
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(line)


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
