"""Reference values for tests/test_train_golden.py: two training iterations of the official DIGAN code.

    PYTHONPATH=/path/with/omegaconf python tests/golden/make_train_golden.py --official-repo /path/to/digan

runs the official training loop itself (`src/training/training_loop.py: training_loop`, as shipped, on
the CPU with its reference ops) for two iterations from the weights of OUR nets (converted to the
official layout and given to it as its `resume_pkl`), records every random draw it makes inside the
loop, and writes tests/golden/train_step.json: the config, the draws, and per-tensor statistics of
G, D and G_ema after each iteration. The test replays the draws through our recipe and compares.

The official repository is imported from --official-repo; nothing of it is copied here. What the
official code needs and this environment lacks, and how this script provides it (no file of theirs
is edited):
  - omegaconf (a dependency of its networks): install it (`pip install --target DIR omegaconf`) and put
    DIR on PYTHONPATH;
  - PyTorch >= 2.2 dropped the `data_source` argument of `Sampler.__init__`, which its InfiniteSampler
    passes: Sampler.__init__ accepts (and ignores) it again;
  - torchvision: imported by its metrics package (video writing, I3D), which the loop imports but never
    calls with metrics off: an empty module stands in when it is not installed;
  - numpy >= 1.24 removed `np.float`, which its layers.py uses in a default argument: aliased back to
    the builtin `float` (what it was);
  - its loop is written for CUDA (`torch.device('cuda', rank)`, CUDA events for phase timing, CUDA
    memory statistics, `pin_memory()`): its module's `torch` name is given a proxy that returns the CPU
    device and no-op timing/memory stubs, and `Tensor.pin_memory` returns the tensor itself (pinning
    only speeds host-to-GPU copies; CPU-only PyTorch refuses it). On the CPU its custom ops
    (bias_act, upfirdn2d, conv2d_gradfix) take their reference paths by themselves.
  - the training set, the loss and the progress callback are the loop's own extension points
    (class names and a callback): a dataset of fixed uint8 clip pairs, `OurStyleGAN2Loss` subclassed
    only to record (z per phase, Ts and z_motion at the loss's handle on G's synthesis net, the
    real batch), and a callback that reads the loop's own network snapshot after each iteration.
    The loop's module summary runs G in train mode on `torch.empty` latents before training, which
    moves G's w_avg buffer by junk (NaN here); the recording loss puts the resumed value back.
  - DiffAugment's draws are recorded by giving its module's `torch` name a proxy whose `rand` and
    `randint` keep a copy of what they return.

Setting (small enough for a CPU, both codes support it): 16x16 frames, input grid 8, 32 channels,
w_dim = motion z_dim = 512 (the official loss hard-codes a 512-d z_motion, and its CoordFuser reads
[w, z_motion] as 2 * w_dim), z_dim 64, batch 4 pairs, official optimiser settings (Adam lr 0.0025,
betas (0, 0.99), lazy-reg intervals G 4 / D 16) except eps = 1e-6 instead of 1e-8, R1 gamma 1,
DiffAugment color,translation, no xflip (the official flips in its dataset; the reals are recorded as
D saw them). Why eps 1e-6 (in both codes): with 1e-8, Adam's first step lr * g / (|g| + eps) is a sign
function for all but the few elements with |g| below ~1e-7, where rounding-level gradient differences
between two correct implementations move a weight by a large part of a step (measured: 2 such elements
of a 256-element G tensor made 3.5 % of its update's norm); 1e-6 keeps the step a smooth function of g
there, so the tolerance can be tight enough to see a change of Adam's beta2. EMA: ema_kimg 0.008
with ema_rampup 1.0, so that iteration 0 (cur_nimg 0) copies G into G_ema and iteration 1 (cur_nimg 4,
counted BEFORE the increment) uses beta = 0.5 ** (4 / min(8, 4 * 1.0)) = 0.5 (0.707 if counted after):
the official loop has no resume_kimg, so this is how its EMA decay and ramp-up get a beta that is not ~0.
Iteration 0 is an R1 iteration (batch_idx 0): Gmain, Greg (empty: pl_weight 0), Dmain, Dreg; iteration 1
is Gmain, Dmain. Two iterations, so that Adam's betas matter (its first step does not depend on them).
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
import pickle
import subprocess
import sys
import tempfile
import types
import zlib
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from digan.config import load_config  # noqa: E402
from digan.models import build_discriminators, build_generator  # noqa: E402
from digan.training import DiscriminatorPair  # noqa: E402

OUT = Path(__file__).resolve().parent / "train_step.json"

# Our config for the golden setting (the test loads exactly this list).
OVERRIDES = [
    "model.resolution=16", "model.input_resolution=8", "model.z_dim=64", "model.w_dim=512",
    "model.motion_z_dim=512", "model.channel_base=512", "model.channel_max=32", "model.coord_emb_size=16",
    "model.extra_conv_resolutions=[]", "model.d_channel_base=512", "model.d_channel_max=32",
    "model.d_fp16_resolutions=0", "model.mbstd_group=4",
    "model.fourier_scale=3.1622776601683795", "model.sigma_t=0.25",  # the official values, whatever the preset says
    "model.fourier_lr_mult=1.0",
    "loss.r1_gamma=1.0", "loss.r1_interval=16", "loss.g_reg_interval=4", "loss.r1_schedule=separate",
    "loss.diffaug_policy=color,translation", "loss.translation_ratio=0.125", "loss.xflip=false",
    "optim.lr=0.0025", "optim.beta1=0.0", "optim.beta2=0.99", "optim.eps=1.0e-6",
    "optim.ema_kimg=0.008", "optim.ema_rampup=1.0", "train.batch_size=4",
]
SEED = 0
ITERATIONS = 2
NUM_ELEMS = 8  # fixed-index elements stored per tensor


# ----------------------------------------------------------------------------------------------------
# Parameter names: ours <-> official.


def official_key_G(k: str) -> str:
    if k.startswith("blocks.b4.coord_fuser."):
        return "synthesis.b4.input.input.coord_fuser." + k[len("blocks.b4.coord_fuser."):]
    if k.startswith("blocks."):
        return "synthesis." + k[len("blocks."):]
    return k  # mapping.*


def official_key_D(k: str) -> str:
    """Our DiscriminatorPair key (img.* / mot.*) -> official OurDiscriminator key (imageD.* / videoD.*)."""
    head, rest = k.split(".", 1)
    net = {"img": "imageD", "mot": "videoD"}[head]
    if rest.startswith("blocks."):
        rest = rest[len("blocks."):]
    elif rest.startswith("epilogue."):
        rest = "b4." + rest[len("epilogue."):]
    return f"{net}.{rest}"


def to_official(ours: dict[str, torch.Tensor], official: torch.nn.Module, key_map) -> None:
    """Copy our state dict into an official module (every official parameter and w_avg must be covered)."""
    target = official.state_dict()
    covered = set()
    for k, v in ours.items():
        ok = key_map(k)
        assert ok in target, f"{k} -> {ok}: not in the official module"
        assert target[ok].numel() == v.numel(), (k, ok, tuple(v.shape), tuple(target[ok].shape))
        target[ok].copy_(v.reshape(target[ok].shape))
        covered.add(ok)
    missing = [k for k in target if k not in covered and not k.endswith("resample_filter")]
    assert not missing, f"official tensors without a counterpart: {missing}"


def from_official(official: torch.nn.Module, ours_like: dict[str, torch.Tensor], key_map) -> dict[str, torch.Tensor]:
    sd = official.state_dict()
    return {k: sd[key_map(k)].detach().reshape(v.shape).to(torch.float32).clone() for k, v in ours_like.items()}


# ----------------------------------------------------------------------------------------------------
# Statistics stored per tensor (the test recomputes them from its own tensors).


def elem_index(numel: int) -> list[int]:
    return sorted(set(np.linspace(0, numel - 1, NUM_ELEMS).round().astype(int).tolist()))


def projection(key: str, numel: int) -> torch.Tensor:
    """A fixed N(0, 1) vector per tensor name (seeded by the name), to fold every element into one number."""
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    return torch.randn(numel, generator=g, dtype=torch.float64)


def tensor_stats(key: str, x: torch.Tensor, x0: torch.Tensor) -> dict:
    """Stats of a tensor after the step (x) and of its update (x - x0, x0 the initial value)."""
    x, x0 = x.detach().double().flatten(), x0.detach().double().flatten()
    d = x - x0
    idx = elem_index(x.numel())
    return {"sum": x.sum().item(), "l2": x.norm().item(), "idx": idx, "elems": x[idx].tolist(),
            "delta_l2": d.norm().item(), "delta_sum": d.sum().item(),
            "delta_proj": (d @ projection(key, d.numel())).item(), "delta_elems": d[idx].tolist()}


def b64(x: torch.Tensor) -> dict:
    """A tensor as base64 of its little-endian bytes (exact), with dtype and shape."""
    x = x.detach().cpu().contiguous()
    return {"dtype": str(x.dtype).replace("torch.", ""), "shape": list(x.shape),
            "b64": base64.b64encode(x.numpy().astype(x.numpy().dtype.newbyteorder("<")).tobytes()).decode()}


# ----------------------------------------------------------------------------------------------------
# Shims for running the official (CUDA-era) code on this CPU environment (see the module docstring).


class _CudaStub:
    class Event:
        def __init__(self, enable_timing: bool = False):
            pass

        def record(self, stream=None):
            pass

        def synchronize(self):
            pass

        def elapsed_time(self, other) -> float:
            return 0.0

    @staticmethod
    def current_stream(device=None):
        return None

    @staticmethod
    def max_memory_allocated(device=None) -> int:
        return 0

    @staticmethod
    def reset_peak_memory_stats(device=None) -> None:
        pass


class _TorchOnCPU(types.ModuleType):
    """`torch` for the official training loop: `torch.device('cuda', rank)` -> CPU, CUDA stubs, rest real."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CudaStub()

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def device(*args, **kwargs):
        return torch.device("cpu")


