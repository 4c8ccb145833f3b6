"""cluster/slurm/train.sbatch on a real single-node Slurm (loopback, see slurm_fixture.py).

1. A tiny training job runs to COMPLETED with a checkpoint written, under Ray token auth: the per-job token
   is a 0600 file, the dashboard refuses requests without it, it never reaches the logs, and it is removed
   at the end together with every Ray process of the job.
2. Preemption: the batch shell gets SIGUSR1 (what `#SBATCH --signal=B:USR1@300` delivers before the time
   limit), the driver checkpoints at its next step and exits, the job requeues itself, and the requeued run
   resumes from exactly that checkpoint and finishes.

The jobs run `python -m digan.train` from this checkout's .venv on CPU (DS_ACCELERATOR=cpu), one Ray node.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from slurm_fixture import free_port_block, live_processes, slurm  # noqa: F401  (the session fixture)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
TRAIN_SBATCH = REPO / "cluster" / "slurm" / "train.sbatch"
BATCH = 8  # clip pairs per step: kimg = steps * BATCH / 1000


def _kimg(steps: int) -> float:
    return steps * BATCH / 1000


def _submit(slurm, tmp: Path, train_args: list[str], env: dict[str, str] | None = None) -> tuple[int, int]:
    """sbatch train.sbatch in loopback mode with a free Ray port block; returns (job id, port base)."""
    port_base = free_port_block(1000)
    job_env = {"DIGAN_ROOT": str(REPO), "DIGAN_VENV": str(REPO / ".venv"), "DIGAN_LOOPBACK": "1",
               "DIGAN_RAY_PORT_BASE": str(port_base), "DIGAN_LOG_DIR": str(tmp / "logs"),
               "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", **(env or {})}
    # The script asks for 2 nodes x 8 GPUs x 32 CPUs; a test overrides the allocation, as a user would.
    jid = slurm.sbatch(["--nodes=1", f"--cpus-per-task={os.cpu_count()}", "--gpus-per-task=0", "--time=20",
                        f"--output={tmp}/%x-%j.out", str(TRAIN_SBATCH), *train_args], cwd=REPO, env=job_env)
    return jid, port_base


def _train_args(tmp: Path, run_name: str, total_steps: int, ckpt_every_steps: int) -> list[str]:
    # The demo shards go to the default data.demo_dir (~/.cache/digan/demo), shared with the other tests:
    # whichever job comes first builds them (under a lock), the rest reuse them.
    return ["--config", "demo-32", f"train.batch_size={BATCH}", f"train.total_kimg={_kimg(total_steps)}",
            f"train.checkpoint_kimg={_kimg(ckpt_every_steps)}", "train.sample_kimg=1000", "train.log_every_steps=1",
            "train.keep_checkpoints=100", f"train.run_name={run_name}", f"train.storage_path={tmp / 'runs'}",
            "dist.num_workers=1", "metrics.metrics=[]", "data.num_workers=0"]


def _log(tmp: Path, jid: int) -> str:
    p = tmp / f"digan-train-{jid}.out"
    return p.read_text(errors="replace") if p.exists() else ""


def _fail(slurm, tmp: Path, jid: int, why: str):
    pytest.fail(f"{why}\n--- job {jid}: {slurm.job(jid)}\n--- batch log:\n{_log(tmp, jid)[-6000:]}\n"
                f"{slurm.log_tail(jid)}")


def _checkpoints(run_dir: Path) -> dict[int, Path]:
    """Complete checkpoints (generator.pt is written last) by step."""
    out = {}
    for d in run_dir.glob("step-*"):
        if (d / "generator.pt").exists():
            out[int(d.name.split("-")[1])] = d
    return out


def _job_processes(jid: int) -> list[str]:
    """Live processes whose environment carries this job's Ray temp dir (every Ray process of the job)."""
    return [f"{pid} {cmd[:120]!r}" for pid, cmd in live_processes(f"RAY_TMPDIR=/tmp/ray-{jid}".encode())]


