"""A real single-node Slurm 22.05 on loopback for the cluster tests.

`LoopbackSlurm.start()` installs Slurm + munge from Debian if missing (scripts/install_slurm.sh), writes a
hostname-independent slurm.conf (node `localhost` at 127.0.0.1, free ports), and starts munged, slurmctld
and slurmd as plain foreground processes with their own munge socket, so nothing touches a system Slurm
or munge. `stop()` ends exactly those three processes by PID. No cgroups and no accounting: proctrack is
linuxproc, which is what works inside a container, and job records are read with `scontrol show job`.

Use the `slurm` session fixture:

    def test_x(slurm):
        jid = slurm.sbatch(["job.sh"], cwd=repo)
        info = slurm.wait(jid, timeout_s=120)
        assert info["JobState"] == "COMPLETED"
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Finished jobs stay visible to `scontrol show job` this long (no accounting database here).
MIN_JOB_AGE_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_block(size: int, lo: int = 20000, hi: int = 40000) -> int:
    """First port of `size` consecutive ports on 127.0.0.1 that are free now (for a Ray port base)."""
    rng = __import__("random").Random(os.getpid() ^ int(time.time()))
    for _ in range(200):
        base = rng.randrange(lo, hi - size)
        socks = []
        try:
            for p in range(base, base + size):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no block of {size} free ports in [{lo}, {hi})")


def install_slurm() -> float:
    """Install Slurm, munge and shellcheck if missing; returns the seconds it took."""
    t0 = time.monotonic()
    subprocess.run(["bash", str(REPO / "scripts" / "install_slurm.sh")], check=True)
    return time.monotonic() - t0


def _mem_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def live_processes(environ_marker: bytes | None = None):
    """(pid, cmdline with NULs as spaces) of every live process; with `environ_marker`, only those whose
    environment holds that exact `KEY=value` entry. Processes that vanish while being read are skipped."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if environ_marker is not None:
                if environ_marker not in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    continue
            yield pid, Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue


def parse_job(text: str) -> dict[str, str]:
    """`scontrol show job -o` output -> {field: value} (first record)."""
    out: dict[str, str] = {}
    for tok in text.strip().splitlines()[0].split():
        if "=" in tok:
            k, v = tok.split("=", 1)
            out.setdefault(k, v)
    return out


class LoopbackSlurm:
    """munged + slurmctld + slurmd on 127.0.0.1, rooted in one directory, stopped by PID."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "etc" / "slurm.conf"
        self.munge_socket = root / "munge" / "munge.socket"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    # -- lifecycle ------------------------------------------------------------------------------

    def write_config(self) -> None:
        r = self.root
        for d in ("etc", "state", "spool", "log", "run"):
            (r / d).mkdir(parents=True, exist_ok=True)
        cpus = os.cpu_count() or 1
        # RealMemory above the real memory drains the node; leave headroom.
        mem_mb = max(512, _mem_mb() - 1024)
        first_job_id = 1000 + (os.getpid() * 7919 + int(time.time())) % 9_000_000
        self.conf.write_text(f"""\