class _RecordingTorch(types.ModuleType):
    """`torch` for the official diffaugment module: rand/randint keep a copy of every draw."""

    def __init__(self, log: list):
        super().__init__("torch")
        self.log = log

    def __getattr__(self, name):
        return getattr(torch, name)

    def rand(self, *args, **kwargs):
        out = torch.rand(*args, **kwargs)
        self.log.append(("rand", out.detach().clone()))
        return out

    def randint(self, *args, **kwargs):
        out = torch.randint(*args, **kwargs)
        self.log.append(("randint", out.detach().clone()))
        return out


def import_official(repo: Path):
    for p in (str(repo), str(repo / "src")):
        if p not in sys.path:
            sys.path.insert(0, p)
    if not hasattr(np, "float"):
        np.float = float  # removed in numpy 1.24; the official layers.py uses it in a default argument
    try:
        import omegaconf  # noqa: F401
    except ImportError:
        sys.exit("the official networks need omegaconf: pip install --target DIR omegaconf; PYTHONPATH=DIR")
    if not torch.cuda.is_available():
        torch.Tensor.pin_memory = lambda self, *a, **k: self  # the loop pins labels for a host-to-GPU copy
    sampler_init = torch.utils.data.Sampler.__init__
    if sampler_init is object.__init__ or "data_source" not in sampler_init.__code__.co_varnames:
        # PyTorch 2.2 dropped Sampler.__init__(data_source), which its InfiniteSampler still passes.
        torch.utils.data.Sampler.__init__ = lambda self, data_source=None: None
    try:
        import torchvision  # noqa: F401
    except ImportError:
        # Imported (never called here) by its metrics package, which its loop imports; metrics are off.
        sys.modules["torchvision"] = types.ModuleType("torchvision")
    import dnnlib  # noqa: F401
    import src.legacy  # noqa: F401
    import training.loss  # noqa: F401
    import training.training_loop as training_loop

    training_loop.torch = _TorchOnCPU()
    return training_loop


