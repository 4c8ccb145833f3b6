"""Time the official DIGAN code itself, as its repository ships it, at the official UCF-101 settings on CPU.

    git clone https://github.com/sihyun-yu/digan /tmp/digan-official && git -C /tmp/digan-official checkout e822320
    pip install omegaconf                      # the official networks' own dependency (einops comes with ours)
    python benchmarks/official_code.py --official-repo /tmp/digan-official
    python benchmarks/train_step.py --rows official --official-repo /tmp/digan-official --repeat 2   # interleaved

Nothing of the official code is copied here: this driver puts the checkout's `src/` on sys.path, imports its
`training.networks`, `training.loss` and bundled `torch_utils`, and drives them the way
`src/training/training_loop.py` does. One shim, for today's numpy: `np.float = float` (its `layers.py` uses the
alias numpy 1.24 removed). Hydra is not needed: the generator config is read from `configs/digan.yml` with
OmegaConf, as `train.py`'s `compose()` + `OmegaConf.to_container()` read it.

Settings (from `src/train.py` with `configs/main.yml` + `configs/digan.yml`, `--cfg auto` and 8 GPUs, so 8 clips per
GPU, mbstd group 4, lr 0.0025, EMA 20 kimg with ramp-up 0.05; R1 gamma 1, no path-length term, no style mixing,
DiffAugment color,translation), except:
  - resolution 64 (the official code hard-codes 128; `--resolution` changes it) and batch 4 per process;
  - D in fp32 without the fp16 activation clamp, i.e. the official `--fp32=true` switch (G is fp32 in the config
    already); its 4 fp16 blocks are meant for CUDA. `--d-clamp` keeps conv_clamp=256 in fp32.
The parameter counts must equal ours at these settings: G 52,210,703, D_I 26,488,833, D_M 26,490,881.

One iteration is the training loop's body for a given `batch_idx`: fetch (random reals, z, c), then the phases
Gmain, Greg (every 4th: with pl_weight 0 an empty Adam step), Dmain, Dreg (every 16th, gain 16), each as the loop
runs it (zero_grad, requires_grad_ on the phase's module, `loss.accumulate_gradients`, nan_to_num of the grads,
Adam step), then the G_ema update. After a warm-up R1 iteration, timed iterations alternate a plain one
(batch_idx 16k+1, 16k+2, ...) and an R1 one (batch_idx 16k). Whole iterations are timed (wall and process CPU
seconds), and each phase too. The official code runs with glibc's default malloc and the process's peak RSS is
reported (ru_maxrss). Progress goes to stderr; `--json` prints one JSON line for benchmarks/train_step.py.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import load_avg, peak_rss_mib  # (also puts this repository on sys.path, after which the checkout goes)

EXPECTED_PARAMS = {"G": 52_210_703, "D_I": 26_488_833, "D_M": 26_490_881}  # at 64x64, ours and the official
PHASE_NAMES = ("Gmain", "Greg", "Dmain", "Dreg")


def import_official(repo: Path):
    """Import the official modules from a checkout (its `src/` and root on sys.path, like its own scripts)."""
    src = repo / "src"
    if not (src / "training" / "networks.py").is_file():
        raise SystemExit(f"{repo} is not a checkout of sihyun-yu/digan (no src/training/networks.py)")
    import numpy as np

    if not hasattr(np, "float"):
        np.float = float  # layers.py: `max_num_feats: int = np.float('inf')`; the alias was removed in numpy 1.24
    try:
        import omegaconf  # noqa: F401  (networks.py and layers.py use it)
    except ImportError as err:
        raise SystemExit("the official networks need omegaconf: pip install omegaconf") from err
    sys.path[:0] = [str(src), str(repo)]  # `training.*`, `torch_utils`, `dnnlib`, and loss.py's `src.training.*`
    import dnnlib
    from torch_utils import misc
    from torch_utils.ops import conv2d_gradfix, grid_sample_gradfix
    from training import loss as loss_module
    from training import networks

    return dnnlib, misc, conv2d_gradfix, grid_sample_gradfix, networks, loss_module


def official_commit(repo: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], check=True, text=True,
                              capture_output=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def build(repo: Path, resolution: int, batch: int, d_clamp: bool, seed: int = 0):
    """G, D, G_ema, loss and phases as train.py's setup_training_loop_kwargs + training_loop build them."""
    import numpy as np
    import torch

    dnnlib, misc, conv2d_gradfix, grid_sample_gradfix, networks, loss_module = import_official(repo)
    from omegaconf import OmegaConf
    hydra_cfg = OmegaConf.load(repo / "configs" / "digan.yml")
    main_cfg = OmegaConf.load(repo / "configs" / "main.yml")
    gpus = int(main_cfg.num_gpus)  # 8
    res_data = 128  # train.py: UCF-101 at resolution=128, which sets the 'auto' spec below
    mb = max(min(gpus * min(4096 // res_data, 32), 64), gpus)  # train.py's 'auto' spec
    spec = dnnlib.EasyDict(mb=mb, mbstd=min(mb // gpus, 4), lrate=0.0025, ema=mb * 10 / 32, ramp=0.05, map=2)

    G_kwargs = dnnlib.EasyDict(class_name="training.networks.Generator", z_dim=512, w_dim=512,
                               mapping_kwargs=dnnlib.EasyDict(), synthesis_kwargs=dnnlib.EasyDict())
    D_kwargs = dnnlib.EasyDict(class_name="training.networks.OurDiscriminator", block_kwargs=dnnlib.EasyDict(),
                               mapping_kwargs=dnnlib.EasyDict(), epilogue_kwargs=dnnlib.EasyDict())
    G_kwargs.synthesis_kwargs.channel_base = int(hydra_cfg.generator.get("fmaps", 0.5) * 32768)
    D_kwargs.channel_base = int(hydra_cfg.get("discriminator", {}).get("fmaps", 0.5) * 32768)
    G_kwargs.synthesis_kwargs.channel_max = D_kwargs.channel_max = 512
    G_kwargs.mapping_kwargs.num_layers = hydra_cfg.generator.get("mapping_net_n_layers", spec.map)
    G_kwargs.synthesis_kwargs.num_fp16_res = D_kwargs.num_fp16_res = 4
    G_kwargs.synthesis_kwargs.conv_clamp = D_kwargs.conv_clamp = 256
    G_kwargs.cfg = OmegaConf.to_container(hydra_cfg.generator)
    D_kwargs.epilogue_kwargs.mbstd_group_size = spec.mbstd
    if hydra_cfg.generator.get("fp32"):
        G_kwargs.synthesis_kwargs.num_fp16_res = 0
        G_kwargs.synthesis_kwargs.conv_clamp = None
    # D in fp32: the official `--fp32=true` (num_fp16_res 0, conv_clamp None); its fp16 blocks are for CUDA.
    D_kwargs.num_fp16_res = 0
    D_kwargs.conv_clamp = 256 if d_clamp else None
    opt_kwargs = dnnlib.EasyDict(class_name="torch.optim.Adam", lr=spec.lrate, betas=[0, 0.99], eps=1e-8)
    loss_kwargs = dnnlib.EasyDict(class_name="training.loss.OurStyleGAN2Loss",
                                  r1_gamma=float(hydra_cfg.loss_kwargs.r1_gamma))  # the yml's 1.0 overrides 'auto'
    loss_kwargs.style_mixing_prob = hydra_cfg.loss_kwargs.style_mixing_prob
    loss_kwargs.pl_weight = hydra_cfg.loss_kwargs.pl_weight
    loss_kwargs.diffaugment = main_cfg.train_args.diffaugment  # color,translation

    # training_loop(): seeds, flags, networks, loss, phases (with lazy-regularisation rescaling).
    device = torch.device("cpu")
    np.random.seed(seed)
    torch.manual_seed(seed)
    conv2d_gradfix.enabled = True
    grid_sample_gradfix.enabled = True
    common_kwargs = dict(c_dim=0, img_resolution=resolution, img_channels=3, ours=True)  # cond=false: no labels
    G = dnnlib.util.construct_class_by_name(**G_kwargs, **common_kwargs).train().requires_grad_(False).to(device)
    D = dnnlib.util.construct_class_by_name(**D_kwargs, **common_kwargs).train().requires_grad_(False).to(device)
    G_ema = copy.deepcopy(G).eval()
    loss = dnnlib.util.construct_class_by_name(device=device, G_mapping=G.mapping, G_synthesis=G.synthesis, D=D,
                                               **loss_kwargs)
    phases = []
    for name, module, reg_interval in [("G", G, 4), ("D", D, 16)]:
        mb_ratio = reg_interval / (reg_interval + 1)
        kw = dnnlib.EasyDict(opt_kwargs)
        kw.lr = kw.lr * mb_ratio
        kw.betas = [beta ** mb_ratio for beta in kw.betas]
        opt = dnnlib.util.construct_class_by_name(module.parameters(), **kw)
        phases += [dnnlib.EasyDict(name=name + "main", module=module, opt=opt, interval=1)]
        phases += [dnnlib.EasyDict(name=name + "reg", module=module, opt=opt, interval=reg_interval)]
    return dict(G=G, D=D, G_ema=G_ema, loss=loss, phases=phases, misc=misc, batch=batch, resolution=resolution,
                ema_kimg=spec.ema, ema_rampup=spec.ramp, loss_kwargs=dict(loss_kwargs))


def param_counts(m: dict) -> dict:
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    return {"G": count(m["G"]), "D_I": count(m["D"].imageD), "D_M": count(m["D"].videoD)}


class _Meter:
    """Wall, process CPU and kernel CPU seconds and minor page faults of a block of code."""

    def __enter__(self):
        self.usage, self.wall, self.cpu = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(), \
            time.process_time()
        return self

    def __exit__(self, *exc):
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.result = {"wall": time.perf_counter() - self.wall, "cpu": time.process_time() - self.cpu,
                       "sys": usage.ru_stime - self.usage.ru_stime, "faults": usage.ru_minflt - self.usage.ru_minflt}


def iteration(m: dict, batch_idx: int) -> dict[str, dict[str, float]]:
    """One training-loop iteration at `batch_idx`; returns the `_Meter` figures of each part."""
    import numpy as np
    import torch

    G, G_ema, loss, phases, misc, batch, res = (m[k] for k in ("G", "G_ema", "loss", "phases", "misc", "batch",
                                                             "resolution"))
    parts: dict[str, dict[str, float]] = {}
    with _Meter() as meter:
        # Fetch: the loader's pair (two frames in [-1, 1], 6 channels) and the Δt plane; z per phase; no labels.
        real = torch.rand(batch, 6, res, res) * 2 - 1
        times = torch.rand(batch).view(-1, 1, 1, 1) * torch.ones_like(real[:, 0:1])
        phase_real_img = torch.cat([real, times], dim=1).split(batch)
        phase_real_c = torch.zeros(batch, 0).split(batch)
        all_gen_z = torch.randn([len(phases) * batch, G.z_dim])
        all_gen_z = [z.split(batch) for z in all_gen_z.split(batch)]
        all_gen_c = torch.from_numpy(np.zeros([len(phases) * batch, 0], dtype=np.float32))
        all_gen_c = [c.split(batch) for c in all_gen_c.split(batch)]
    parts["fetch"] = meter.result

    for phase, phase_gen_z, phase_gen_c in zip(phases, all_gen_z, all_gen_c):
        if batch_idx % phase.interval != 0:
            continue
        with _Meter() as meter:
            phase.opt.zero_grad(set_to_none=True)
            phase.module.requires_grad_(True)
            for real_img, real_c, gen_z, gen_c in zip(phase_real_img, phase_real_c, phase_gen_z, phase_gen_c):
                loss.accumulate_gradients(phase=phase.name, real_img=real_img, real_c=real_c, gen_z=gen_z,
                                          gen_c=gen_c, sync=True, gain=phase.interval)
            phase.module.requires_grad_(False)
            for param in phase.module.parameters():
                if param.grad is not None:
                    misc.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)
            phase.opt.step()
        parts[phase.name] = meter.result

    with _Meter() as meter:  # G_ema; G's parameters have requires_grad off here, as in the loop: no graph
        cur_nimg = batch_idx * batch
        ema_nimg = m["ema_kimg"] * 1000
        if m["ema_rampup"] is not None:
            ema_nimg = min(ema_nimg, cur_nimg * m["ema_rampup"])
        ema_beta = 0.5 ** (batch / max(ema_nimg, 1e-8))
        for p_ema, p in zip(G_ema.parameters(), G.parameters()):
            p_ema.copy_(p.lerp(p_ema, ema_beta))
        for b_ema, b in zip(G_ema.buffers(), G.buffers()):
            b_ema.copy_(b)
    parts["Gema"] = meter.result
    return parts


def run(repo: Path, resolution: int, batch: int, iters: int, warmup: int, threads: int, d_clamp: bool,
        keep_freed: bool = False) -> dict:
    import torch

    if keep_freed:  # ablation: our workers' malloc settings (digan/malloc.py) under the official code
        from digan.malloc import keep_freed_memory  # the repository is on sys.path (benchmarks/common.py)

        keep_freed = keep_freed_memory()
    torch.set_num_threads(threads)
    m = build(repo, resolution, batch, d_clamp)
    params = param_counts(m)
    print(f"  official-code {official_commit(repo)}: G {params['G']:,}  D_I {params['D_I']:,}  "
          f"D_M {params['D_M']:,} parameters", file=sys.stderr, flush=True)
    if resolution == 64 and params != EXPECTED_PARAMS:
        raise RuntimeError(f"official parameter counts {params} differ from ours {EXPECTED_PARAMS}")

    # Warm-up: R1 iterations (every phase runs); then alternate plain (16k+1, 16k+2, ...) and R1 (16k) iterations.
    schedule = [(0, "warmup")] * warmup
    for i in range(iters):
        schedule += [(16 * (i + 1) + 1 + i % 15, "plain"), (16 * (i + 1), "r1")]
    whole: dict[str, list[dict[str, float]]] = {"plain": [], "r1": []}
    parts: dict[str, list[dict[str, dict[str, float]]]] = {"plain": [], "r1": []}
    for batch_idx, kind in schedule:
        with _Meter() as meter:
            seconds = iteration(m, batch_idx)
        print(f"  official-code {kind} iteration (batch_idx {batch_idx}): {meter.result['wall']:.2f}s = "
              + " ".join(f"{k} {v['wall']:.2f}s" for k, v in seconds.items())
              + f"  (cpu {meter.result['cpu']:.1f}s, sys {meter.result['sys']:.1f}s, "
                f"{meter.result['faults'] / 1e6:.2f}M faults, load {os.getloadavg()[0]:.1f})",
              file=sys.stderr, flush=True)
        if kind != "warmup":
            whole[kind].append(meter.result)
            parts[kind].append(seconds)

    def column(kind: str, names, measure: str) -> list[float]:  # per iteration, the sum of some parts
        return [sum(it[p][measure] for p in names if p in it) for it in parts[kind]]

    # benchmarks/train_step.py's columns: D = Dmain, D_R1 = Dmain + Dreg, G = Gmain + Greg, EMA = G_ema update.
    cols = {"D": ("plain", ["Dmain"]), "D_R1": ("r1", ["Dmain", "Dreg"]),
            "G": ("plain", ["fetch", "Gmain", "Greg"]), "EMA": ("plain", ["Gema"])}
    per_phase = {measure: {k: column(kind, names, measure) for k, (kind, names) in cols.items()}
                 for measure in ("wall", "cpu", "sys", "faults")}
    return {
        "row": "official-code", "resolution": resolution, "batch": batch, "device": "cpu",
        "threads": torch.get_num_threads(), "official_commit": official_commit(repo), "params": params,
        "G_params_M": params["G"] / 1e6, "D_params_M": (params["D_I"] + params["D_M"]) / 1e6,
        **per_phase, "iterations": whole, "iteration_parts": parts,
        "peak_mem_MiB": peak_rss_mib(),
        "malloc": "keep freed (ablation)" if keep_freed else "glibc default",
        "d_conv_clamp": 256 if d_clamp else None, "loss_kwargs": m["loss_kwargs"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official-repo", type=Path, required=True, help="a checkout of sihyun-yu/digan (e822320)")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4, help="clips per iteration (one process)")
    parser.add_argument("--iters", type=int, default=2, help="timed plain and timed R1 iterations, each")
    parser.add_argument("--warmup", type=int, default=1, help="untimed R1 iterations first")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--d-clamp", action="store_true", help="keep D's conv_clamp=256 (in fp32)")
    parser.add_argument("--keep-freed", action="store_true",
                        help="ablation: our workers' malloc settings (digan/malloc.py) instead of glibc's default")
    parser.add_argument("--json", action="store_true", help="print one JSON line (for train_step.py)")
    args = parser.parse_args()
    r = run(args.official_repo.resolve(), args.resolution, args.batch, args.iters, args.warmup, args.threads,
            args.d_clamp, args.keep_freed)
    if args.json:
        print(json.dumps(r))
        return
    p = r["params"]
    print(f"official code {r['official_commit']} at {r['resolution']}x{r['resolution']}, batch {r['batch']}, "
          f"{r['threads']} threads, D fp32 (conv_clamp {r['d_conv_clamp']})")
    print(f"parameters: G {p['G']:,}  D_I {p['D_I']:,}  D_M {p['D_M']:,}")
    for kind in ("plain", "r1"):
        its = r["iterations"][kind]
        med = {k: statistics.median(it[k] for it in its) for k in ("wall", "cpu", "sys", "faults")}
        walls = ", ".join(f"{it['wall']:.2f}" for it in its)
        print(f"{kind:>5} iteration: median {med['wall']:.2f} s wall ({walls}), {med['cpu']:.1f} s CPU "
              f"({med['sys']:.1f} s in the kernel), {med['faults'] / 1e6:.2f} M minor page faults")
    print(f"peak RSS {r['peak_mem_MiB'] / 1024:.2f} GiB; load average {load_avg()}")


if __name__ == "__main__":
    main()
