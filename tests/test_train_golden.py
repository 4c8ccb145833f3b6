"""Two training iterations of ours against the official DIGAN training loop.

tests/golden/train_step.json was made by tests/golden/make_train_golden.py, which ran the official loop
(sihyun-yu/digan, src/training/training_loop.py, CPU reference ops) for two iterations from the initial
weights of our nets and recorded every draw it made: per phase the latents z, z_motion and times Ts, per
discriminator forward the DiffAugment parameters, the real batch. Iteration 0 is an R1 iteration (Gmain,
Greg (empty), Dmain, Dreg), iteration 1 a plain one; the EMA ramp-up makes iteration 0 copy G and
iteration 1 use beta = 0.5. Here our recipe (SingleProcessTrainer: the same `train_step` the distributed
worker runs, with the config's schedule and Adam settings) replays those draws and must end with the
same G, D and G_ema after each iteration, and must NOT when the R1 scale, an Adam beta, the lazy-reg
rescaling, the R1 schedule or the EMA decay is changed.
"""

from __future__ import annotations

import base64
import json
import zlib
from collections import deque
from pathlib import Path

import numpy as np
import pytest
import torch

from digan.config import load_config
from digan.training import DIGANLoss, DiffAugment, SingleProcessTrainer, motion_input

GOLDEN = Path(__file__).resolve().parent / "golden" / "train_step.json"


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


def decode(entry: dict) -> torch.Tensor:
    raw = base64.b64decode(entry["b64"])
    arr = np.frombuffer(raw, dtype=np.dtype(entry["dtype"]).newbyteorder("<")).reshape(entry["shape"])
    return torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="))).clone()


class ReplayLoss(DIGANLoss):
    """Our loss with the official draws: `sample_latents` and the augmentation take the next recorded
    values in call order (official order: Gmain's latents and its fake forward; Dmain's latents, fake
    forward and real forward; Dreg's real forward)."""

    def __init__(self, latents: list, augments: list, **kwargs):
        super().__init__(**kwargs)
        self.latents, self.augments = deque(latents), deque(augments)
        diffaug = DiffAugment(kwargs["diffaug_policy"], kwargs["translation_ratio"])
        self.augment = lambda pair, rows=None: diffaug.apply(pair, self.augments.popleft())

    def _rows(self):
        return None  # the recorded draws replace the keyed ones

    def sample_latents(self, G, batch_size):
        z, z_M, t = self.latents.popleft()
        assert z.shape[0] == batch_size
        return z, z_M, t


# ----------------------------------------------------------------------------------------------------
# The statistics stored in the golden file, recomputed from our tensors (same definitions as the script).