# ----------------------------------------------------------------------------------------------------
# The loop's extension points: dataset, loss, progress callback (all defined here, found by name).


class FixedPairs:
    """A training set of `n` fixed clip pairs (uint8 frames, a dt each), the official dataset's interface."""

    def __init__(self, resolution: int = 16, n: int = 4, seed: int = 0, **_):
        rng = np.random.RandomState(seed)
        self.frames = rng.randint(0, 256, size=(n, 2, 3, resolution, resolution)).astype(np.uint8)
        self.dts = [float(k) / 15 for k in rng.randint(1, 16, size=n)]  # index gap / (16 - 1)
        self.resolution, self.num_channels = resolution, 3
        self.image_shape = [3, resolution, resolution]
        self.label_dim, self.label_shape, self.has_labels, self.name = 0, [0], False, "fixed-pairs"

    def __len__(self) -> int:
        return len(self.frames)

    def get_label(self, idx):
        return np.zeros([0], dtype=np.float32)

    def __getitem__(self, idx):
        label = self.get_label(idx)
        # like the official VideoFolderDataset: (img0, img1, label, label, float dt)
        return self.frames[idx, 0].copy(), self.frames[idx, 1].copy(), label, label, self.dts[idx]


RECORD: dict = {"iterations": [], "states": [], "w_avg": None}
AUG_LOG: list = []


