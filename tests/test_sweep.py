"""`sweeps/tune_freq.py`: real Ray Tune + Optuna + ASHA sweeps of tiny DIGAN trainings on a local Ray cluster.

Each trial is a real Ray Train run with DeepSpeed engines on the demo data, scored with the labelled proxy
metric (`proxy_fvd16`). Runs are seeded (TPE sampler, training, data), so which trials ASHA stops is fixed.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "sweeps" / "tune_freq.py"

# A trial: 1 worker, batch 8, 12 steps; the proxy metric every 4 steps (3 Tune iterations per full trial).
TINY = ["dist.num_workers=1", "dist.max_failures=0", "train.batch_size=8", "train.total_kimg=0.096",
        "metrics.interval_kimg=0.032", "metrics.num_videos=8", "train.log_every_steps=4",
        "train.checkpoint_kimg=0.032", "train.sample_kimg=10", "train.keep_checkpoints=1"]


def _env(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": "/tmp"}
    env.pop("RAY_ADDRESS", None)
    return env


def _cmd(tmp_path, *extra):
    return [sys.executable, str(SCRIPT), "--config", "demo-32", *TINY, f"train.storage_path={tmp_path / 'runs'}", *extra]


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_bad_search_space_fails_with_one_line(tmp_path):
    p = subprocess.run(_cmd(tmp_path, "--param", "model.sigmat=loguniform:0.03:3", "--dry-run"),
                       capture_output=True, text=True, env=_env(tmp_path), timeout=120)
    assert p.returncode == 2
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "unknown config key 'model.sigmat'" in err[0]
    p = subprocess.run(_cmd(tmp_path, "--param", "loss.r1_gamma=loguniform:0:30", "--dry-run"),
                       capture_output=True, text=True, env=_env(tmp_path), timeout=120)
    assert p.returncode == 2 and "log-uniform needs low > 0" in p.stderr
    p = subprocess.run(_cmd(tmp_path, "--grace-kimg", "1", "--dry-run"),
                       capture_output=True, text=True, env=_env(tmp_path), timeout=120)
    assert p.returncode == 2 and "exceeds the trial length" in p.stderr


def test_dry_run_prints_space(tmp_path):
    p = subprocess.run(_cmd(tmp_path, "--dry-run"), capture_output=True, text=True, env=_env(tmp_path), timeout=120)
    assert p.returncode == 0, p.stderr
    assert "model.sigma_t" in p.stdout and "loss.r1_gamma" in p.stdout and "proxy_fvd16" in p.stdout


@pytest.mark.slow
def test_sweep_asha_failed_trial_and_best_yaml_trains(tmp_path):
    # The first point evaluated diverges (gamma overflows float32 -> non-finite D loss): it must be recorded
    # as failed while the sweep goes on with TPE samples.
    points = tmp_path / "points.yaml"
    points.write_text(yaml.safe_dump([{"model.sigma_t": 0.25, "loss.r1_gamma": 1e300}]))
    out = tmp_path / "out"
    p = subprocess.run(_cmd(tmp_path, "--num-samples", "4", "--points", str(points), "--name", "t1",
                            "--study-storage", str(tmp_path / "study.journal"), "--out", str(out),
                            "--seed", "3"),
                       capture_output=True, text=True, env=_env(tmp_path), timeout=1200)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    rows = _rows(out / "trials.csv")
    assert len(rows) == 4
    statuses = [r["status"] for r in rows]
    assert statuses.count("ERROR") == 1, rows
    failed = next(r for r in rows if r["status"] == "ERROR")
    assert float(failed["loss.r1_gamma"]) == 1e300
    assert "training diverged" in failed["error"], failed
    ok = [r for r in rows if r["status"] != "ERROR"]
    # ASHA stopped at least one healthy trial before its last evaluation (3 evaluations for a full trial).
    stopped = [r for r in ok if r["status"] == "STOPPED"]
    assert stopped and all(int(r["iterations"]) < 3 and float(r["kimg"]) < 0.096 for r in stopped), rows
    assert any(r["status"] == "TERMINATED" and int(r["iterations"]) == 3 for r in ok), rows
    assert all(r["proxy_fvd16"] for r in ok)

    # The Optuna study lives in the journal and can be read with Optuna's own tools.
    import optuna

    study = optuna.load_study(study_name="t1", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "study.journal"))))
    states = [t.state.name for t in study.trials]
    assert len(states) == 4 and "FAIL" in states

    # The best YAML is a full config that the main job accepts as is.
    best = yaml.safe_load((out / "best.yaml").read_text())
    best_row = min(ok, key=lambda r: float(r["proxy_fvd16"]))
    assert best["model"]["sigma_t"] == pytest.approx(float(best_row["model.sigma_t"]))
    assert best["loss"]["r1_gamma"] == pytest.approx(float(best_row["loss.r1_gamma"]))
    t = subprocess.run([sys.executable, "-m", "digan.train", "--config", str(out / "best.yaml"),
                        "train.total_kimg=0.016", f"train.storage_path={tmp_path / 'best-runs'}", "metrics.metrics=[]"],
                       capture_output=True, text=True, env=_env(tmp_path), timeout=600, cwd=ROOT)
    assert t.returncode == 0, t.stdout[-3000:] + t.stderr[-3000:]
    assert "checkpoint:" in t.stdout and "None" not in t.stdout.split("checkpoint:")[1].splitlines()[0]


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(tmp_path):
    name, sweep_dir = "t2", tmp_path / "runs" / "sweeps" / "t2"
    cmd = _cmd(tmp_path, "--num-samples", "3", "--name", name, "--seed", "1", "--grace-kimg", "0.096")
    err = open(tmp_path / "first.err", "w")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=_env(tmp_path), start_new_session=True)

    def finished_trials():
        done = []
        for r in sweep_dir.glob("*/result.json"):
            lines = [json.loads(x) for x in r.read_text().splitlines() if x.strip()]
            if lines and lines[-1].get("kimg", 0) >= 0.096 - 1e-9:
                done.append(r.parent.name)
        return done

    try:
        deadline = time.time() + 900
        while not finished_trials() and time.time() < deadline:
            assert proc.poll() is None, "sweep ended before it could be interrupted"
            time.sleep(2)
        first = finished_trials()
        assert first, "no trial finished in time"
    finally:
        # An operator's Ctrl-C (SIGINT to the whole process group): Tune stops the sweep gracefully.
        os.killpg(proc.pid, signal.SIGINT)
        try:
            rc = proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
        err.close()
    # Nothing that looks final: no trials.csv, no best.yaml, no "best:"; the unfinished trial says so.
    assert rc == 130, ((tmp_path / "first.err").read_text()[-3000:], rc)
    assert "sweep interrupted" in (tmp_path / "first.err").read_text()
    assert not (sweep_dir / "trials.csv").exists() and not (sweep_dir / "best.yaml").exists()
    partial = _rows(sweep_dir / "trials.partial.csv")
    assert any(r["status"] == "UNFINISHED" for r in partial) or len(partial) < 3, partial
    done_before = {d: (sweep_dir / d / "result.json").read_text() for d in first}

    out = tmp_path / "out"
    p = subprocess.run(cmd + ["--resume", "--out", str(out)], capture_output=True, text=True, env=_env(tmp_path),
                       timeout=1200)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    rows = _rows(out / "trials.csv")
    assert len(rows) == 3 and all(r["status"] not in ("ERROR", "UNFINISHED") for r in rows), rows
    assert (out / "best.yaml").is_file()
    # Finished trials were not run again: their results are byte-for-byte what they were before the kill.
    for d, text in done_before.items():
        assert (sweep_dir / d / "result.json").read_text() == text
