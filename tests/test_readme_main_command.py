"""The README's main command, run exactly as written on a fresh clone in a fresh venv: what a new user does.

The command is read from README.md (the first bash block under "Set up on a fresh machine"), so the README
and CI cannot drift apart. The clone is of the committed HEAD (uncommitted edits are not in it), and the
run gets a fresh HOME (no demo shards or Ray state from earlier runs) and an environment without this
suite's venv or settings. Only pip's download cache is shared, to save time; it changes no version.

`DIGAN_README_REPO` names another repository to clone (e.g. one with a dependency removed from
pyproject.toml, to see the check fail).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Set up on a fresh machine"
RUN_TIMEOUT_S = 1800  # pip install of the runtime dependencies (cached wheels) + the ~3 min demo on 2 cores


def readme_commands(text: str) -> list[str]:
    """The bash blocks of the set-up section, in order: [main command, test command]."""
    start = text.index(SECTION) + len(SECTION)
    end = text.find("\n## ", start)
    section = text[start:end if end >= 0 else None]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_readme_has_the_two_setup_commands():
    commands = readme_commands((REPO / "README.md").read_text())
    assert len(commands) == 2, commands
    main, tests = commands
    assert "\n" not in main and "python -m digan.train" in main and "pip install -e ." in main, main
    assert tests == "bash scripts/test.sh tests"
    assert "bash scripts/test.sh tests" in (REPO / ".ci" / "run").read_text().replace("exec ", "")


def fresh_env(home: Path) -> dict[str, str]:
    """The machine's environment as a new user's shell has it: no venv on PATH, no suite settings."""
    venv = os.environ.get("VIRTUAL_ENV") or sys.prefix
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep)
            if p and not Path(p).resolve().is_relative_to(Path(venv).resolve())]
    drop = {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "DS_ACCELERATOR", "RAY_AUTH_MODE", "RAY_ADDRESS",
            "RAY_USAGE_STATS_ENABLED", "PYTEST_CURRENT_TEST", "PYTHONUNBUFFERED"}
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("PYTEST", "AWS_"))}
    cache = subprocess.run([sys.executable, "-m", "pip", "cache", "dir"], capture_output=True, text=True)
    if cache.returncode == 0 and cache.stdout.strip():
        env["PIP_CACHE_DIR"] = cache.stdout.strip()
    home.mkdir(parents=True)
    env.update(PATH=os.pathsep.join(path), HOME=str(home))
    return env


def _field(out: str, name: str) -> Path:
    m = re.search(rf"^\s+{name}:\s+(\S+)", out, flags=re.M)
    assert m, f"the end message has no '{name}:' line:\n{out[-3000:]}"
    return Path(m.group(1))


@pytest.mark.slow
def test_readme_main_command_on_a_fresh_clone(tmp_path):
    main = readme_commands((REPO / "README.md").read_text())[0]
    source = os.environ.get("DIGAN_README_REPO", str(REPO))
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", source, str(clone)], check=True, timeout=300)
    try:
        proc = subprocess.run(["bash", "-c", main], cwd=clone, env=fresh_env(tmp_path / "home"),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        tail = (e.stdout or b"")[-3000:]
        pytest.fail(f"the README's main command did not finish within {RUN_TIMEOUT_S} s; last output:\n{tail}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"the README's main command exited {proc.returncode}:\n{out[-5000:]}"
    assert re.search(r"^finished after \d+ s at step \d+", proc.stdout, flags=re.M), proc.stdout[-3000:]
    # The end message says what was trained and where to go next.
    assert re.search(r"^\s+trained:\s+demo-32: 32x32", proc.stdout, flags=re.M), proc.stdout[-3000:]
    assert "python benchmarks/quality.py" in proc.stdout

    # What the end message points at exists and is what it says.
    run_dir, checkpoint, sample = _field(proc.stdout, "run folder"), _field(proc.stdout, "checkpoint"), \
        _field(proc.stdout, "sample video")
    assert run_dir.is_relative_to(clone), f"{run_dir}: outside the clone the command ran in"
    assert checkpoint.is_dir() and checkpoint.is_relative_to(run_dir), checkpoint
    weights = sorted(checkpoint.rglob("*.pt"))
    assert weights, f"no .pt file in {checkpoint}"
    for w in weights:
        torch.load(w, map_location="cpu", weights_only=True)
    assert sample.suffix == ".mp4" and sample.is_file(), sample
    import av

    with av.open(str(sample)) as f:
        frames = sum(1 for _ in f.decode(video=0))
    assert frames >= 16, f"{sample}: {frames} frames"