def _make_recording_loss():
    import training.loss as official_loss

    original_diffaugment = official_loss.DiffAugment

    def recording_diffaugment(x, policy="color,translation,cutout", channels_first=True):
        start = len(AUG_LOG)
        out = original_diffaugment(x, policy=policy, channels_first=channels_first)
        draws = AUG_LOG[start:]
        params, i = {}, 0
        for p in policy.split(","):
            if p == "color":
                for key in ("brightness", "saturation", "contrast"):
                    assert draws[i][0] == "rand"
                    params[key] = draws[i][1].flatten()
                    i += 1
            elif p == "translation":
                for key in ("translation_x", "translation_y"):
                    assert draws[i][0] == "randint"
                    params[key] = draws[i][1].flatten()
                    i += 1
            else:
                raise ValueError(f"golden: policy {p!r} not recorded")
        assert i == len(draws), "unexpected draws inside DiffAugment"
        RECORD["iterations"][-1]["phases"][-1]["augment"].append({k: b64(v) for k, v in params.items()})
        return out

    official_loss.DiffAugment = recording_diffaugment
    sys.modules[original_diffaugment.__module__].torch = _RecordingTorch(AUG_LOG)

    class RecordingSynthesis(torch.nn.Module):
        """The loss's handle on G's synthesis net: records (Ts, z_motion) of each call, then runs it.
        (G itself is left as it is: the loop pickles it for its snapshots.)"""

        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, ws, Ts, z_motion, **kwargs):
            phase = RECORD["iterations"][-1]["phases"][-1]
            phase["t"] = b64(Ts.detach().reshape(-1, 2))
            phase["z_motion"] = b64(z_motion.detach())
            return self.net(ws, Ts, z_motion, **kwargs)

    class RecordingLoss(official_loss.OurStyleGAN2Loss):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # The loop's module summary ran G in train mode on torch.empty latents, which moved the
            # w_avg buffer by junk (NaN here); put back the resumed value so that its tracking over
            # the iterations can be compared (it only matters for truncation).
            with torch.no_grad():
                self.G_mapping.w_avg.copy_(RECORD["w_avg_resumed"])
            RECORD["w_avg"] = self.G_mapping.w_avg.detach().clone()  # at the loop's start
            self.G_synthesis = RecordingSynthesis(self.G_synthesis)

        def run_G(self, z, c, sync):
            RECORD["iterations"][-1]["phases"][-1]["z"] = b64(z.detach())
            return super().run_G(z, c, sync)

        def accumulate_gradients(self, phase, real_img, real_c, gen_z, gen_c, sync, gain):
            if phase == "Gmain":
                RECORD["iterations"].append({"phases": []})
            it = RECORD["iterations"][-1]
            it["phases"].append({"name": phase, "gain": gain, "augment": []})
            if phase in ("Dmain", "Dreg"):
                real = real_img.detach()
                if "real" in it:
                    assert torch.equal(it["real"], real), "Dmain and Dreg saw different reals"
                it["real"] = real
            return super().accumulate_gradients(phase, real_img, real_c, gen_z, gen_c, sync, gain)

    return RecordingLoss


