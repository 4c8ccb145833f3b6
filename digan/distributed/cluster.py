"""The Ray side of launching a run: attaching to or starting a cluster, the workers' environment, the stop flag,
and how long Ray Train may keep retrying a worker group that cannot start."""

from __future__ import annotations

import math
import os
import time


# ----------------------------------------------------------------------------------------------------
# Stop requests: a signal in the driver sets a flag in a tiny actor that rank 0 polls every step.


class StopFlag:
    """A signal in the driver sets this tiny actor's flag; rank 0 polls it every step."""

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


def worker_env(use_gpu: bool) -> dict[str, str]:
    """Environment every worker needs (DeepSpeed's accelerator; the same Ray auth mode as the driver)."""
    # RAY_TRAIN_ENABLE_PRINT_PATCH=0: Train V2 reroutes print() through logging, which showed every
    # progress line twice on the driver; plain stdout is forwarded by Ray once.
    env = {"PYTHONUNBUFFERED": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    for k in ("RAY_AUTH_MODE", "DS_ACCELERATOR"):
        if k in os.environ:
            env.setdefault(k, os.environ[k])
    return env


# Ray Train V2's controller starts a PreemptionWatcher actor (max_restarts=-1) with the Train workers' actor
# handles as constructor arguments, and Ray core logs that at ERROR level in every run ("core_worker.cc: Actor
# with class name: 'PreemptionWatcher' ... has constructor arguments in the object store and max_restarts > 0",
# ray-project/ray#53727) although the run is fine: any actor handle passed to a restartable actor's constructor
# triggers it (the handles are not data that can be lost), and nothing of ours reaches that actor. The watcher
# itself is kept: it is how Ray Train notices node drains (spot/autoscaler preemption).
# Ray's documented RAY_DEDUP_LOGS_SKIP_REGEX drops exactly that line from the driver's console; it stays in the
# controller's log file. Ray reads the variable when it is first imported in this process.
_RAY_FALSE_ALARM = r"Actor with class name: 'PreemptionWatcher' .*has constructor arguments in the object store"


def quiet_ray_false_alarms() -> None:
    """Keep Ray's known false-alarm ERROR line off the console; call before this process imports ray."""
    current = os.environ.get("RAY_DEDUP_LOGS_SKIP_REGEX")
    if not current:
        os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"] = _RAY_FALSE_ALARM
    elif _RAY_FALSE_ALARM not in current:
        os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"] = f"{current}|{_RAY_FALSE_ALARM}"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_ray(cfg) -> None:
    """Attach to `dist.ray_address` / RAY_ADDRESS, else start a new local cluster bound to 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.dist.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    # address="local": never attach by accident to another cluster `ray start`ed on this machine.
    # Ray Train's placement-group cleaner and Tune find the state API through RAY_API_SERVER_ADDRESS; without it
    # they guess by scanning local processes, which fails (and leaks placement groups, hanging the next run)
    # as soon as a second Ray instance runs on the machine. So pin the dashboard port and tell every process.
    port = _free_port()
    ray.init(
        address="local",
        # Enough CPU slots for the workers even on a small laptop.
        num_cpus=max(os.cpu_count() or 1, cfg.dist.num_workers * cfg.dist.cpus_per_worker),
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}},
    )


# Ray Train gives a worker group this long to start (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S in the
# controller's environment, 60 s by default), then retries the start as a controller failure.
WORKER_START_TIMEOUT_S = 60.0


def startup_retries(worker_wait_s: float) -> int:
    """Ray's controller_failure_limit for `dist.worker_wait_s` (Ray's default, -1, retries forever: a run whose
    node is gone for good would sit in RUNNING, its controller logging startup timeouts)."""
    return -1 if worker_wait_s <= 0 else max(1, math.ceil(worker_wait_s / WORKER_START_TIMEOUT_S))


class ElasticWait:
    """Bounds how long an elastic run may wait for `dist.min_workers`.

    Ray Train's elastic policy never gives up on a group it cannot place: with fewer than min_workers placeable it
    keeps the run RESTARTING or SCHEDULING forever. The driver polls the run's status in Ray Train's state actor
    (every `poll_s`; `track()` turns that tracking on, before the trainer starts); `expired()` is True once the
    run has been known and not RUNNING (nor finished) for `wait_s` in a row. An unknown status never counts.
    """

    @staticmethod
    def track() -> None:
        """Ray Train keeps run states (its state actor) only with RAY_TRAIN_ENABLE_STATE_TRACKING=1 in the driver."""
        os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")

    def __init__(self, run_name: str, wait_s: float, poll_s: float = 5.0):
        self.run_name, self.wait_s, self.poll_s = run_name, wait_s, poll_s
        self.clock = time.monotonic
        self.since = self.clock()  # not running since (the start counts: a first group may never be placed)
        self.next_poll = 0.0

    def status(self) -> str | None:
        """The latest run of this name: its RunStatus value, or None while Ray Train has not registered it."""
        import ray
        from ray.train.v2._internal.state.state_actor import get_state_actor

        actor = get_state_actor()
        if actor is None:
            return None
        runs = [r for r in ray.get(actor.get_train_runs.remote(), timeout=30).values() if r.name == self.run_name]
        return max(runs, key=lambda r: r.start_time_ns).status.value if runs else None

    def expired(self) -> bool:
        now = self.clock()
        if now < self.next_poll:
            return False
        self.next_poll = now + self.poll_s
        if self.status() in (None, "RUNNING", "FINISHED", "ERRORED", "ABORTED"):
            self.since = now
            return False
        return now - self.since > self.wait_s
