"""Unit tests of the training plumbing that need no Ray: ds_config, the DeepSpeed updater on a 1-rank gloo
group, keyed latents, checkpoint files and find-latest, RNG state, the CLI's --dry-run."""

import json
import os
import random
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist

from digan.config import DistConfig, load_config, to_dict
from digan.distributed import checkpoint as ckpt
from digan.distributed.deepspeed import DeepSpeedUpdater, build_ds_config, initialize_engine
from digan.distributed.utils import rng_state, set_rng_state
from digan.distributed.worker import _crossed
from digan.training.latents import KeyedLatents

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ds_config_batch_keys_precision_and_stage():
    ds = build_ds_config(DistConfig(zero_stage=2, precision="bf16"), micro_batch_per_worker=4)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 1
    assert "train_batch_size" not in ds  # any world size validates
    assert ds["zero_optimization"] == {"stage": 2} and ds["bf16"] == {"enabled": True} and "fp16" not in ds
    assert "optimizer" not in ds  # client torch Adam only (a DS-config Adam JIT-compiles for minutes)
    ds16 = build_ds_config(DistConfig(precision="fp16"), 2)
    assert ds16["fp16"]["enabled"] and "bf16" not in ds16
    assert "bf16" not in build_ds_config(DistConfig(), 2) and "fp16" not in build_ds_config(DistConfig(), 2)


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="module")
def one_rank_group():
    """A real 1-rank gloo process group (what Ray creates before DeepSpeed reuses it).

    One per module: DeepSpeed caches the group it wrapped, so it cannot be destroyed and re-created
    between engines of one process.
    """
    port = _free_port()
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.LeakyReLU(0.2), torch.nn.Linear(16, 1))


def _loss(m, x, poison: bool):
    """Logistic loss + an R1-style double-backward term; `poison` makes one weight's gradient NaN."""
    x = x.detach().requires_grad_(True)
    y = m(x)
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    loss = torch.nn.functional.softplus(y).mean() + g.square().sum(1).mean()
    if poison:
        loss = loss + m[0].weight[0, 0] * float("nan")
    return loss


@pytest.mark.parametrize("stage", [0, 2])
def test_deepspeed_updater_matches_plain_adam_and_sanitizes_nan(one_rank_group, stage):
    """engine.backward/step through the updater == plain Adam with nan_to_num + clamp (NaN on step 1).

    Under ZeRO-2 DeepSpeed would skip a step with a NaN gradient; the updater's hooks zero it first.
    """
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    ref = _net()
    opt = torch.optim.Adam(ref.parameters(), lr=1e-2, betas=(0.0, 0.99))
    for s in range(3):
        opt.zero_grad()
        _loss(ref, x, poison=s == 1).backward()
        for p in ref.parameters():
            torch.nan_to_num_(p.grad, nan=0.0, posinf=1e5, neginf=-1e5).clamp_(-1e5, 1e5)
        opt.step()

    net = _net()
    engine = initialize_engine(net, torch.optim.Adam(net.parameters(), lr=1e-2, betas=(0.0, 0.99)),
                               build_ds_config(DistConfig(zero_stage=stage), 8))
    up = DeepSpeedUpdater(engine, grad_clamp=1e5)
    for s in range(3):
        up.zero_grad()
        up.backward(_loss(up.module, x, poison=s == 1))
        up.step()
        assert up.step_applied()
    for a, b in zip(ref.parameters(), up.module.parameters()):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b.detach(), a.detach(), rtol=0, atol=1e-6)


def test_keyed_latents_do_not_depend_on_how_the_batch_is_split():
    full = KeyedLatents(seed=3, global_batch=8)
    full.begin_step(5, torch.arange(8))
    z, z_M, t = full.draw(4, 3)
    halves = []
    for r in range(2):
        k = KeyedLatents(seed=3, global_batch=8)
        k.begin_step(5, torch.arange(4 * r, 4 * r + 4))
        halves.append(k.draw(4, 3))
    torch.testing.assert_close(torch.cat([h[0] for h in halves]), z, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([h[1] for h in halves]), z_M, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([h[2] for h in halves]), t, rtol=0, atol=0)
    assert (t[:, 0] <= t[:, 1]).all() and ((t >= 0) & (t <= 1)).all()
    # a fresh draw per phase (G step, then D step) and per step
    z2, _, _ = full.draw(4, 3)
    full.begin_step(6, torch.arange(8))
    z3, _, _ = full.draw(4, 3)
    assert not torch.equal(z, z2) and not torch.equal(z, z3)