# ----------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official-repo", required=True, type=Path, help="checkout of sihyun-yu/digan")
    parser.add_argument("--official-commit", default=None, help="its commit, recorded in the output "
                        "(default: git rev-parse HEAD there, if it is a git checkout)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    commit = args.official_commit
    if commit is None:
        r = subprocess.run(["git", "-C", str(args.official_repo), "rev-parse", "HEAD"], capture_output=True, text=True)
        commit = r.stdout.strip() if r.returncode == 0 else "unknown"

    training_loop = import_official(args.official_repo)
    import dnnlib
    import src.legacy as legacy

    cfg = load_config("demo-32", OVERRIDES)
    m, lo, o = cfg.model, cfg.loss, cfg.optim
    batch = cfg.train.batch_size

    # Our nets, seeded as the test builds them (SingleProcessTrainer(cfg, seed=SEED)).
    torch.manual_seed(SEED)
    G = build_generator(m).train()
    D = DiscriminatorPair(*build_discriminators(m)).train()
    G0 = {k: v.detach().clone() for k, v in G.state_dict().items()}
    D0 = {k: v.detach().clone() for k, v in D.state_dict().items()}

    # The official nets with the same weights.
    res_cfg = {"predictable_emb_size": m.coord_emb_size, "use_cosine": True}
    coords = {"enabled": True, "per_resolution": True, "kernel_size": 1, "coord_dim": 2, "fallback": False,
              "use_full_cache": False, "global_motion": False, "motion_sigma": m.sigma_t,
              "res_configs": {str(2 ** i): dict(res_cfg) for i in range(2, 11)}}
    gen_cfg = {"fp32": True, "upsampling_mode": "nearest", "use_noise": False, "fmaps": 1,
               "num_extra_convs": {str(r): m.extra_conv_resolutions.count(r) for r in set(m.extra_conv_resolutions)},
               "input": {"type": "coords", "resolution": m.input_resolution, "coord_fuser_cfg": coords},
               "coords": coords, "fmm": {"enabled": True, "rank": m.fmm_rank, "activation": "demod"}}
    G_kwargs = dnnlib.EasyDict(class_name="training.networks.Generator", z_dim=m.z_dim, w_dim=m.w_dim,
                               mapping_kwargs={"num_layers": m.mapping_layers},
                               synthesis_kwargs={"channel_base": m.channel_base, "channel_max": m.channel_max,
                                                 "num_fp16_res": 0, "conv_clamp": None}, cfg=gen_cfg)
    D_kwargs = dnnlib.EasyDict(class_name="training.networks.OurDiscriminator", channel_base=m.d_channel_base,
                               channel_max=m.d_channel_max, num_fp16_res=0, conv_clamp=None, block_kwargs={},
                               mapping_kwargs={}, epilogue_kwargs={"mbstd_group_size": m.mbstd_group})
    common = dict(c_dim=0, img_resolution=m.resolution, img_channels=3, ours=True)
    G_off = dnnlib.util.construct_class_by_name(**G_kwargs, **common).train()
    D_off = dnnlib.util.construct_class_by_name(**D_kwargs, **common).train()
    to_official(G0, G_off, official_key_G)
    to_official(D0, D_off, official_key_D)

    # Sanity: the converted official nets compute what ours compute.
    with torch.no_grad():
        gz = torch.Generator().manual_seed(1)
        z, z_M = torch.randn(batch, m.z_dim, generator=gz), torch.randn(batch, 512, generator=gz)
        t = torch.rand(batch, 2, generator=gz).sort(dim=1).values
        G.eval(), G_off.eval()
        ours = G(z, z_M, t)  # [B, 2, 3, H, W]
        theirs = G_off.synthesis(G_off.mapping(z, None), t.reshape(-1, 1, 1, 1), z_M)  # [(B 2), 3, H, W]
        g_err = (ours.flatten(0, 1) - theirs).abs().max().item()
        x7 = torch.cat([ours.flatten(1, 2), (t[:, 1] - t[:, 0]).view(-1, 1, 1, 1).expand(-1, 1, m.resolution,
                                                                                           m.resolution)], 1)
        lm, li, _ = D_off(x7, torch.zeros(batch, 0))
        d_err = max((lm.flatten() - D.mot(x7)).abs().max().item(),
                    (li.flatten() - D.img(ours.flatten(0, 1))).abs().max().item())
        G.train(), G_off.train()
        G_off.mapping.w_avg.copy_(G0["mapping.w_avg"])  # eval forward does not touch it, but be sure
    print(f"converted nets: |G ours - official| {g_err:.2e}, |D logits| {d_err:.2e}", flush=True)
    assert g_err < 1e-4 and d_err < 1e-4

    run_dir = Path(tempfile.mkdtemp(prefix="digan-official-golden-"))
    resume = run_dir / "resume.pkl"
    with open(resume, "wb") as f:
        pickle.dump({"G": G_off, "D": D_off, "G_ema": copy.deepcopy(G_off).eval()}, f)

    RECORD["w_avg_resumed"] = G0["mapping.w_avg"].clone()
    RecordingLoss = _make_recording_loss()
    main_mod = sys.modules["__main__"]
    main_mod.RecordingLoss, main_mod.FixedPairs = RecordingLoss, FixedPairs
    snapshot = run_dir / "network-snapshot-000000.pkl"

    def progress(cur_kimg, total_kimg):
        """After each tick (= each iteration here) the loop has written its snapshot: read it."""
        if not snapshot.exists():
            return
        with open(snapshot, "rb") as f:
            data = legacy.load_network_pkl(f)
        RECORD["states"].append({"G": from_official(data["G"], G0, official_key_G),
                                 "D": from_official(data["D"], D0, official_key_D),
                                 "G_ema": from_official(data["G_ema"], G0, official_key_G)})
        snapshot.unlink()

    opt = dict(class_name="torch.optim.Adam", lr=o.lr, betas=[o.beta1, o.beta2], eps=o.eps)
    training_loop.training_loop(
        run_dir=str(run_dir),
        training_set_kwargs=dict(class_name="__main__.FixedPairs", resolution=m.resolution, n=batch, seed=SEED),
        data_loader_kwargs=dict(num_workers=0), G_kwargs=G_kwargs, D_kwargs=D_kwargs,
        G_opt_kwargs=dnnlib.EasyDict(opt), D_opt_kwargs=dnnlib.EasyDict(opt), augment_kwargs=None,
        loss_kwargs=dict(class_name="__main__.RecordingLoss", r1_gamma=lo.r1_gamma, pl_weight=0,
                         style_mixing_prob=0, diffaugment=lo.diffaug_policy),
        metrics=[], random_seed=SEED, num_gpus=1, rank=0, batch_size=batch, batch_gpu=batch,
        ema_kimg=o.ema_kimg, ema_rampup=o.ema_rampup, G_reg_interval=lo.g_reg_interval,
        D_reg_interval=lo.r1_interval, total_kimg=ITERATIONS * batch / 1000, kimg_per_tick=batch / 1000,
        image_snapshot_ticks=None, network_snapshot_ticks=1, resume_pkl=str(resume), cudnn_benchmark=False,
        progress_fn=progress)

    assert len(RECORD["iterations"]) == ITERATIONS and len(RECORD["states"]) == ITERATIONS, \
        (len(RECORD["iterations"]), len(RECORD["states"]))
    iterations = []
    for it in RECORD["iterations"]:
        real = it["real"]  # [B, 7, H, W]: frames in [-1, 1] (uint8 / 127.5 - 1), dt plane
        pixels = ((real[:, :6] + 1) * 127.5).round()
        assert torch.allclose(pixels / 127.5 - 1, real[:, :6].to(pixels.dtype), atol=1e-6)
        phases = []
        for ph in it["phases"]:
            entry = {"name": ph["name"], "gain": ph["gain"], "augment": ph["augment"]}
            entry.update({k: ph[k] for k in ("z", "z_motion", "t") if k in ph})
            phases.append(entry)
        iterations.append({"real_pixels": b64(pixels.to(torch.uint8).view(-1, 2, 3, m.resolution, m.resolution)),
                           "real_dt": b64(real[:, 6, 0, 0].double()), "phases": phases})
    G_ema0 = G0  # the resume pickle's G_ema is a copy of G
    after = []
    for st in RECORD["states"]:
        after.append({"G": {k: tensor_stats(k, v, G0[k]) for k, v in st["G"].items()},
                      "D": {k: tensor_stats(k, v, D0[k]) for k, v in st["D"].items()},
                      "G_ema": {k: tensor_stats(k, v, G_ema0[k]) for k, v in st["G_ema"].items()}})
    out = {
        "about": "Two iterations of the official DIGAN training loop (tests/golden/make_train_golden.py); "
                 "draws recorded inside it, per-tensor stats of G, D, G_ema after each iteration.",
        "official_commit": commit, "torch": torch.__version__, "overrides": OVERRIDES, "seed": SEED,
        "iterations": iterations, "w_avg_start": b64(RECORD["w_avg"]),
        "initial": {"G": {k: tensor_stats(k, v, v) for k, v in G0.items()},
                    "D": {k: tensor_stats(k, v, v) for k, v in D0.items()}},
        "after": after,
        "sanity": {"G_forward_max_abs_diff": g_err, "D_logits_max_abs_diff": d_err},
    }
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