def projection(key: str, numel: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    return torch.randn(numel, generator=g, dtype=torch.float64)


def our_stats(key: str, x: torch.Tensor, x0: torch.Tensor, idx: list[int]) -> dict:
    x, x0 = x.detach().double().flatten(), x0.detach().double().flatten()
    d = x - x0
    return {"sum": x.sum().item(), "l2": x.norm().item(), "elems": x[idx].tolist(), "delta_l2": d.norm().item(),
            "delta_sum": d.sum().item(), "delta_proj": (d @ projection(key, d.numel())).item(),
            "delta_elems": d[idx].tolist()}


def mismatch(ours: dict[str, torch.Tensor], initial: dict[str, torch.Tensor], ref: dict[str, dict]) -> dict:
    """Per tensor, how far our update is from the official one, in units of the official update's size.

    delta_l2: |our ||update|| - official ||update||| / official ||update||; delta_proj: the same for a
    fixed random projection of the update (every element counts, signs included); delta_elems: the
    largest difference at the fixed-index elements, over the update's RMS. (The initial weights are
    the same bits in both, so the weights themselves differ exactly by the updates' difference.)
    """
    out = {}
    for key, r in ref.items():
        x = ours[key]
        s = our_stats(key, x, initial[key], r["idx"])
        n = x.numel()
        d_scale = max(r["delta_l2"], 1e-12)
        d_rms = max(r["delta_l2"] / n ** 0.5, 1e-12)
        out[key] = {
            "delta_l2": abs(s["delta_l2"] - r["delta_l2"]) / d_scale,
            "delta_proj": abs(s["delta_proj"] - r["delta_proj"]) / d_scale,
            "delta_elems": max(abs(a - b) for a, b in zip(s["delta_elems"], r["delta_elems"])) / d_rms,
        }
    return out


# ----------------------------------------------------------------------------------------------------


def run_ours(golden: dict, extra: tuple[str, ...] = (), patch=None):
    """Our trainer on the golden config (+ extra overrides), replaying the official draws.
    `patch(trainer)` may change the trainer before the iterations (negative tests)."""
    cfg = load_config("demo-32", list(golden["overrides"]) + list(extra))
    trainer = SingleProcessTrainer(cfg, seed=golden["seed"])
    initial = {"G": {k: v.detach().clone() for k, v in trainer.G.state_dict().items()},
               "D": {k: v.detach().clone() for k, v in trainer.D.state_dict().items()}}
    with torch.no_grad():  # the official loop's w_avg at its start (its module summary ran G on junk)
        trainer.G.mapping.w_avg.copy_(decode(golden["w_avg_start"]))
    initial["G_ema"] = {k: v.detach().clone() for k, v in trainer.G_ema.state_dict().items()}
    latents, augments, per_iteration = [], [], []
    for it in golden["iterations"]:
        n_lat = n_aug = 0
        for ph in it["phases"]:
            if "z" in ph:
                latents.append((decode(ph["z"]), decode(ph["z_motion"]), decode(ph["t"])))
                n_lat += 1
            augments += [{k: decode(v) for k, v in a.items()} for a in ph["augment"]]
            n_aug += len(ph["augment"])
        per_iteration.append((n_lat, n_aug))
    trainer.loss = ReplayLoss(latents, augments, **DIGANLoss.config_kwargs(cfg.loss))
    if patch is not None:
        patch(trainer)
    states, consumed = [], []
    for it in golden["iterations"]:
        before = (len(trainer.loss.latents), len(trainer.loss.augments))
        pair = decode(it["real_pixels"]).float() / 127.5 - 1
        trainer.train_step(pair, decode(it["real_dt"]).float())
        consumed.append((before[0] - len(trainer.loss.latents), before[1] - len(trainer.loss.augments)))
        states.append({"G": {k: v.detach().clone() for k, v in trainer.G.state_dict().items()},
                       "D": {k: v.detach().clone() for k, v in trainer.D.state_dict().items()},
                       "G_ema": {k: v.detach().clone() for k, v in trainer.G_ema.state_dict().items()}})
    return trainer, initial, states, consumed, per_iteration


def worst(golden: dict, initial: dict, states: list) -> dict[str, tuple[float, str]]:
    """The largest mismatch of each kind over all tensors, nets and iterations (with where it was)."""
    out: dict[str, tuple[float, str]] = {}
    for i, (st, ref) in enumerate(zip(states, golden["after"])):
        for net in ("G", "D", "G_ema"):
            for key, m in mismatch(st[net], initial[net], ref[net]).items():
                for kind, v in m.items():
                    if v > out.get(kind, (-1.0, ""))[0]:
                        out[kind] = (v, f"iteration {i} {net}.{key}")
    return out


# Per tensor (every parameter and buffer of G, D and G_ema, after each iteration), in units of the
# official update's size. Measured on 2026-11-27: at most 6.3e-4 (D_I's fromrgb bias after iteration 1);
# a float32 reimplementation of the same maths cannot do much better (the official code promotes the
# reals to float64 through its dt plane, renders G frame by frame, backpropagates D's halves separately).
TOLERANCE = 2e-3


def test_two_official_iterations_are_reproduced(golden):
    """From the same weights and draws, our two iterations end where the official loop's did: G, D, G_ema."""
    trainer, initial, states, consumed, per_iteration = run_ours(golden)
    # the same initial weights the golden file was made from (bit-identical builds)
    for net in ("G", "D"):
        for key, ref in golden["initial"][net].items():
            x = initial[net][key].double().flatten()
            if key.endswith("w_avg"):
                continue
            assert x.sum().item() == pytest.approx(ref["sum"], rel=1e-9, abs=1e-9), key
            assert x[ref["idx"]].tolist() == pytest.approx(ref["elems"], rel=0, abs=0), key
    # the official phases: R1 iteration (Gmain, Greg, Dmain, Dreg with gain r1_interval), then a plain one
    phases = [[(p["name"], p["gain"]) for p in it["phases"]] for it in golden["iterations"]]
    assert phases == [[("Gmain", 1), ("Greg", 4), ("Dmain", 1), ("Dreg", 16)], [("Gmain", 1), ("Dmain", 1)]]
    # our iteration consumed exactly the draws the official one made, in the same order
    assert consumed == per_iteration == [(2, 4), (2, 3)]
    assert not trainer.loss.latents and not trainer.loss.augments
    assert (trainer.step, trainer.cur_nimg) == (2, 8)
    # the EMA betas of the official formula with cur_nimg counted before the increment: 0, then 0.5
    assert trainer.ema.beta(0) == 0.0 and trainer.ema.beta(4) == pytest.approx(0.5)
    assert int(trainer.d_updater.optimizer.state[next(trainer.D.parameters())]["step"]) == 3  # 2 + 1
    assert int(trainer.g_updater.optimizer.state[next(trainer.G.parameters())]["step"]) == 2

    found = worst(golden, initial, states)
    assert set(found) == {"delta_l2", "delta_proj", "delta_elems"}
    for kind, (value, where) in found.items():
        assert value <= TOLERANCE, f"{kind}: {value:.3g} at {where}"
    # and the steps were not trivial: every parameter of G and D moved, G_ema moved towards G
    for net in ("G", "D", "G_ema"):
        for key, ref in golden["after"][-1][net].items():
            if not key.endswith("w_avg"):
                assert ref["delta_l2"] > 0, f"{net}.{key} did not move in the official run"


# ----------------------------------------------------------------------------------------------------
# Changed recipes (config overrides, or code variants patched into the trainer) must fail the comparison.


def _ema_after_increment(trainer):
    """The EMA ramp-up evaluated at cur_nimg AFTER this iteration's batch (official: before)."""
    update = trainer.ema.update
    trainer.ema.update = lambda G, cur_nimg: update(G, cur_nimg + trainer.ema.batch_size)


def _r1_without_zero_gradients(trainer):
    """The R1 step without the official `logits * 0`: the output biases get no gradient, so Adam skips
    them there (no moment decay, no step count) instead of taking a zero step (what ours did first)."""
    loss = trainer.loss

    def r1_loss(D_img, D_mot, real_pair, real_dt, labels=None):
        x_real = motion_input(real_pair, real_dt).detach().requires_grad_(True)
        real_M, real_I, frames_aug = loss.run_D(D_img, D_mot, x_real, labels)
        r1, stats = loss._r1(real_M, real_I, x_real, frames_aug)
        return r1 * loss.r1_interval, stats

    loss.r1_loss = r1_loss


def _d_before_g(trainer):
    """The phase order this project had before: D step (and R1), then G step, then EMA."""
    from digan.training import recipe

    def train_step(G, D_img, D_mot, g_updater, d_updater, loss, ema, real_pair, real_dt, step, cur_nimg):
        stats = recipe.d_step(G, D_img, D_mot, d_updater, loss, real_pair, real_dt)
        if loss.r1_due(step):
            stats |= recipe.r1_step(D_img, D_mot, d_updater, loss, real_pair, real_dt)
        stats |= recipe.g_step(G, D_img, D_mot, g_updater, loss, real_pair.shape[0])
        ema.update(G, cur_nimg)
        return stats

    trainer.train_step = lambda pair, dt: _take_step(trainer, train_step, pair, dt)


def _take_step(trainer, train_step, pair, dt):
    train_step(trainer.G, trainer.D.img, trainer.D.mot, trainer.g_updater, trainer.d_updater, trainer.loss,
               trainer.ema, pair, dt, trainer.step, trainer.cur_nimg)
    trainer.step += 1
    trainer.cur_nimg += pair.shape[0]


# Each change must move some tensor far outside the tolerance (measured: 100x to 1300x of it).
# lr 0.0024 instead of 0.0025 shows the scale of a small change.
NEGATIVE = {
    "r1_gamma 0.5": (("loss.r1_gamma=0.5",), None),
    "r1_interval 8 (R1 gain and D's lazy-reg rescaling)": (("loss.r1_interval=8",), None),
    "folded R1 schedule": (("loss.r1_schedule=folded",), None),
    "adam beta1 0.5": (("optim.beta1=0.5",), None),
    "adam beta2 0.9": (("optim.beta2=0.9",), None),
    "ema half-life 2 images": (("optim.ema_kimg=0.002",), None),
    "ema ramp-up 0.5": (("optim.ema_rampup=0.5",), None),
    "lr 0.0024": (("optim.lr=0.0024",), None),
    "ema beta at cur_nimg after the increment": ((), _ema_after_increment),
    "r1 step without zero gradients": ((), _r1_without_zero_gradients),
    "d step before g step": ((), _d_before_g),
}


@pytest.mark.parametrize("change", list(NEGATIVE), ids=list(NEGATIVE))
def test_golden_detects_a_changed_recipe(golden, change):
    """The comparison above is not vacuous: with any of these changes it fails by a wide margin."""
    extra, patch = NEGATIVE[change]
    _, initial, states, _, _ = run_ours(golden, extra, patch)
    found = worst(golden, initial, states)
    value, where = max(found.values())
    assert value > 10 * TOLERANCE, f"{change}: largest mismatch only {value:.3g} ({where})"


# ----------------------------------------------------------------------------------------------------
# The distributed worker's path: the same iterations through GANRuntime's DeepSpeed engines.

_WORKER_SCRIPT = r"""
import os, sys, socket, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import test_train_golden as T
from digan.config import load_config
from digan.distributed.runtime import GANRuntime
from digan.training import DIGANLoss

torch.set_num_threads(1)
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=str(port))
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
golden = T.json.loads(T.GOLDEN.read_text())
out = {}
for stage in (0, 2):
    cfg = load_config("demo-32", list(golden["overrides"]) + [f"dist.zero_stage={stage}"])
    rt = GANRuntime(cfg, 0, 1, torch.device("cpu"))
    initial = {"G": {k: v.detach().clone() for k, v in rt.G.state_dict().items()},
               "D": {k: v.detach().clone() for k, v in rt.D.state_dict().items()}}
    with torch.no_grad():
        rt.G.mapping.w_avg.copy_(T.decode(golden["w_avg_start"]))
    initial["G_ema"] = {k: v.detach().clone() for k, v in rt.G_ema.state_dict().items()}
    latents, augments = [], []
    for it in golden["iterations"]:
        for ph in it["phases"]:
            if "z" in ph:
                latents.append((T.decode(ph["z"]), T.decode(ph["z_motion"]), T.decode(ph["t"])))
            augments += [{k: T.decode(v) for k, v in a.items()} for a in ph["augment"]]
    rt.loss = T.ReplayLoss(latents, augments, **DIGANLoss.config_kwargs(cfg.loss))
    states = []
    for it in golden["iterations"]:
        pair = T.decode(it["real_pixels"]).float() / 127.5 - 1
        rt.train_step(pair, T.decode(it["real_dt"]).float())
        states.append({"G": {k: v.detach().clone() for k, v in rt.G.state_dict().items()},
                       "D": {k: v.detach().clone() for k, v in rt.D.state_dict().items()},
                       "G_ema": {k: v.detach().clone() for k, v in rt.G_ema.state_dict().items()}})
    assert not rt.loss.latents and not rt.loss.augments
    out[stage] = {"initial": initial, "states": states, "d_engine_steps": rt.d_updater.engine.global_steps,
                  "g_engine_steps": rt.g_updater.engine.global_steps}
torch.save(out, sys.argv[2])
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_deepspeed_worker_reproduces_the_official_iterations(golden, tmp_path):
    """GANRuntime (the Ray worker's engines: G and D DeepSpeed engines, the D engine taking two
    backward/step pairs on the R1 iteration) on one gloo rank, ZeRO 0 and 2: same result as the official
    loop. Run in a subprocess: DeepSpeed keeps the process group it wrapped for the life of a process."""
    import os
    import subprocess
    import sys

    out_file = tmp_path / "worker.pt"
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    r = subprocess.run([sys.executable, "-c", _WORKER_SCRIPT, str(Path(__file__).parent), str(out_file)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = torch.load(out_file, weights_only=True)
    for stage, res in out.items():
        # iterations counted by the worker; the D engine took 3 optimizer steps in 2 iterations
        assert (res["g_engine_steps"], res["d_engine_steps"]) == (2, 3), stage
        for kind, (value, where) in worst(golden, res["initial"], res["states"]).items():
            assert value <= TOLERANCE, f"ZeRO {stage}, {kind}: {value:.3g} at {where}"
