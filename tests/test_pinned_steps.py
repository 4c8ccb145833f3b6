"""The numbers of N training steps, pinned (tests/golden/pinned_steps.json, made by make_pinned_steps.py).

Refactors that do not mean to change the maths (torchtitan's rule) must leave them as they are: on the
machine that wrote them they match bit for bit; elsewhere CPU kernels may round differently, hence the
tolerance, far below what a changed draw order, seed, loss term or schedule moves (those move the losses
in the first or second digit).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "golden"))

from make_pinned_steps import OUT, run  # noqa: E402


def test_training_steps_match_the_pinned_numbers():
    pinned = json.loads(OUT.read_text())
    got = run()
    assert len(got["steps"]) == len(pinned["steps"])
    for i, (a, b) in enumerate(zip(got["steps"], pinned["steps"])):
        assert a.keys() == b.keys(), (i, a.keys(), b.keys())
        for k in a:
            assert math.isclose(a[k], b[k], rel_tol=1e-5, abs_tol=1e-6), (i, k, a[k], b[k])
    for net, sums in pinned["checksums"].items():
        for k, v in sums.items():
            assert got["checksums"][net][k] == pytest.approx(v, rel=1e-6, abs=1e-6), (net, k)