def _http_status(url: str, token: str | None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_train_job_completes_with_checkpoint_under_token_auth(slurm, tmp_path):
    token_dir = tmp_path / "tokens"
    total_steps = 2
    jid, port_base = _submit(slurm, tmp_path, _train_args(tmp_path, "slurm-ok", total_steps, total_steps),
                             env={"DIGAN_RAY_AUTH": "token", "DIGAN_RAY_TOKEN_DIR": str(token_dir)})
    token_file = token_dir / f"job-{jid}.token"

    # While the job runs: the token is a private file, and the dashboard (job submission API) wants it.
    t_end = time.monotonic() + 300
    while "Ray up" not in _log(tmp_path, jid):
        if slurm.job(jid)["JobState"] not in ("PENDING", "CONFIGURING", "RUNNING"):
            _fail(slurm, tmp_path, jid, "the job ended before Ray came up")
        if time.monotonic() > t_end:
            _fail(slurm, tmp_path, jid, "Ray did not come up in 300 s")
        time.sleep(0.5)
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(token_dir.stat().st_mode) == 0o700
    token = token_file.read_text()
    assert re.fullmatch(r"[0-9a-f]{64}", token)
    jobs_api = f"http://127.0.0.1:{port_base + 1}/api/jobs/"
    assert _http_status(jobs_api, None) == 401
    assert _http_status(jobs_api, "0" * 64) == 403
    assert _http_status(jobs_api, token) == 200

    info = slurm.wait(jid, timeout_s=480)
    log = _log(tmp_path, jid)
    if info["JobState"] != "COMPLETED":
        _fail(slurm, tmp_path, jid, f"job ended {info['JobState']}")
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "0"

    ckpts = _checkpoints(tmp_path / "runs" / "slurm-ok")
    assert sorted(ckpts) == [total_steps], ckpts
    export = torch.load(ckpts[total_steps] / "generator.pt", map_location="cpu", weights_only=True)
    assert export["step"] == total_steps and export["G_ema"]
    assert "finished after" in log and f"at step {total_steps}" in log

    # Teardown: token gone, no Ray process of this job left, its temp dir removed; the token never logged.
    assert not token_file.exists()
    assert _job_processes(jid) == []
    assert not Path(f"/tmp/ray-{jid}").exists()
    logs = [tmp_path / f"digan-train-{jid}.out", *(tmp_path / "logs").rglob("*")]
    for p in logs:
        if p.is_file():
            assert token not in p.read_text(errors="replace"), f"the token leaked into {p}"


def test_preempted_job_checkpoints_requeues_and_resumes(slurm, tmp_path):
    total_steps = 10
    run_dir = tmp_path / "runs" / "slurm-preempt"
    jid, _ = _submit(slurm, tmp_path, _train_args(tmp_path, "slurm-preempt", total_steps, total_steps))

    # Once it trains, send what Slurm sends before the time limit. Checkpoints come only at the end, so
    # the one the requeued run resumes from can only be the preemption checkpoint.
    t_end = time.monotonic() + 300
    while not re.search(r"step +1 kimg", _log(tmp_path, jid)):
        if slurm.job(jid)["JobState"] not in ("PENDING", "CONFIGURING", "RUNNING"):
            _fail(slurm, tmp_path, jid, "the job ended before its first step")
        if time.monotonic() > t_end:
            _fail(slurm, tmp_path, jid, "no training step after 300 s")
        time.sleep(0.5)
    r = slurm.run(["scancel", "--batch", "--signal=USR1", str(jid)])
    assert r.returncode == 0, r.stderr

    # The job stops, checkpoints and requeues itself: Restarts=1, back to PENDING until Slurm's requeue hold ends.
    t_end, states = time.monotonic() + 300, []
    while True:
        info = slurm.job(jid)
        states.append(f"{info['JobState']}/{info['Restarts']}")
        if info["Restarts"] == "1" and info["JobState"] == "PENDING":
            break
        if info["Restarts"] == "0" and info["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
            _fail(slurm, tmp_path, jid, f"no requeue: states {sorted(set(states), key=states.index)}")
        if time.monotonic() > t_end:
            _fail(slurm, tmp_path, jid, f"no requeue after 300 s: states {sorted(set(states), key=states.index)}")
        time.sleep(0.25)
    first_run = _log(tmp_path, jid)
    assert "got SIGUSR1" in first_run and "requeueing job" in first_run
    m = re.search(r"checkpointed at step (\d+)", first_run)
    assert m, first_run[-4000:]
    stop_step = int(m.group(1))
    assert 1 <= stop_step < total_steps
    stop_ckpt = torch.load(_checkpoints(run_dir)[stop_step] / "train_state.pt", map_location="cpu",
                           weights_only=True)
    assert stop_ckpt["stopped_by_signal"] is True and stop_ckpt["step"] == stop_step
    assert _job_processes(jid) == []  # Ray was stopped before the requeue
    # Slurm starts it again by itself after its requeue hold (cred_expire + 1 s, 11 s in this fixture).
    # Releasing it earlier (`scontrol update StartTime=now`) races slurmd, which keeps the old instance's
    # credential revoked for cred_expire seconds: "Job credential revoked", and the job FAILs at RunTime 0.

    info = slurm.wait(jid, timeout_s=480)
    if info["JobState"] != "COMPLETED":
        _fail(slurm, tmp_path, jid, f"the requeued run ended {info['JobState']}")
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "1"
    log = _log(tmp_path, jid)
    assert "(restart 1)" in log and f"at step {stop_step} " in log[len(first_run):]  # "resumed from ... at step N"

    # The final checkpoint's history: one resume, from the preemption checkpoint; steps tile [0, total).
    final = torch.load(_checkpoints(run_dir)[total_steps] / "train_state.pt", map_location="cpu", weights_only=True)
    assert final["step"] == total_steps and final["stopped_by_signal"] is False
    assert final["resumed_from"] == [stop_step]
    covered = sorted(tuple(s) for s in final["segments"])
    assert covered[0][0] == 0 and covered[-1][1] == total_steps
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:])), covered
    assert _job_processes(jid) == []


