"""Fake-sample latents keyed by global sample index: the same fakes on any number of workers.

z, z_M and t of fake sample i at step s come from a generator seeded by (seed, s, phase), drawn for the whole
global batch; each rank keeps its rows. Every trainer's loss draws through them (`recipe.Trainer`: one
process, or one rank of many), so one process and N workers train on the same fake videos for the same
global batch. The step's augmentation draws (xflip of the reals, ADA, DiffAugment) are keyed the same way
(`KeyedLatents.rows`), on their own counter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from digan.training.loss import sample_time_pairs


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix-style), stable across processes and Python versions."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h ^= (int(p) + 0x9E3779B97F4A7C15 + ((h << 6) & (2**64 - 1)) + (h >> 2)) & (2**64 - 1)
        h = (h * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    return h & (2**63 - 1)


@dataclass
class Rows:
    """Draw for all `total` samples of a global batch from `generator` (CPU) and keep the rows `ids` (this
    process's samples, in its order): a sample's draw is then the same whichever worker holds it."""

    generator: torch.Generator
    total: int
    ids: torch.Tensor

    def keep(self, drawn: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return drawn[self.ids].to(like.device)


class KeyedLatents:
    """z, z_M and t of fake sample i at step s are a function of (seed, s, phase, i), not of the rank.

    Every rank draws the latents of the WHOLE global batch from one CPU generator seeded by
    (seed, step, phase) and keeps its own rows, so a run on 1 worker and a run on 2 workers draw the
    same fake videos for the same global batch (the data-parallel test relies on it; it also makes a
    resumed run on another number of workers draw the same latents). The cost is a draw of
    global_batch x (z_dim + motion_z_dim) numbers per phase, negligible next to a GAN step.
    Phases count the calls within a step (G step's fakes, then D step's fakes: fresh z for each).
    """

    def __init__(self, seed: int, global_batch: int):
        self.seed, self.global_batch = seed, global_batch
        self.step, self.phase, self.augment_phase = 0, 0, 0
        self.sample_ids = torch.arange(global_batch)

    def begin_step(self, step: int, sample_ids: torch.Tensor) -> None:
        self.step, self.phase, self.augment_phase, self.sample_ids = step, 0, 0, sample_ids.cpu().long()

    def rows(self) -> Rows:
        """The next augmentation draw of this step: for the whole global batch, keyed by (seed, step, 2**20 +
        call), this process's rows kept (`digan.training.augment.Rows`)."""
        g = torch.Generator(device="cpu").manual_seed(_mix(self.seed, self.step, (1 << 20) + self.augment_phase))
        self.augment_phase += 1
        return Rows(g, self.global_batch, self.sample_ids)

    def draw(self, z_dim: int, motion_z_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = torch.Generator(device="cpu").manual_seed(_mix(self.seed, self.step, self.phase))
        self.phase += 1
        n, ids = self.global_batch, self.sample_ids
        z = torch.randn(n, z_dim, generator=g)[ids]
        z_M = torch.randn(n, motion_z_dim, generator=g)[ids]
        t = sample_time_pairs(n, generator=g)[ids]
        return z, z_M, t
