"""Real Ray nodes on one machine for tests: a head and extra raylets joined with `ray start --address`.

Every node is a `ray start --block` process in its own session, with its own temp dir and ports (free ports
on 127.0.0.1, picked here), so several clusters and nodes never collide. A node is stopped by its PID
(SIGTERM to `ray start --block` stops what it started; SIGKILL to the group after a bound), and dies the way
a real machine does with `kill_raylet` (SIGKILL of its raylet, found by its temp dir).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from digan.storage.local_s3 import free_ports

VENV_BIN = Path(sys.executable).parent


def http_ok(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def base_env(tmp: Path) -> dict[str, str]:
    """Environment of every Ray process of a test cluster (loopback, auth off, CPU DeepSpeed)."""
    return dict(os.environ, RAY_TMPDIR=str(tmp), RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
                DS_ACCELERATOR="cpu", PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")  # no 30 s node drain on SIGTERM (no Serve here)


@dataclass
class Node:
    proc: subprocess.Popen
    temp_dir: Path
    log: Path
    extra: dict = field(default_factory=dict)

    def stop(self, timeout: float = 60) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever is left of the node's session (its raylet, workers) goes by its process group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)


def _node_ports() -> list[str]:
    agent_http, agent_grpc, env_agent, metrics, node_mgr, obj_mgr = free_ports(6)
    return [f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}",
            f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
            "--min-worker-port=0", "--max-worker-port=0", "--disable-usage-stats"]


def _start(cmd: list[str], env: dict[str, str], temp_dir: Path) -> Node:
    temp_dir.mkdir(parents=True, exist_ok=True)
    log_path = temp_dir.parent / f"{temp_dir.name}-ray-start.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return Node(proc, temp_dir, log_path)


def start_head(tmp: Path, env: dict[str, str], num_cpus: int) -> tuple[Node, str, str]:
    """A head node; returns it, its GCS address and its dashboard URL once the dashboard answers (<= 180 s)."""
    gcs, dash, client = free_ports(3)
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           f"--num-cpus={num_cpus}", "--num-gpus=0", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--ray-client-server-port={client}", *_node_ports(), f"--temp-dir={tmp / 'head'}"]
    node = _start(cmd, env, tmp / "head")
    deadline = time.monotonic() + 180
    # Up when the dashboard answers (it starts after the GCS); polling HTTP is cheaper than `ray status`.
    while not http_ok(f"http://127.0.0.1:{dash}/api/version"):
        if node.proc.poll() is not None or time.monotonic() > deadline:
            node.stop()
            raise RuntimeError(f"ray head did not come up: {node.log.read_text()[-2000:]}")
        time.sleep(0.5)
    return node, f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}"


def start_worker_node(tmp: Path, name: str, address: str, env: dict[str, str], num_cpus: int) -> Node:
    """A second raylet joined to `address` with its own temp dir, ports and HOME (another machine's disk).

    Returns once its raylet runs (the caller waits for the cluster to count it, see `alive_nodes`)."""
    home = tmp / f"{name}-home"
    home.mkdir(parents=True, exist_ok=True)
    cmd = [str(VENV_BIN / "ray"), "start", "--block", f"--address={address}", f"--num-cpus={num_cpus}",
           "--num-gpus=0", *_node_ports(), f"--temp-dir={tmp / name}"]
    return _start(cmd, dict(env, HOME=str(home)), tmp / name)


def join_node(tmp: Path, name: str, address: str, dashboard: str, env: dict[str, str], num_cpus: int,
              nodes: int, timeout: float = 120) -> Node:
    """`start_worker_node`, then wait until the cluster counts `nodes` alive; a node whose `ray start` died or that
    did not join within half the bound is stopped and started once more with fresh ports (a port taken between
    `free_ports` and the raylet's bind). The error says what its `ray start` printed."""
    for attempt in (1, 2):
        node = start_worker_node(tmp, f"{name}" if attempt == 1 else f"{name}-again", address, env, num_cpus)
        deadline = time.monotonic() + timeout / 2
        while time.monotonic() < deadline and node.proc.poll() is None:
            if alive_nodes(dashboard) == nodes:
                return node
            time.sleep(0.5)
        log = node.log.read_text(errors="replace")[-1500:] if node.log.is_file() else ""
        node.stop()
    raise TimeoutError(f"node {name} did not join within 2 x {timeout / 2:.0f} s; its ray start said: {log}")


def raylet_pids(temp_dir: Path) -> list[int]:
    """PIDs of the raylet(s) whose command line names this node's temp dir (its session logs live there)."""
    out = subprocess.run(["pgrep", "-f", f"raylet.*{temp_dir}"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split() if p.strip() and int(p) != os.getpid()]


def kill_raylet(node: Node) -> int:
    """Kill the node like a lost machine: SIGKILL its raylet (its workers die with it); returns the PID."""
    pids = [p for p in raylet_pids(node.temp_dir) if _comm(p) == "raylet"]
    if not pids:
        raise RuntimeError(f"no raylet running for {node.temp_dir}")
    for p in pids:
        os.kill(p, signal.SIGKILL)
    return pids[0]


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def alive_nodes(address: str) -> int:
    """How many nodes the GCS counts as alive (the state API through the dashboard)."""
    from ray.util.state import list_nodes

    return sum(1 for n in list_nodes(address=address, raise_on_missing_output=False) if n.state == "ALIVE")


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
