"""The main job on a real local Ray cluster with real DeepSpeed engines (CPU, gloo).

One `ray start --head --block` on 127.0.0.1 (free ports, short temp dir) serves the whole module; it is
stopped by its PID. Tests: data-parallel maths (1 vs 2 workers, ZeRO 0 and 2), a killed worker
(Ray restarts the group from the last checkpoint), SIGTERM to the driver and resume, `ray job submit`,
and training data + checkpoints on a real S3 server.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from digan.config import load_config, to_dict
from digan.distributed import checkpoint as ckpt
from ray_nodes import VENV_BIN, base_env, start_head

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent

# demo-32 shrunk so that a step takes well under a second on a contended 2-core machine.
TINY = ["model.channel_max=32", "model.d_channel_max=32", "model.z_dim=64", "model.w_dim=64",
        "model.motion_z_dim=64", "model.coord_emb_size=16", "train.batch_size=8", "metrics.metrics=[]",
        "train.log_every_steps=1", "data.num_workers=0", "train.sample_kimg=1000",
        # the pinned numbers were made with these, and the element-wise tolerances below are for weights stored
        # at their scale (demo-32's 0.01 stores the frequency predictor's weights x100, rounding alike)
        "model.fourier_lr_mult=1.0", "optim.lr=0.0025", "optim.ema_kimg=1.0"]
BATCH = 8


@dataclass
class Cluster:
    gcs_address: str
    dashboard_url: str
    env: dict[str, str]  # environment for subprocesses that attach to it (RAY_ADDRESS set)


@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    """A real Ray head on 127.0.0.1 for this module; this process is attached as a driver.

    Its processes get the test S3 server's endpoint and credentials in their environment, the way
    cluster nodes get theirs from their own AWS configuration.
    """
    import ray

    tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's unix sockets have a path limit
    env = base_env(tmp)
    env.update(s3_server.env)
    head, address, dashboard_url = start_head(tmp, env, num_cpus=3)
    # RAY_ADDRESS for every process of the cluster: Ray Train's placement-group cleaner queries the
    # state API without an address and fails when other Ray clusters run on the same machine.
    env["RAY_ADDRESS"] = address
    try:
        for k in ("RAY_AUTH_MODE", "DS_ACCELERATOR"):
            os.environ[k] = env[k]
        for attempt in range(3):  # on a heavily loaded machine the GCS can miss ray.init's first deadline
            try:
                ray.init(address=address, logging_level="WARNING")
                break
            except (ConnectionError, ray.exceptions.RpcError):
                if attempt == 2:
                    raise
                time.sleep(5)
        yield Cluster(address, dashboard_url, env)
    finally:
        ray.shutdown()
        head.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def tiny_config(*overrides: str):
    return load_config("demo-32", [*TINY, *overrides])


def read_stats(run_dir: Path) -> list[dict]:
    path = run_dir / "stats.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def train_state(checkpoint_dir: str | Path) -> dict:
    return ckpt.load_weights_only(Path(checkpoint_dir) / ckpt.TRAIN_STATE_FILE)


def assert_segments_tile(state: dict, target: int) -> None:
    """The stretches of steps that ended in checkpoints cover [0, target) once each: no gap, no overlap."""
    seg = state["segments"]
    assert seg[0][0] == 0 and seg[-1][1] == target, seg
    assert all(a[1] == b[0] for a, b in zip(seg, seg[1:])), seg
    assert state["step"] == target and state["cur_nimg"] == target * BATCH


# ----------------------------------------------------------------------------------------------------
# Data-parallel maths: 1 worker and 2 workers take one step on the same global batch.


# name -> (ZeRO stage, optimiser overrides, model overrides). Adam's first step, lr * g / (|g| + eps), does
# not see the scale of g, so with the official settings a sum-instead-of-mean reduction would go unnoticed;
# with eps=1 and |g| << 1 the step is ~lr * g (SGD-like) and any error in the gradient maths shows in full.
# "zero0-preset" takes demo-32's own rate and frequency-predictor multiplier (TINY pins the official ones).
DP_VARIANTS = {"zero0-sgdlike": (0, {"eps": 1.0, "lr": 0.5}, {}), "zero2-sgdlike": (2, {"eps": 1.0, "lr": 0.5}, {}),
               "zero0": (0, {}, {}), "zero2": (2, {}, {}),
               "zero0-preset": (0, {"lr": 0.001}, {"fourier_lr_mult": 0.01})}


def _dp_loop(config: dict) -> None:
    """Per worker, for every variant: build the real runtime, take one step on a fixed global batch."""
    import ray.train
    import ray.train.torch

    from digan.config import from_dict
    from digan.distributed.utils import dist_mean
    from digan.distributed.runtime import GANRuntime

    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    g = torch.Generator().manual_seed(1234)
    pair = torch.rand(BATCH, 2, 3, 32, 32, generator=g) * 2 - 1  # the global batch of real pairs
    dt = torch.rand(BATCH, generator=g)
    # Each rank gets its slice of the global batch in global order; the runtime orders it for D's
    # minibatch-stddev groups itself (`recipe.group_order`: 0..7 -> 0,4,1,5,2,6,3,7 on one worker).
    ids = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    for name, (stage, optim, model) in DP_VARIANTS.items():
        d = dict(config["config"])
        d["dist"] = dict(d["dist"], zero_stage=stage)
        d["optim"] = dict(d["optim"], **optim)
        d["model"] = dict(d["model"], **model)
        rt = GANRuntime(from_dict(d), rank, world, device)
        stats = rt.train_step(pair[ids], dt[ids])
        out = {f"G.{k}": v.detach().cpu().clone() for k, v in rt.G.state_dict().items()}
        out |= {f"D.{k}": v.detach().cpu().clone() for k, v in rt.D.state_dict().items()}
        out |= {f"G_ema.{k}": v.detach().cpu().clone() for k, v in rt.G_ema.state_dict().items()}
        # each rank's loss is the mean over its samples: the global mean is the mean over ranks
        losses = dist_mean({"loss_D": stats["loss_D"].item(), "loss_G": stats["loss_G"].item()})
        out["loss_D"], out["loss_G"] = torch.tensor(losses["loss_D"]), torch.tensor(losses["loss_G"])
        if rank == 0:
            torch.save(out, os.path.join(config["out_dir"], f"w{world}_{name}.pt"))
    ray.train.report({"done": 1})


def _run_dp(cluster: Cluster, num_workers: int, out_dir: Path, cfg) -> None:
    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tests/ is not importable on workers
    TorchTrainer(_dp_loop, train_loop_config={"config": to_dict(cfg), "out_dir": str(out_dir)},
                 scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=False),
                 run_config=RunConfig(name=f"dp{num_workers}", storage_path=str(out_dir / "ray"),
                                      worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu",
                                                                       "RAY_AUTH_MODE": "disabled"}})).fit()


def test_one_and_two_workers_take_the_same_step(ray_cluster, tmp_path):
    """Same global batch, same per-sample latents and augmentation: 2 workers x 4 == 1 worker x 8, at ZeRO 0
    and 2, with DiffAugment (color, translation, cutout) and xflip on: their draws are keyed by global sample
    index like the fakes' latents, and each process orders its rows for D's minibatch-stddev groups. R1 runs
    (step 0 is an R1 step): with the default separate schedule the D engine takes two backward/step pairs in
    this iteration (D step, R1 step). One variant takes demo-32's own rate and frequency-predictor multiplier
    (0.01: those weights are stored x100), the others the official ones the pinned numbers were made with.
    """
    for n in (1, 2):
        cfg = tiny_config("loss.diffaug_policy=color,translation,cutout", "loss.xflip=true", f"dist.num_workers={n}")
        _run_dp(ray_cluster, n, tmp_path, cfg)
    init = tiny_config()
    from digan.models import build_generator

    torch.manual_seed(init.train.seed)
    G0 = build_generator(init.model).state_dict()
    for name in DP_VARIANTS:
        one = torch.load(tmp_path / f"w1_{name}.pt", weights_only=True)
        two = torch.load(tmp_path / f"w2_{name}.pt", weights_only=True)
        assert one.keys() == two.keys()
        torch.testing.assert_close(two["loss_D"], one["loss_D"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(two["loss_G"], one["loss_G"], rtol=1e-5, atol=1e-6)
        for k in one:
            if k.endswith("w_avg"):
                # the mapping net's running mean of w (truncation centre) is a per-rank buffer, updated
                # from the local batch, as in StyleGAN2-ADA (its DDP check skips `.*\.w_avg` too)
                continue
            diff = (two[k].double() - one[k].double()).abs()
            if name.endswith("sgdlike"):
                # the gradient maths: float32 rounding of 0.5 * g steps (measured max 2.7e-6 without
                # augmentation, 2.1e-5 with DiffAugment and xflip on: sums that cancel in D's bias and
                # input-layer gradients; the same comparison of D's gradients in float64 agrees to 1e-7)
                assert diff.max() <= 5e-5, f"{name}: {k} differs by {diff.max():.3g}"
            else:
                # Where |g| is near eps, rounding-level gradient differences (a sum over 8 samples on
                # one rank vs 4 + 4 on two) move a weight by a visible fraction of one lr step (lr).
                # With R1 in its own step, D's main step has only the (smaller) adversarial gradient and
                # the R1 step is Adam's second, normalised by both: more elements sit near eps than when
                # R1 was folded in (then: max 5e-5). Measured: 0.07 % of all elements beyond 2e-6, at
                # most 1 % of a tensor (D_I's convs), max 4.5e-4 without augmentation; with DiffAugment
                # and xflip on an element whose gradient is rounding noise can step the other way (max
                # 2.8e-3: Adam's first step is lr * g / (|g| + eps), at most 2 lr apart). A missing
                # reduction would move most elements by ~lr: the count below is the check.
                lr = DP_VARIANTS[name][1].get("lr", init.optim.lr)
                assert diff.max() <= 2 * lr + 1e-6, f"{name}: {k} differs by {diff.max():.3g}"
                assert (diff > 2e-6).sum() <= max(3, diff.numel() // 50), f"{name}: {k}"
        # the step did something: most of G's weights moved away from their initial values
        moved = sum(int(not torch.equal(one[f"G.{k}"], v)) for k, v in G0.items() if v.is_floating_point())
        assert moved > len(G0) // 2, name


def _zero_loop(config: dict) -> None:
    """ZeRO-2 on fixed global batches: phase "save" takes 2 steps and checkpoints the engines; phase "load"
    resumes them (on this run's worker count), gathers the whole optimizer state and takes step 3."""
    import ray.train
    import ray.train.torch

    from digan.config import from_dict
    from digan.distributed.utils import barrier
    from digan.distributed.runtime import GANRuntime

    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    g = torch.Generator().manual_seed(1234)
    batches = [(torch.rand(BATCH, 2, 3, 32, 32, generator=g) * 2 - 1, torch.rand(BATCH, generator=g)) for _ in range(3)]
    ids = slice(rank * BATCH // world, (rank + 1) * BATCH // world)  # as in _dp_loop
    rt = GANRuntime(from_dict(config["config"]), rank, world, ray.train.torch.get_device())
    if config["phase"] == "save":
        for pair, dt in batches[:2]:
            rt.train_step(pair[ids], dt[ids])
        rt.save_engines(config["ckpt_dir"])
        barrier()
    else:
        rt.load_engines(config["ckpt_dir"], same_world=world == 2)
        rt.step = 2
        full = {"G": rt.g_updater.full_optimizer_state(), "D": rt.d_updater.full_optimizer_state()}
        pair, dt = batches[2]
        rt.train_step(pair[ids], dt[ids])
        after = {f"G.{k}": v.detach().cpu().clone() for k, v in rt.G.state_dict().items()}
        after |= {f"D.{k}": v.detach().cpu().clone() for k, v in rt.D.state_dict().items()}
        if rank == 0:
            torch.save({"full": full, "after": after}, os.path.join(config["out_dir"], f"load-w{world}.pt"))
    ray.train.report({"done": 1})


def test_zero2_checkpoint_resumes_on_another_worker_count(ray_cluster, tmp_path):
    """A ZeRO-2 checkpoint of 2 workers resumes on 1: the whole fp32 weights and Adam moments it restores equal
    the ones 2 workers restore from DeepSpeed's own files, and the next step lands on the same weights."""
    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    for phase, n in (("save", 2), ("load", 1), ("load", 2)):
        cfg = tiny_config("loss.diffaug_policy=", "loss.xflip=false", "dist.zero_stage=2", f"dist.num_workers={n}")
        TorchTrainer(_zero_loop, train_loop_config={"config": to_dict(cfg), "phase": phase, "out_dir": str(tmp_path),
                                                    "ckpt_dir": str(tmp_path / "ckpt")},
                     scaling_config=ScalingConfig(num_workers=n, use_gpu=False),
                     run_config=RunConfig(name=f"zero-{phase}{n}", storage_path=str(tmp_path / "ray"),
                                          worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu",
                                                                           "RAY_AUTH_MODE": "disabled"}})).fit()
    assert (tmp_path / "ckpt" / ckpt.FULL_OPTIMIZER_FILE).exists() is False  # beside each engine's files only
    one = torch.load(tmp_path / "load-w1.pt", weights_only=True)
    two = torch.load(tmp_path / "load-w2.pt", weights_only=True)
    for net in ("G", "D"):
        a, b = one["full"][net], two["full"][net]
        assert a["step"] == b["step"] == (2.0 if net == "G" else 3.0)  # D: 2 steps + the R1 step of step 0
        for name in b["params"]:
            for key in ("param", "exp_avg", "exp_avg_sq"):
                assert torch.equal(a["params"][name][key], b["params"][name][key]), (net, name, key)
        assert sum(float(v["exp_avg_sq"].abs().sum()) for v in a["params"].values()) > 0
    for k, v in two["after"].items():
        if k.endswith("w_avg"):
            continue  # a per-rank buffer (see test_one_and_two_workers_take_the_same_step)
        diff = (one["after"][k].double() - v.double()).abs()
        assert diff.max() <= 1e-3 and (diff > 2e-6).sum() <= max(3, diff.numel() // 50), (k, float(diff.max()))


PINNED_RAY = REPO / "tests" / "golden" / "pinned_steps_ray2.json"


def _pin_loop(config: dict) -> None:
    """4 steps of the distributed runtime (DeepSpeed ZeRO-0, augmentation on) on fixed global batches."""
    import ray.train
    import ray.train.torch

    from digan.config import from_dict
    from digan.distributed.utils import dist_mean
    from digan.distributed.runtime import GANRuntime

    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    rt = GANRuntime(from_dict(config["config"]), rank, world, ray.train.torch.get_device())
    g = torch.Generator().manual_seed(1234)
    steps = []
    for _ in range(4):
        pair, dt = torch.rand(BATCH, 2, 3, 32, 32, generator=g) * 2 - 1, torch.rand(BATCH, generator=g)
        ids = rt.local_sample_ids()
        stats = rt.train_step(pair[ids], dt[ids])
        steps.append(dist_mean({k: float(stats[k]) for k in ("loss_G", "loss_D", "D_M_real", "D_I_fake")}))
    sums = {}
    for name, net in (("G", rt.G), ("D", rt.D), ("G_ema", rt.G_ema)):
        flat = torch.cat([p.detach().double().flatten() for p in net.parameters()])
        sums[name] = {"sum": float(flat.sum()), "sum_sq": float(flat.square().sum())}
    if rank == 0:
        Path(config["out"]).write_text(json.dumps({"steps": steps, "checksums": sums}, indent=1) + "\n")
    ray.train.report({"done": 1})


def test_two_worker_steps_match_the_pinned_numbers(ray_cluster, tmp_path):
    """The 2-worker counterpart of tests/test_pinned_steps.py (losses and checksums of 4 steps of the real
    runtime: DeepSpeed engines, latents and augmentation keyed by sample). DIGAN_WRITE_PINNED=1 rewrites
    the golden file, only when a change means to change the numbers."""
    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    out = tmp_path / "pinned.json"
    TorchTrainer(_pin_loop, train_loop_config={"config": to_dict(tiny_config("dist.num_workers=2")), "out": str(out)},
                 scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
                 run_config=RunConfig(name="pin", storage_path=str(tmp_path / "ray"),
                                      worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu",
                                                                       "RAY_AUTH_MODE": "disabled"}})).fit()
    got = json.loads(out.read_text())
    if os.environ.get("DIGAN_WRITE_PINNED") == "1":
        PINNED_RAY.write_text(out.read_text())
    pinned = json.loads(PINNED_RAY.read_text())
    for a, b in zip(got["steps"], pinned["steps"], strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    for net, sums in pinned["checksums"].items():
        assert got["checksums"][net] == pytest.approx(sums, rel=1e-6, abs=1e-6), net


# ----------------------------------------------------------------------------------------------------
# A worker killed mid-run: Ray restarts the group from the last checkpoint and the run reaches its target.


def _kill_one_worker_after(cluster: Cluster, run_dir: Path, step: int, killed: dict) -> None:
    """Find the two Train workers' PIDs, then SIGKILL one the moment checkpoint `step` is complete."""
    from ray.util.state import list_actors

    deadline = time.monotonic() + 600
    pids: list[int] = []
    while len(pids) < 2 and time.monotonic() < deadline:
        workers = list_actors(address=cluster.dashboard_url,
                              filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        pids = sorted(int(a.pid) for a in workers)
        time.sleep(0.5)
    target = run_dir / ckpt.checkpoint_name(step) / ckpt.GENERATOR_FILE
    while time.monotonic() < deadline and not target.exists():
        time.sleep(0.05)
    os.kill(pids[-1], signal.SIGKILL)
    killed["pid"] = pids[-1]


def _launch_killing_one_worker(cluster: Cluster, cfg, run_dir: Path, after_step: int):
    """The main job's launch() while one Train worker is SIGKILLed once checkpoint `after_step` is complete."""
    from digan.train import launch

    killed: dict = {}
    killer = threading.Thread(target=_kill_one_worker_after, args=(cluster, run_dir, after_step, killed), daemon=True)
    killer.start()
    out = launch(cfg, handle_signals=False)
    killer.join(timeout=5)
    assert "pid" in killed, "no worker was killed"
    return out


def test_killed_worker_restarts_from_last_checkpoint(ray_cluster, tmp_path):
    target, every = 10, 2
    cfg = tiny_config(f"train.total_kimg={target * BATCH / 1000}", f"train.checkpoint_kimg={every * BATCH / 1000}",
                      "dist.max_failures=2", f"train.storage_path={tmp_path}", "train.run_name=kill",
                      "train.keep_checkpoints=2")
    run_dir = tmp_path / "kill"
    out = _launch_killing_one_worker(ray_cluster, cfg, run_dir, after_step=4)

    assert out.step == target and out.checkpoint == str(run_dir / ckpt.checkpoint_name(target))
    state = train_state(out.checkpoint)
    assert_segments_tile(state, target)
    assert len(state["resumed_from"]) == 1, state["resumed_from"]
    resumed = state["resumed_from"][0]
    assert resumed % every == 0 and 4 <= resumed < target
    # stats.jsonl holds each step once: the first attempt's lines up to the resume point (its lines for
    # the steps after it, rolled back with the kill, were dropped at the resume), then the second's.
    stats = read_stats(run_dir)
    first = [s["step"] for s in stats if s["restarts"] == 0]
    second = [s["step"] for s in stats if s["restarts"] == 1]
    assert first == list(range(1, resumed + 1))
    assert second == list(range(resumed + 1, target + 1))
    # each line is one iteration (log_every_steps=1): the separate R1 step on every 4th iteration from 0
    # (demo-32's loss.r1_interval) makes D take 2 optimizer steps there, 1 elsewhere, before and after resume
    r1_iteration = [(s["step"] - 1) % 4 == 0 for s in stats]
    assert [s["d_steps"] for s in stats] == [2.0 if r else 1.0 for r in r1_iteration]
    assert [("r1" in s) for s in stats] == r1_iteration
    # keep-last-K: only the 2 newest checkpoints are left
    assert [s for s, _ in ckpt.list_checkpoints(__import__("pyarrow.fs").fs.LocalFileSystem(), str(run_dir))] \
        == [target - every, target]


def test_time_based_checkpoints_bound_the_lost_work(ray_cluster, tmp_path):
    """train.checkpoint_minutes: with a kimg interval longer than the run, checkpoints still come every
    few seconds of wall time (rank 0's clock, decided alike on both ranks), each one complete."""
    import pyarrow.fs as pafs

    from digan.train import launch

    target = 24
    cfg = tiny_config(f"train.total_kimg={target * BATCH / 1000}", "train.checkpoint_kimg=1000",
                      "train.checkpoint_minutes=0.03", f"train.storage_path={tmp_path}", "train.run_name=clock",
                      "train.keep_checkpoints=100", "dist.num_workers=2")
    t0 = time.monotonic()
    out = launch(cfg, handle_signals=False)
    wall = time.monotonic() - t0
    steps = [s for s, _ in ckpt.list_checkpoints(pafs.LocalFileSystem(), str(tmp_path / "clock"))]
    assert steps[-1] == target and out.step == target
    # the run itself took several 1.8 s periods: more than the final checkpoint, none at a kimg boundary
    assert len(steps) >= 2 and all(0 < s <= target for s in steps), (steps, wall)
    for s in steps:
        assert train_state(tmp_path / "clock" / ckpt.checkpoint_name(s))["step"] == s


def test_exact_epochs_on_hand_written_shards_across_a_killed_worker(ray_cluster, tmp_path):
    """data.resampled=false on two ranks, on shards written by hand from docs/shard-format.md: a worker
    killed mid-epoch, the run resumed from the checkpoint inside that epoch; keeping each step's last
    attempt, every clip is seen exactly once per epoch across the ranks (48 clips = 6 steps of 2 x 4)."""
    from test_data_faults import contract_dataset

    clips = contract_dataset(tmp_path / "shards", 48, 5)
    target, every = 12, 2
    cfg = tiny_config(f"train.total_kimg={target * BATCH / 1000}", f"train.checkpoint_kimg={every * BATCH / 1000}",
                      "dist.max_failures=2", f"train.storage_path={tmp_path}", "train.run_name=exact",
                      f"data.source={tmp_path / 'shards'}", "data.resampled=false", "data.num_workers=1",
                      "data.shuffle_buffer=8", "train.log_data_keys=true")
    run_dir = tmp_path / "exact"
    out = _launch_killing_one_worker(ray_cluster, cfg, run_dir, after_step=4)
    assert out.step == target
    resumed = train_state(out.checkpoint)["resumed_from"]
    assert len(resumed) == 1 and resumed[0] % 6 != 0, resumed  # resumed inside an epoch
    for rank in range(2):
        lines = [json.loads(ln) for ln in (run_dir / f"data_keys-rank{rank}.jsonl").read_text().splitlines()]
        assert {ln["restarts"] for ln in lines} == {0, 1}
    last: dict[tuple[int, int], dict] = {}  # (rank, step) -> the line of the attempt that was kept
    for rank in range(2):
        for ln in map(json.loads, (run_dir / f"data_keys-rank{rank}.jsonl").read_text().splitlines()):
            if ln["restarts"] == 1 or ln["step"] <= resumed[0]:
                last[(rank, ln["step"])] = ln
    assert sorted(last) == [(r, s) for r in range(2) for s in range(1, target + 1)]
    for epoch in (0, 1):
        keys = [k for ln in last.values() if ln["epoch"] == epoch for k in ln["keys"]]
        assert sorted(keys) == sorted(clips), f"epoch {epoch}: each clip exactly once"
    assert sorted({ln["epoch"] for ln in last.values()}) == [0, 1]


# ----------------------------------------------------------------------------------------------------
# SIGTERM to the driver: checkpoint at the next step boundary, exit 0; the rerun resumes.


def _driver(cluster: Cluster, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "digan.train", "--config", "demo-32", *TINY, *args],
                            cwd=REPO, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigterm_checkpoints_and_rerun_resumes(ray_cluster, tmp_path):
    common = [f"train.storage_path={tmp_path}", "train.run_name=preempt", "train.checkpoint_kimg=1000"]
    run_dir = tmp_path / "preempt"
    proc = _driver(ray_cluster, "train.total_kimg=1000", *common)
    try:
        deadline = time.monotonic() + 300
        while max((s["step"] for s in read_stats(run_dir)), default=0) < 2:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert "stopped after" in output and "rerun the same command to resume" in output
    saved = [s for s, _ in ckpt.list_checkpoints(__import__("pyarrow.fs").fs.LocalFileSystem(), str(run_dir))]
    assert len(saved) == 1  # the periodic interval is never reached: this is the SIGTERM checkpoint
    stop_step = saved[0]
    state = train_state(run_dir / ckpt.checkpoint_name(stop_step))
    assert state["stopped_by_signal"] and state["step"] == stop_step >= 2
    assert max(s["step"] for s in read_stats(run_dir)) == stop_step  # nothing ran after the checkpoint

    # Start it again (in this process, to save an interpreter start-up): it resumes from the saved step.
    from digan.train import launch

    target = stop_step + 2
    out = launch(tiny_config(f"train.total_kimg={target * BATCH / 1000}", *common), handle_signals=False)
    assert out.step == target and not out.stopped
    state = train_state(run_dir / ckpt.checkpoint_name(target))
    assert state["resumed_from"] == [stop_step] and not state["stopped_by_signal"]
    assert_segments_tile(state, target)
    resumed = [s["step"] for s in read_stats(run_dir) if s["restarts"] == 1]
    assert resumed == list(range(stop_step + 1, target + 1))


# ----------------------------------------------------------------------------------------------------
# `ray job submit`: the README's cluster command, on the module's cluster.


def test_ray_job_submit_succeeds(ray_cluster, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    sid = f"digan-test-{os.getpid()}-{int(time.time())}"
    runtime_env = {"excludes": [".venv", ".git", "runs", "*.egg-info", "__pycache__", ".pytest_cache"],
                   "env_vars": {"DS_ACCELERATOR": "cpu", "RAY_AUTH_MODE": "disabled"}}
    cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", ray_cluster.dashboard_url, "--submission-id", sid,
           "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env), "--",
           "python", "-m", "digan.train", "--config", "demo-32", *TINY, f"train.storage_path={tmp_path}",
           "train.run_name=job", f"train.total_kimg={2 * BATCH / 1000}"]
    out = subprocess.run(cmd, cwd=REPO, env=ray_cluster.env, capture_output=True, text=True, timeout=600)
    client = JobSubmissionClient(ray_cluster.dashboard_url)
    assert client.get_job_status(sid) == JobStatus.SUCCEEDED, out.stdout[-3000:] + out.stderr[-3000:]
    logs = client.get_job_logs(sid)
    run_dir = tmp_path / "job"
    assert f"checkpoint:   {run_dir / ckpt.checkpoint_name(2)}" in logs, logs[-2000:]
    assert (run_dir / ckpt.checkpoint_name(2) / ckpt.GENERATOR_FILE).is_file()
    assert f"sample video: {run_dir / 'samples' / ckpt.checkpoint_name(2)}.mp4" in logs
    assert (run_dir / "samples" / f"{ckpt.checkpoint_name(2)}.mp4").stat().st_size > 1000
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


# ----------------------------------------------------------------------------------------------------
# Training data streamed from a real S3 server (SeaweedFS), checkpoints and logs written back to it.


def test_train_from_s3_with_s3_storage(ray_cluster, s3_env, tmp_path):
    import s3fs

    from digan.data import ensure_demo_shards
    from digan.train import launch

    s3 = s3fs.S3FileSystem(endpoint_url=s3_env.endpoint_url, config_kwargs={"s3": {"addressing_style": "path"}})
    local = ensure_demo_shards(tiny_config().data, 32)
    s3.put(f"{local}/", f"{s3_env.bucket}/demo32/", recursive=True)
    cfg = tiny_config(f"data.source={s3_env.url('demo32')}", f"data.s3_endpoint_url={s3_env.endpoint_url}",
                      "data.num_workers=1", f"train.storage_path={s3_env.url('runs')}", "train.run_name=s3run",
                      f"train.total_kimg={2 * BATCH / 1000}", "metrics.metrics=[fvd16]", "metrics.num_videos=8",
                      "metrics.detector=proxy")
    out = launch(cfg, handle_signals=False)
    run = f"{s3_env.bucket}/runs/s3run"
    assert out.checkpoint == f"s3://{run}/{ckpt.checkpoint_name(2)}" and out.step == 2
    assert out.sample_video == f"s3://{run}/samples/{ckpt.checkpoint_name(2)}.mp4"
    names = {p.rsplit("/", 1)[-1] for p in s3.find(f"{run}/{ckpt.checkpoint_name(2)}")}
    assert {ckpt.GENERATOR_FILE, ckpt.TRAIN_STATE_FILE, "rank_state_00000.pt", "rank_state_00001.pt",
            "mp_rank_00_model_states.pt"} <= names
    stats = [json.loads(line) for line in s3.cat_file(f"{run}/stats.jsonl").decode().splitlines()]
    assert [s["step"] for s in stats] == [1, 2] and stats[-1]["records_read"] > 0
    assert stats[-1]["skipped_records"] == 0
    assert "proxy_fvd16" in stats[-1] and stats[-1]["proxy_fvd16"] > 0  # training-time metric, labelled proxy
    # ... with what it was measured by in the same record
    assert (stats[-1]["metrics_detector"], stats[-1]["metrics_protocol"], stats[-1]["metrics_num_videos"]) == \
        ("proxy", "tfhub", 8)
    assert s3.find(f"{run}/tensorboard")
    with s3.open(f"{run}/{ckpt.checkpoint_name(2)}/{ckpt.GENERATOR_FILE}", "rb") as f:
        export = torch.load(f, weights_only=True)
    assert export["step"] == 2 and export["config"]["data"]["source"] == s3_env.url("demo32")


# ----------------------------------------------------------------------------------------------------
# `ray job stop`, the way operators stop jobs: SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S.

SLOW_BATCH = 256  # ~5 s a step of demo-32 on one core (128 took 2.6 s on a quiet host: under the 3 s grace)
SLOW = ["dist.num_workers=1", f"train.batch_size={SLOW_BATCH}", "train.total_kimg=1000", "train.checkpoint_kimg=1000"]


def _submit(cluster: Cluster, sid: str, env_vars: dict[str, str], *overrides: str) -> None:
    runtime_env = {"excludes": [".venv", ".git", "runs", "*.egg-info", "__pycache__", ".pytest_cache"],
                   "env_vars": {"DS_ACCELERATOR": "cpu", "RAY_AUTH_MODE": "disabled", **env_vars}}
    cmd = [str(VENV_BIN / "ray"), "job", "submit", "--no-wait", "--address", cluster.dashboard_url, "--submission-id",
           sid, "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env), "--",
           "python", "-m", "digan.train", "--config", "demo-32", *TINY, *overrides]
    subprocess.run(cmd, cwd=REPO, env=cluster.env, check=True, capture_output=True, timeout=120)


def _wait_job(cluster: Cluster, sid: str, timeout: float) -> str:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard_url)
    deadline = time.monotonic() + timeout
    while not client.get_job_status(sid).is_terminal():
        assert time.monotonic() < deadline, f"job {sid} still {client.get_job_status(sid)} after {timeout} s"
        time.sleep(1)
    return str(client.get_job_status(sid))


def _wait_steps(run_dir: Path, n: int, timeout: float = 420) -> list[dict]:
    deadline = time.monotonic() + timeout
    while len(stats := read_stats(run_dir)) < n:
        assert time.monotonic() < deadline, f"fewer than {n} steps after {timeout} s"
        time.sleep(0.5)
    return stats


def _ray_job_stop(cluster: Cluster, sid: str) -> None:
    subprocess.run([str(VENV_BIN / "ray"), "job", "stop", "--address", cluster.dashboard_url, sid],
                   env=cluster.env, check=True, capture_output=True, timeout=300)


def test_ray_job_stop_with_the_documented_grace_checkpoints_and_resumes(ray_cluster, tmp_path):
    """Steps longer than `ray job stop`'s default 3 s grace; with RAY_JOB_STOP_WAIT_TIME_S in the job's
    runtime env (README) the stop writes a checkpoint at the step it reached, and a resubmission resumes
    from it; with the default grace the time-based checkpoints bound what is lost."""
    import pyarrow.fs as pafs

    common = [*SLOW, f"train.storage_path={tmp_path}"]
    run_dir = tmp_path / "graceful"
    _submit(ray_cluster, "graceful", {"RAY_JOB_STOP_WAIT_TIME_S": "300"}, *common, "train.run_name=graceful")
    stats = _wait_steps(run_dir, 2)
    step_s = 1 / stats[-1]["it_per_s"]
    assert step_s > 3, f"a step takes {step_s:.1f} s: not longer than the default grace"
    _ray_job_stop(ray_cluster, "graceful")
    assert _wait_job(ray_cluster, "graceful", 300) == "STOPPED"
    saved = [s for s, _ in ckpt.list_checkpoints(pafs.LocalFileSystem(), str(run_dir))]
    last = max(s["step"] for s in read_stats(run_dir))
    assert saved == [last], (saved, last)  # the checkpoint of the stop, at the last step taken
    assert train_state(run_dir / ckpt.checkpoint_name(last))["stopped_by_signal"]

    _submit(ray_cluster, "graceful-2", {}, *SLOW[:-2], f"train.storage_path={tmp_path}", "train.run_name=graceful",
            f"train.total_kimg={(last + 1) * SLOW_BATCH / 1000}", "train.checkpoint_kimg=1000")
    assert _wait_job(ray_cluster, "graceful-2", 420) == "SUCCEEDED"
    state = train_state(run_dir / ckpt.checkpoint_name(last + 1))
    assert state["resumed_from"] == [last] and state["step"] == last + 1

    # The default grace (3 s): SIGKILL before the step in flight ends; the time-based checkpoint bounds the loss.
    run_dir = tmp_path / "default"
    _submit(ray_cluster, "default", {}, *common, "train.run_name=default", "train.checkpoint_minutes=0.1")
    deadline = time.monotonic() + 420
    while not ckpt.list_checkpoints(pafs.LocalFileSystem(), str(run_dir)):
        assert time.monotonic() < deadline, "no time-based checkpoint"
        time.sleep(0.5)
    _wait_steps(run_dir, max(s["step"] for s in read_stats(run_dir)) + 1)
    _ray_job_stop(ray_cluster, "default")
    assert _wait_job(ray_cluster, "default", 300) == "STOPPED"
    stats = read_stats(run_dir)
    latest = max(s for s, _ in ckpt.list_checkpoints(pafs.LocalFileSystem(), str(run_dir)))
    lost = [s for s in stats if s["step"] > latest]
    step_s = 1 / stats[-1]["it_per_s"]
    assert sum(1 / s["it_per_s"] for s in lost) <= 6 + 2 * step_s, (latest, [s["step"] for s in stats])