def test_crossed_intervals():
    assert _crossed(0, 16, 0.016) and not _crossed(16, 24, 0.016) and _crossed(24, 32, 0.016)
    assert not _crossed(0, 1999, 2.0) and _crossed(1999, 2000, 2.0)


def test_atomic_save_and_find_latest_only_complete(tmp_path):
    import pyarrow.fs as pafs

    from digan.storage import publish_file

    fs = pafs.LocalFileSystem()
    run = tmp_path / "run"
    for step, complete in [(2, True), (4, True), (6, False)]:
        d = run / ckpt.checkpoint_name(step)
        (d / "G").mkdir(parents=True)
        ckpt.atomic_torch_save({"step": step, "w": torch.ones(2)}, d / ckpt.TRAIN_STATE_FILE)
        if complete:
            src = tmp_path / f"gen{step}.pt"
            torch.save({"step": step}, src)
            publish_file(fs, src, str(d / ckpt.GENERATOR_FILE))
    (run / "step-00000009-partial").mkdir()  # not a checkpoint name
    assert [s for s, _ in ckpt.list_checkpoints(fs, str(run))] == [2, 4]
    assert ckpt.find_latest(fs, str(run)) == str(run / "step-00000004")
    assert [s for s, _ in ckpt.list_checkpoints(fs, str(run), complete_only=False)] == [2, 4, 6]
    assert ckpt.load_weights_only(run / "step-00000004" / ckpt.TRAIN_STATE_FILE)["step"] == 4
    assert not list(run.rglob("*.tmp"))  # temp files renamed away
    assert ckpt.find_latest(fs, str(tmp_path / "missing")) is None
    assert ckpt.parse_step("step-00000012") == 12 and ckpt.parse_step("checkpoint_1") is None


