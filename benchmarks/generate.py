"""Video generation speed: frames/s for 16-, 128- and 256-frame videos, with peak memory.

    python benchmarks/generate.py                              # demo-64 and digan-128, CUDA if available
    python benchmarks/generate.py --presets demo-64 --lengths 16,128 --videos 4 --threads 2

Each (preset, length) row runs in its own subprocess, so peak memory is per row: ru_maxrss of that process
on CPU (includes the model and the Python/torch runtime), torch.cuda.max_memory_allocated on GPU. Rendering
is what `digan.generate` does: per-video INR weights prepared once, frames rendered in chunks of at most
--max-frames-in-memory frames and converted to uint8 (no file encoding). The time covers prepare + render
for all videos of a row after one untimed warm-up chunk; the model is freshly initialised (speed does not
depend on the weights). On CPU, digan-128 renders one video per length by default to keep the run short.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from common import json_row, load_avg, peak_rss_mib  # noqa: E402 (also puts the repository on sys.path)
from digan.config import load_config  # noqa: E402
from digan.malloc import configure_malloc  # noqa: E402
from digan.models import build_generator  # noqa: E402
from digan.sampling import render_chunks, seed_latents, time_stamps, to_uint8  # noqa: E402


def run_row(preset: str, num_frames: int, num_videos: int, max_frames: int, device: torch.device) -> dict:
    cfg = load_config(preset)
    configure_malloc(cfg.dist, device)  # as digan.generate does
    torch.manual_seed(0)
    G = build_generator(cfg.model).to(device).eval().requires_grad_(False)
    per_batch = max(1, min(num_videos, max_frames // num_frames))
    chunk = max(1, max_frames // per_batch)
    t = time_stamps(num_frames)

    def render(seeds: list[int], frames: torch.Tensor) -> int:
        n = 0
        for b0 in range(0, len(seeds), per_batch):
            z, zm = seed_latents(seeds[b0: b0 + per_batch], G.z_dim, G.motion_z_dim)
            for _, x in render_chunks(G, z, zm, frames, 1, chunk):
                n += to_uint8(x).shape[0] * x.shape[1]  # includes the device -> host copy
        return n

    render([1000], t[:min(num_frames, chunk)])  # warm-up (allocator, oneDNN/cuDNN kernels)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    cpu_start = time.process_time()
    frames = render(list(range(num_videos)), t)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mb = peak_rss_mib()
    return {"preset": preset, "num_frames": num_frames, "videos": num_videos, "frames": frames,
            "per_batch": per_batch, "chunk": chunk, "wall_s": wall, "cpu_s": cpu,
            "frames_per_s": frames / wall, "peak_mb": peak_mb, "device": str(device),
            "resolution": cfg.model.resolution, "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="demo-64,digan-128")
    p.add_argument("--lengths", default="16,128,256", help="frames per video")
    p.add_argument("--videos", type=int, default=None,
                   help="videos per row (default 2; 1 for digan-128 on CPU)")
    p.add_argument("--max-frames-in-memory", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)  # internal: run one row, print JSON
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)

    if args.row is not None:
        preset, num_frames, num_videos = args.row.split(":")
        print(json.dumps(run_row(preset, int(num_frames), int(num_videos), args.max_frames_in_memory, device)))
        return

    print(f"# benchmarks/generate.py  device={device}  threads={args.threads or torch.get_num_threads()}  "
          f"max_frames_in_memory={args.max_frames_in_memory}  load_avg={load_avg()}")
    header = f"{'preset':<10} {'res':>4} {'frames':>6} {'videos':>6} {'batch x chunk':>13} {'wall s':>8} " \
             f"{'cpu s':>8} {'frames/s':>9} {'peak MB':>8}"
    print(header)
    print("-" * len(header))
    for preset in args.presets.split(","):
        for length in (int(x) for x in args.lengths.split(",")):
            videos = args.videos or (1 if preset == "digan-128" and device.type == "cpu" else 2)
            cmd = [sys.executable, __file__, "--row", f"{preset}:{length}:{videos}",
                   "--max-frames-in-memory", str(args.max_frames_in_memory), "--device", str(device)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            try:
                r = json_row(cmd)
            except RuntimeError as e:
                print(f"{preset:<10} {length:>11} FAILED: {e}")
                continue
            print(f"{preset:<10} {r['resolution']:>4} {length:>6} {videos:>6} "
                  f"{str(r['per_batch']) + ' x ' + str(r['chunk']):>13} {r['wall_s']:>8.2f} {r['cpu_s']:>8.2f} "
                  f"{r['frames_per_s']:>9.2f} {r['peak_mb']:>8.0f}", flush=True)


if __name__ == "__main__":
    main()
