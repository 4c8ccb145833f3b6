"""digan.training: the DIGAN recipe (loss, lazy R1, DiffAugment and ADA, EMA, Adam settings, one iteration).

No Ray or DeepSpeed here: the distributed worker supplies DeepSpeed-backed `Updater`s and calls
`train_step` with the engines' modules.
"""

from digan.training.augment import AdaptiveAugment, AdaTuner, DiffAugment, random_xflip
from digan.training.ema import EMA
from digan.training.loss import DIGANLoss, motion_input, sample_time_pairs
from digan.training.optim import (PlainUpdater, Updater, adam_kwargs, build_adam, d_reg_interval, lazy_reg_ratio,
                                  sanitize_grads_)
from digan.training.recipe import (DiscriminatorPair, SingleProcessTrainer, Trainer, build_ada_tuner, d_step, fit, frozen,
                                   g_step, r1_step, stats_to_floats, train_step, tune_ada)

__all__ = [
    "AdaptiveAugment", "AdaTuner", "build_ada_tuner", "tune_ada", "DiffAugment", "random_xflip", "EMA", "DIGANLoss", "motion_input", "sample_time_pairs", "PlainUpdater", "Updater",
    "adam_kwargs", "build_adam", "d_reg_interval", "lazy_reg_ratio", "sanitize_grads_", "DiscriminatorPair",
    "SingleProcessTrainer", "Trainer", "d_step", "fit", "frozen", "g_step", "r1_step", "stats_to_floats", "train_step",
]
