"""Write tests/golden/pinned_steps.json: losses and parameter checksums of N training steps at a fixed seed.

    python tests/golden/make_pinned_steps.py        # only when a change MEANS to change the numbers

`tests/test_pinned_steps.py` replays the same run and compares. Made before the refactors of the
architecture issue (one sampling path, one storage layer, the worker split): a refactor that does not mean
to change the maths must leave these numbers as they are.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

OUT = Path(__file__).resolve().parent / "pinned_steps.json"
# demo-32 at 16 px with small widths, R1 every 2 steps (separate schedule), DiffAugment and xflip on.
OVERRIDES = ["model.resolution=16", "model.input_resolution=8", "model.channel_max=16", "model.d_channel_max=16",
             "model.z_dim=16", "model.w_dim=16", "model.motion_z_dim=16", "model.coord_emb_size=8",
             "train.batch_size=4", "loss.r1_interval=2",
             # the numbers were pinned before demo-32 slowed its frequencies and lowered its learning rate
             "model.fourier_lr_mult=1.0", "optim.lr=0.0025", "optim.ema_kimg=1.0"]
STEPS = 6


def run() -> dict:
    from digan.config import load_config
    from digan.training import SingleProcessTrainer, stats_to_floats

    torch.set_num_threads(1)
    cfg = load_config("demo-32", OVERRIDES)
    trainer = SingleProcessTrainer(cfg, seed=0)
    g = torch.Generator().manual_seed(7)
    steps = []
    for _ in range(STEPS):
        pair = torch.rand(4, 2, 3, 16, 16, generator=g) * 2 - 1
        dt = torch.rand(4, generator=g)
        s = stats_to_floats(trainer.train_step(pair, dt))
        steps.append({k: s[k] for k in ("loss_G", "loss_D", "D_M_real", "D_I_fake", "r1") if k in s})
    checksums = {}
    for name, net in (("G", trainer.G), ("D", trainer.D), ("G_ema", trainer.G_ema)):
        flat = torch.cat([p.detach().double().flatten() for p in net.parameters()])
        checksums[name] = {"sum": float(flat.sum()), "sum_sq": float(flat.square().sum()),
                           "abs_max": float(flat.abs().max())}
    return {"overrides": OVERRIDES, "steps": steps, "checksums": checksums, "torch": torch.__version__}


if __name__ == "__main__":
    OUT.write_text(json.dumps(run(), indent=1) + "\n")
    print(f"wrote {OUT}")