def test_time_limit_warning_reaches_the_handler(slurm, tmp_path):
    """The real `#SBATCH --signal` of train.sbatch, delivered by slurmctld as the time limit nears.

    The job above gets its USR1 from `scancel --batch`, at a chosen moment; this one waits for Slurm's own
    time-limit warning. It runs no Ray and no training (the tests above do): the driver is a shell that
    exits on SIGTERM, so what is checked is the Slurm side: directive -> batch shell -> our handler ->
    driver -> requeue.
    """
    directive = next(line for line in TRAIN_SBATCH.read_text().splitlines() if line.startswith("#SBATCH --signal="))
    assert directive == "#SBATCH --signal=B:USR1@300"
    job = tmp_path / "warn.sbatch"
    job.write_text("\n".join([
        "#!/usr/bin/env bash",
        directive,
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        "set -euo pipefail",
        f". {REPO}/cluster/slurm/ray_on_slurm.sh",
        "digan_setup",
        # The driver's own child must go with it: linuxproc loses track of orphans.
        "digan_run_driver bash -c 'trap \"kill \\$!; echo driver got TERM; exit 0\" TERM; sleep 600 & wait'",
        ""]))
    # A 1-minute limit is already within the 300 s warning window: slurmctld signals at its next periodic
    # time-limit check (every 30 s).
    jid = slurm.sbatch(["--time=1", f"--output={tmp_path}/warn-%j.out", str(job)], cwd=tmp_path,
                       env={"DIGAN_ROOT": str(REPO), "DIGAN_VENV": str(REPO / ".venv"), "DIGAN_LOOPBACK": "1",
                            "DIGAN_LOG_DIR": str(tmp_path / "logs")})
    try:
        t_end = time.monotonic() + 90
        while not (slurm.job(jid)["Restarts"] == "1"):
            if time.monotonic() > t_end:
                pytest.fail(f"no requeue after 90 s: {slurm.job(jid)}\n{(tmp_path / f'warn-{jid}.out').read_text()}")
            time.sleep(0.5)
    finally:
        slurm.run(["scancel", str(jid)])
    log = (tmp_path / f"warn-{jid}.out").read_text()
    assert "got SIGUSR1" in log and "driver got TERM" in log and "driver exited with 0" in log
    assert "requeueing job" in log
    assert _job_processes(jid) == []


def test_driver_status_survives_being_reaped_inside_the_trap(tmp_path):
    """`wait` interrupted by the preemption trap returns 128 + USR1 = 138; if the driver exits and bash reaps it
    while the trap still runs, its own status (0 here) must be the one reported, or a clean preemption
    checkpoint would be taken for a failure and the job not requeued. No Slurm: the functions of
    ray_on_slurm.sh in a plain bash, the trap held open 0.5 s so the reaping always happens inside it."""
    script = "\n".join([
        "set -euo pipefail",
        f". {REPO}/cluster/slurm/ray_on_slurm.sh",
        "DIGAN_PREEMPTED=0 DIGAN_TERMINATED=0 DIGAN_REQUEUE=0 DIGAN_DRIVER_PID= DIGAN_DRIVER_SIGNAL=TERM",
        "DIGAN_PREEMPT_SIGNAL=USR1",
        "trap '_digan_on_preempt; sleep 0.5' USR1",
        "( sleep 1; kill -USR1 $$ ) &",
        "digan_run_driver bash -c 'trap \"kill \\$!; exit 0\" TERM; sleep 600 & wait'",
        "echo \"run_driver returned $?\"",
        ""])
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "got SIGUSR1" in out.stdout and "driver exited with 0" in out.stdout, out.stdout
    assert "run_driver returned 0" in out.stdout, out.stdout
