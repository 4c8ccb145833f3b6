"""CLI: `python -m data_shards {build,demo,inspect} ...` (also installed as `data-shards`).

    data-shards build ~/UCF-101 s3://bucket/ucf101-128 --layout ucf101 --split train --resolution 128
    data-shards build ~/taichi ./taichi-128 --layout frames --split train --frame-skip 4
    data-shards build ~/clips ./clips-64 --resolution 64 --encoding mp4 --windows overlap --clip-stride 8
    data-shards demo ./demo-64 --resolution 64
    data-shards inspect s3://bucket/ucf101-128

S3 destinations use the standard AWS environment/config for credentials (AWS_ACCESS_KEY_ID ...,
AWS_PROFILE or --s3-profile); the endpoint and region come from --s3-endpoint-url/--s3-region or
AWS_ENDPOINT_URL/AWS_DEFAULT_REGION. Credentials are never printed. Re-running an interrupted build
with the same arguments resumes it. Errors and Ctrl-C end with one line on stderr (exit 2, or 130).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from data_shards.build import JOURNAL, BuildError, BuildOptions, build_shards
from data_shards.records import MANIFEST
from data_shards.sources import LAYOUTS, IMAGE_EXTS, discover
from data_shards.storage import Destination
from digan.storage.s3 import S3Settings


def detect_layout(root: str, split: str) -> str:
    """ucf101 if the official split files are there, frames if `<root>/<split>/<video>/` holds images, else videos."""
    r = Path(root)
    if any((d / "ucfTrainTestlist" / "classInd.txt").exists() for d in (r, r / "train")):
        return "ucf101"
    split_dirs = [r / split] if split != "all" else [p for p in r.iterdir() if p.is_dir()]
    for d in split_dirs:
        if d.is_dir():
            for vid in d.iterdir():
                if vid.is_dir() and any(p.suffix.lower() in IMAGE_EXTS for p in vid.iterdir()):
                    return "frames"
    return "videos"


def _add_output_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--resolution", type=int, default=128, help="frame side after centre crop + resize (default 128)")
    g.add_argument("--clip-length", type=int, default=16, help="frames per clip (default 16)")
    g.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="decode/encode processes (default: CPUs, at most 8)")
    g.add_argument("--s3-endpoint-url", default=None, help="S3 endpoint (else AWS_ENDPOINT_URL / AWS config)")
    g.add_argument("--s3-region", default=None, help="S3 region (else AWS_DEFAULT_REGION / AWS config)")
    g.add_argument("--s3-profile", default=None, help="AWS config profile holding the credentials")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--dry-run", action="store_true", help="print what would be built and exit")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="data-shards", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="build shards from a folder of videos, UCF-101 or frame folders")
    b.add_argument("input", help="input folder")
    b.add_argument("dest", help="output folder or s3://bucket/prefix")
    b.add_argument("--layout", choices=("auto",) + LAYOUTS, default="auto",
                   help="videos: any video files; ucf101: class folders + ucfTrainTestlist; "
                        "frames: <input>/<split>/<video>/*.png|jpg (default: detect)")
    b.add_argument("--split", default="train",
                   help="ucf101: train, test or all; frames: the split folder (train, val, test) or all")
    b.add_argument("--ucf-fold", type=int, default=1, choices=(1, 2, 3), help="official UCF-101 split (default 1)")
    b.add_argument("--frame-skip", type=int, default=1, help="keep every k-th frame (TaiChi: 4) (default 1)")
    b.add_argument("--windows", choices=("disjoint", "overlap"), default="disjoint",
                   help="disjoint: non-overlapping chunks (interleaved when frame-skip > 1); "
                        "overlap: a clip every --clip-stride frames (default disjoint)")
    b.add_argument("--clip-stride", type=int, default=1, help="overlap: frames between clip starts (default 1)")
    b.add_argument("--encoding", choices=("jpg", "png", "mp4"), default="jpg",
                   help="jpg: JPEG q95 per frame; png: lossless per frame; mp4: h264 per clip (default jpg)")
    b.add_argument("--shard-size-mb", type=float, default=256.0, help="target shard size in MiB (default 256)")
    b.add_argument("--max-clips-per-shard", type=int, default=0, help="also cap clips per shard; 0 = no cap")
    _add_output_args(b)

    d = sub.add_parser("demo", help="build the embedded demo dataset (real footage shipped in packages)")
    d.add_argument("dest", help="output folder or s3://bucket/prefix")
    _add_output_args(d)
    d.set_defaults(resolution=64)

    i = sub.add_parser("inspect", help="print a built dataset's manifest summary")
    i.add_argument("location", help="shard folder or s3://bucket/prefix")
    i.add_argument("--s3-endpoint-url", default=None)
    i.add_argument("--s3-region", default=None)
    i.add_argument("--s3-profile", default=None)
    return parser.parse_args(argv)


def _summary(m: dict) -> str:
    lines = [f"{m['num_clips']} clips in {m['num_shards']} shards from {m['num_videos_used']} of "
             f"{m['num_videos']} videos; {m['num_skipped']} skipped"]
    lines += [f"  skipped {s['source']}: {s['reason']}" for s in m["skipped"][:50]]
    if len(m["skipped"]) > 50:
        lines.append(f"  ... and {len(m['skipped']) - 50} more (see {MANIFEST})")
    cut = [v for v in m["sources"] if "header_frames" in v or "decode_error" in v]
    if cut:
        lines.append(f"  {len(cut)} videos cut short (truncated or corrupt) gave the clips of the frames that "
                     f"decoded (see header_frames / decode_error in {MANIFEST})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    s3 = S3Settings(endpoint_url=args.s3_endpoint_url, region=args.s3_region, profile=args.s3_profile)
    try:
        if args.command == "inspect":
            where = Destination(args.location, s3)  # reads only: creates nothing
            m = where.read_json(MANIFEST)
            if m is None:
                j = where.read_json(JOURNAL)
                print(f"data-shards: unfinished build at {args.location} ({len(j['shards'])} shards published; "
                      "re-run its build command to finish it)" if j else
                      f"data-shards: no shards/manifest at {args.location}", file=sys.stderr)
                return 1
            print(json.dumps({"options": m["options"], "input": m["input"]}, indent=1))
            print(_summary(m))
            return 0
        if args.command == "demo":
            from data_shards.demo import demo_options, demo_sources, DEMO_VERSION

            sources = demo_sources()
            options = demo_options(args.resolution, args.clip_length)
            info = {"layout": "demo", "version": DEMO_VERSION}
        else:
            layout = detect_layout(args.input, args.split) if args.layout == "auto" else args.layout
            sources = discover(layout, args.input, args.split, args.ucf_fold)
            options = BuildOptions(resolution=args.resolution, clip_length=args.clip_length,
                                   frame_skip=args.frame_skip, windows=args.windows, clip_stride=args.clip_stride,
                                   encoding=args.encoding, shard_size_mb=args.shard_size_mb,
                                   max_clips_per_shard=args.max_clips_per_shard)
            info = {"layout": layout, "root": str(Path(args.input).resolve()), "split": args.split}
            if layout == "ucf101":
                info["ucf_fold"] = args.ucf_fold
        options.validate()
        if args.dry_run:
            print(json.dumps({"dest": args.dest, "input": info, "options": dataclasses.asdict(options),
                              "num_sources": len(sources), "workers": args.workers}, indent=1))
            return 0
        if not sources:
            print("no input videos found", file=sys.stderr)
            return 1
        m = build_shards(sources, Destination(args.dest, s3), options, workers=args.workers, input_info=info,
                         progress=not args.no_progress)
        print(_summary(m))
        print(f"-> {args.dest}")
        return 0
    except (BuildError, ValueError, FileNotFoundError, PermissionError) as e:  # S3: S3AccessDenied
        print(f"data-shards: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # BuildInterrupted says how many shards are kept
        print(f"data-shards: {str(e) or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