ClusterName=digan-ci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=10
MailProg=/bin/true
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups in a container: linuxproc tracks a job's processes by parentage, and kills the whole tree.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
MinJobAge={MIN_JOB_AGE_S}
# Job ids unique across sessions: per-job paths (/tmp/ray-<job id>) never meet a previous session's.
FirstJobId={first_job_id}
# Ray drains for 30 s on SIGTERM; the default KillWait=30 would hold every job in COMPLETING that long.
KillWait=5
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            stdin=subprocess.DEVNULL)
        log.close()

    def start(self, timeout_s: float = 60) -> None:
        self.write_config()
        # munged runs as the munge user with its own socket, key copy, pid and seed files. It refuses a
        # directory that others can write, and a socket directory that others cannot traverse: munge-owned 0755.
        mdir = self.root / "munge"
        mdir.mkdir(exist_ok=True)
        os.chmod(mdir, 0o755)
        shutil.copy("/etc/munge/munge.key", mdir / "munge.key")
        subprocess.run(["chown", "-R", "munge:munge", str(mdir)], check=True)
        os.chmod(mdir / "munge.key", 0o600)
        # setpriv execs munged itself, so the PID we hold is munged's (runuser would fork).
        self._spawn("munged", ["setpriv", "--reuid=munge", "--regid=munge", "--init-groups",
                               "/usr/sbin/munged", "-F", f"--socket={self.munge_socket}",
                               f"--key-file={mdir / 'munge.key'}", f"--pid-file={mdir / 'munged.pid'}",
                               f"--seed-file={mdir / 'munged.seed'}", f"--log-file={mdir / 'munged.log'}"])
        self._until(lambda: subprocess.run(["munge", "-n", "-S", str(self.munge_socket)],
                                           capture_output=True).returncode == 0, timeout_s, "munged")
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-N", "localhost", "-f", str(self.conf)])
        self._until(lambda: self.run(["sinfo", "-h", "-o", "%T"]).stdout.strip() == "idle", timeout_s,
                    "the node to become idle")

    def _until(self, cond, timeout_s: float, what: str) -> None:
        t_end = time.monotonic() + timeout_s
        while not cond():
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode} while waiting for {what}; "
                                       f"see {self.root / 'log'}")
            if time.monotonic() > t_end:
                raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}; see {self.root / 'log'}")
            time.sleep(0.2)

    def stop(self) -> None:
        """Cancel what is still queued or running, then stop slurmd, slurmctld, munged, each by its PID.

        Jobs first: a job's slurmstepd outlives slurmd, so a job left running (a failed test) would keep
        its processes after the cluster is gone."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            self.run(["scancel", "--user=root"])
            t_end = time.monotonic() + 30
            while self.run(["squeue", "-h", "-o", "%i"]).stdout.strip() and time.monotonic() < t_end:
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.pop(name, None)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    # -- jobs -----------------------------------------------------------------------------------

    def run(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        kw.setdefault("env", self.env)
        return subprocess.run(argv, capture_output=True, text=True, **kw)

    def sbatch(self, argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> int:
        """`sbatch --parsable ARGV` from `cwd` with the cluster's SLURM_CONF; returns the job id."""
        r = self.run(["sbatch", "--parsable", *argv], cwd=cwd, env={**self.env, **(env or {})})
        if r.returncode != 0:
            raise RuntimeError(f"sbatch failed ({r.returncode}): {r.stderr.strip()}")
        return int(r.stdout.strip().split(";")[0])

    def job(self, jid: int) -> dict[str, str]:
        r = self.run(["scontrol", "show", "job", "-o", str(jid)])
        if r.returncode != 0:
            raise RuntimeError(f"scontrol show job {jid}: {r.stderr.strip()}")
        return parse_job(r.stdout)

    def wait_state(self, jid: int, states: set[str], timeout_s: float, poll_s: float = 0.5) -> dict[str, str]:
        """Poll until the job's state is one of `states` (1 s polls: `sbatch --wait` backs off to 32 s)."""
        t_end = time.monotonic() + timeout_s
        while True:
            info = self.job(jid)
            if info["JobState"] in states:
                return info
            if time.monotonic() > t_end:
                self.run(["scancel", str(jid)])
                raise TimeoutError(f"job {jid} still {info['JobState']} after {timeout_s} s")
            time.sleep(poll_s)

    def log_tail(self, jid: int, lines: int = 40) -> str:
        """The lines of slurmctld's and slurmd's logs that name this job (for failure messages)."""
        out = []
        for name in ("slurmctld", "slurmd"):
            p = self.root / "log" / f"{name}.log"
            text = p.read_text(errors="replace").splitlines() if p.exists() else []
            hits = [ln for ln in text if str(jid) in ln][-lines:]
            out.append(f"--- {name}.log ({len(hits)} lines naming job {jid}):\n" + "\n".join(hits))
        return "\n".join(out)

    def wait(self, jid: int, timeout_s: float) -> dict[str, str]:
        """Wait for a terminal state (COMPLETED, FAILED, CANCELLED, TIMEOUT, ...)."""
        return self.wait_state(jid, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                                     "PREEMPTED", "BOOT_FAIL", "DEADLINE"}, timeout_s)


@pytest.fixture(scope="session")
def slurm():
    """A running loopback Slurm for the whole session; installs the packages on a fresh machine."""
    if os.geteuid() != 0 and shutil.which("slurmctld") is None:
        pytest.fail("Slurm is not installed and installing it needs root: run scripts/install_slurm.sh as root")
    install_s = install_slurm()
    # munged (running as `munge`) must traverse to its socket: a 0755 dir outside pytest's 0700 tmp tree.
    root = Path(tempfile.mkdtemp(prefix="digan-slurm-"))
    os.chmod(root, 0o755)
    cluster = LoopbackSlurm(root)
    cluster.install_s = install_s
    try:
        t0 = time.monotonic()
        cluster.start()
        cluster.start_s = time.monotonic() - t0
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
