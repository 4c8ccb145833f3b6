"""digan.metrics: offline FVD / KVD / FID / IS with real networks shipped in packages, and a labelled proxy.

    from digan.metrics import compute_metrics
    compute_metrics(G_ema, real_clips, ["fvd16", "kvd16"], num_videos=2048, protocol="tfhub",
                    detector="i3d", device="cuda", seed=0)   # -> {"fvd16": ..., "kvd16": ...}

Detector "proxy" (a fixed-seed random 3D CNN, for CPU runs and CI) returns keys "proxy_fvd16", ...
"""

from .compute import compute_metrics, iterate_fake_videos, parse_metric
from .detectors import (DETECTORS, PROTOCOLS, FrameDetector, VideoDetector, build_frame_detector,
                        build_video_detector, preprocess_clips)
from .distances import (FeatureStats, frechet_distance, frechet_distance_from_features, inception_score,
                        kernel_distance, mmd2_unbiased, precision_recall)
from .i3d import I3DWeightsError, InceptionI3d, load_i3d

__all__ = [
    "compute_metrics", "iterate_fake_videos", "parse_metric",
    "DETECTORS", "PROTOCOLS", "FrameDetector", "VideoDetector", "build_frame_detector", "build_video_detector",
    "preprocess_clips", "FeatureStats", "frechet_distance", "frechet_distance_from_features", "inception_score",
    "kernel_distance", "mmd2_unbiased", "precision_recall", "I3DWeightsError", "InceptionI3d", "load_i3d",
]