def test_rng_state_round_trip_is_weights_only(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = rng_state()
    ckpt.atomic_torch_save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(ckpt.load_weights_only(tmp_path / "rng.pt"))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_dry_run_prints_config_and_plan_without_ray():
    out = subprocess.run([sys.executable, "-m", "digan.train", "--dry-run", "dist.zero_stage=2", "train.total_kimg=1"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "zero_stage: 2" in out.stdout and "plan: 2 Ray Train worker(s)" in out.stdout
    assert "ZeRO-2 fp32" in out.stdout and "1 kimg = 63 steps" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "digan.train", "--dry-run", "dist.zero_stage=3"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "dist.zero_stage=3" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert load_config("demo-32").dist.num_workers == 2  # the default run is the 2-worker demo


def test_resume_rule_for_worker_count_changes(tmp_path):
    """ZeRO-0 checkpoints resume on any worker count; ZeRO-1/2 ones on another count only at the same stage and
    with the whole optimizer state saved beside DeepSpeed's files (one clear line otherwise)."""
    zero1 = to_dict(load_config("demo-32", ["dist.num_workers=2", "dist.zero_stage=1"]))
    with pytest.raises(ckpt.ResumeError, match=r"2 worker\(s\) with ZeRO-1 .*no whole optimizer state.* "
                                               r"dist.num_workers=2"):
        ckpt.check_resumable(zero1, zero_stage=1, world_size=1, directory=str(tmp_path))
    assert ckpt.check_resumable(zero1, zero_stage=1, world_size=2) == 2  # the same count resumes
    for d in (ckpt.G_DIR, ckpt.D_DIR):
        (tmp_path / d).mkdir()
        (tmp_path / d / ckpt.FULL_OPTIMIZER_FILE).write_bytes(b"x")
    assert ckpt.check_resumable(zero1, zero_stage=1, world_size=3, directory=str(tmp_path)) == 2
    with pytest.raises(ckpt.ResumeError, match="from ZeRO-1 to ZeRO-2"):
        ckpt.check_resumable(zero1, zero_stage=2, world_size=3, directory=str(tmp_path))
    zero0 = to_dict(load_config("demo-32", ["dist.num_workers=2", "dist.zero_stage=0"]))
    assert ckpt.check_resumable(zero0, zero_stage=0, world_size=1) == 2  # ZeRO-0 resumes on any count
    with pytest.raises(ckpt.ResumeError, match="dist.num_workers=2"):
        ckpt.check_resumable(zero0, zero_stage=2, world_size=4)


def test_ray_false_alarm_filter_drops_only_the_preemption_watcher_line(monkeypatch):
    """Ray Train V2 logs an ERROR line about its own PreemptionWatcher in every run; the driver drops exactly
    that line through Ray's RAY_DEDUP_LOGS_SKIP_REGEX (kept alongside a user's own pattern)."""
    import re

    from digan.distributed.cluster import quiet_ray_false_alarms

    monkeypatch.setenv("RAY_DEDUP_LOGS_SKIP_REGEX", "mine")
    quiet_ray_false_alarms()
    quiet_ray_false_alarms()  # idempotent
    skip = re.compile(os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"])
    seen = ("[2026-11-30 05:48:22,155 E 7247 7313] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher'"
            " and ID: '860bb114656294992896786201000000' has constructor arguments in the object store and "
            "max_restarts > 0. If the arguments in the object store go out of scope or are lost, the actor restart "
            "will fail. See https://github.com/ray-project/ray/issues/53727 for more details.")
    assert skip.search(seen) and skip.search("mine")
    assert not skip.search(seen.replace("PreemptionWatcher", "MyActor"))
    assert not skip.search("core_worker.cc:123: Actor with class name: 'PreemptionWatcher' died unexpectedly")
    assert os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"].count("PreemptionWatcher") == 1
    monkeypatch.delenv("RAY_DEDUP_LOGS_SKIP_REGEX")
    quiet_ray_false_alarms()
    assert re.search(os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"], seen)


def test_run_logger_samples_reach_tensorboard_as_videos(tmp_path):
    """Every sample grid is an mp4 and an animated image in TensorBoard (all frames, in order)."""
    import io
    from types import SimpleNamespace

    import pyarrow.fs as pafs
    from PIL import Image, ImageSequence
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from digan.distributed.run_logger import RunLogger
    from digan.models import build_generator

    cfg = load_config("demo-32", ["train.num_sample_videos=2", "data.num_frames=6"])
    storage = SimpleNamespace(storage_filesystem=pafs.LocalFileSystem(), experiment_fs_path=str(tmp_path / "run"))
    logger = RunLogger(cfg, storage, enabled=True)
    G = build_generator(cfg.model).eval()
    for step in (10, 20):
        assert logger.write_samples(G, step).is_file()
    logger.close()
    ea = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0})
    ea.Reload()
    events = ea.Images("samples")
    assert [e.step for e in events] == [10, 20]
    gif = Image.open(io.BytesIO(events[-1].encoded_image_string))
    assert gif.format == "GIF" and gif.size == (2 * 32, 32)  # 2 videos side by side
    assert sum(1 for _ in ImageSequence.Iterator(gif)) == 6


def test_run_logger_keeps_each_step_once_after_a_resume(tmp_path):
    """Steps logged after the checkpoint a resume starts from were rolled back: stats.jsonl and TensorBoard
    drop them, so each step is there once, from the attempt the checkpoints continue."""
    from types import SimpleNamespace

    import pyarrow.fs as pafs
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from digan.distributed.run_logger import RunLogger

    cfg = load_config("demo-32")
    storage = SimpleNamespace(storage_filesystem=pafs.LocalFileSystem(), experiment_fs_path=str(tmp_path / "run"))
    line = {"kimg": 0.0, "it_per_s": 1.0, "samples_per_s": 16.0, "data_wait_frac": 0.0, "skipped_records": 0}
    first = RunLogger(cfg, storage, enabled=True)
    for step in range(1, 8):  # the attempt that is killed during step 8; its last checkpoint: step 4
        first.log(step, {**line, "step": step, "loss_G": float(step), "restarts": 0})
    first.close()
    second = RunLogger(cfg, storage, enabled=True)
    second.resume_at(4)
    for step in range(5, 10):
        second.log(step, {**line, "step": step, "loss_G": 100.0 + step, "restarts": 1})
    second.close()
    stats = [json.loads(ln) for ln in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    assert [(s["step"], s["restarts"]) for s in stats] == [(s, 0) for s in range(1, 5)] + [(s, 1) for s in range(5, 10)]
    ea = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    ea.Reload()
    assert [(e.step, e.value) for e in ea.Scalars("loss_G")] == \
        [(s, float(s)) for s in range(1, 5)] + [(s, 100.0 + s) for s in range(5, 10)]


def test_storage_path_rule_under_a_ray_job():
    """A relative train.storage_path in Ray's working-dir cache is refused with one line; elsewhere kept."""
    from digan.train import LaunchError, check_storage

    cache = "/tmp/ray/session_x/runtime_resources/working_dir_files/_ray_pkg_0123abcd"
    with pytest.raises(LaunchError, match="working-dir cache") as err:
        check_storage("runs", cwd=cache)
    assert "\n" not in str(err.value) and "s3://bucket/prefix" in str(err.value)
    check_storage("/shared/runs", cwd=cache)  # absolute: the user's choice
    check_storage("s3://bucket/runs", cwd=cache)
    check_storage("runs", cwd="/home/me/digan")  # a plain driver: ./runs is where the user is


def test_stale_checkpoint_staging_folders_are_cleaned(tmp_path):
    """A worker SIGKILLed while writing a checkpoint leaves its local staging folder; the next worker start on
    that node removes the folders of dead processes and leaves those of live ones (another run's save)."""
    from digan.distributed.checkpoint import STAGING_PREFIX as _STAGING, clean_stale_staging

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{_STAGING}{dead.pid}-step-00000004-r1-abc"
    live = tmp_path / f"{_STAGING}{os.getpid()}-step-00000008-r0-def"
    other = tmp_path / "digan-cache"
    for d in (stale, live, other):
        (d / "G").mkdir(parents=True)
    assert clean_stale_staging(str(tmp_path)) == [str(stale)]
    assert not stale.exists() and live.exists() and other.exists()


def test_batch_shares_of_any_group_size_and_their_weights():
    """An elastic group of any size in its range shares a global batch: even shares when it divides the batch
    (every fixed-size run), else whole minibatch-stddev groups differing by one group; the share weights make
    the mean over ranks of the ranks' weighted mean losses the global batch's mean, gradients included."""
    from digan.distributed.utils import batch_slice, share_weight

    assert [batch_slice(16, 2, r, 4) for r in range(2)] == [(0, 8), (8, 8)]
    assert [batch_slice(16, 8, r, 4) for r in range(8)] == [(2 * r, 2) for r in range(8)]  # divides: as before
    assert [batch_slice(64, 3, r, 4) for r in range(3)] == [(0, 24), (24, 20), (44, 20)]
    assert [batch_slice(16, 3, r, 4) for r in range(3)] == [(0, 8), (8, 4), (12, 4)]
    assert [batch_slice(12, 2, r, 4) for r in range(2)] == [(0, 8), (8, 4)]  # not 6 + 6: whole groups
    for batch, world in ((64, 3), (64, 5), (64, 7), (16, 3), (48, 5)):
        shares = [batch_slice(batch, world, r, 4) for r in range(world)]
        assert [s for s, _ in shares] == [sum(n for _, n in shares[:r]) for r in range(world)]  # contiguous
        assert sum(n for _, n in shares) == batch and all(n % 4 == 0 and n > 0 for _, n in shares)
        assert max(n for _, n in shares) - min(n for _, n in shares) <= 4
    with pytest.raises(ValueError, match="cannot be shared"):
        batch_slice(16, 5, 0, 4)  # 4 groups for 5 ranks
    torch.manual_seed(0)
    w, x = torch.randn(3, requires_grad=True), torch.randn(64, 3)
    per_sample = lambda rows: (rows @ w).tanh()  # noqa: E731
    (g_global,) = torch.autograd.grad(per_sample(x).mean(), w)
    ranks = [batch_slice(64, 3, r, 4) for r in range(3)]
    # What the engines do: each rank backpropagates weight * its own mean; the all-reduce averages over ranks.
    g_ranks = [torch.autograd.grad(share_weight(n, 64, 3) * per_sample(x[s:s + n]).mean(), w)[0] for s, n in ranks]
    torch.testing.assert_close(torch.stack(g_ranks).mean(0), g_global, rtol=1e-6, atol=1e-7)


def test_elastic_config_needs_a_batch_every_group_size_can_share():
    from digan.config import ConfigError, load_config

    cfg = load_config("demo-32", ["dist.min_workers=1", "dist.num_workers=4"])
    assert cfg.dist.elastic and not load_config("demo-32").dist.elastic
    with pytest.raises(ConfigError, match=r"^train.batch_size=16: elastic training needs a multiple of "
                                          r"model.mbstd_group=4 with at least dist.num_workers=5 groups"):
        load_config("demo-32", ["dist.min_workers=2", "dist.num_workers=5"])
    with pytest.raises(ConfigError, match=r"^dist.min_workers=3: must be in \[0, dist.num_workers=2\]"):
        load_config("demo-32", ["dist.min_workers=3"])
    # A fixed size keeps its own rule (an even share per worker).
    with pytest.raises(ConfigError, match="must be divisible by dist.num_workers=3"):
        load_config("demo-32", ["dist.num_workers=3"])
