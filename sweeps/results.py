"""The sweep's results: one row per trial (parameters, last metric, how far it got, how it ended), printed."""

from __future__ import annotations

from typing import Any



def trial_statuses(result_grid) -> list[str]:
    """Tune's own status of each trial, in the grid's order (TERMINATED, ERROR, RUNNING, PENDING, PAUSED)."""
    analysis = getattr(result_grid, "_experiment_analysis", None)  # ResultGrid exposes only the counts
    if analysis is None:
        return ["TERMINATED" if not r.error else "ERROR" for r in result_grid]
    return [t.status for t in analysis.trials]


def trials_table(result_grid, metric: str, keys: list[str], max_kimg: float) -> list[dict[str, Any]]:
    """One row per trial: its parameters, its last reported metric, how far it got and how it ended."""
    rows = []
    for r, tune_status in zip(result_grid, trial_statuses(result_grid)):
        cfg, last = r.config or {}, r.metrics or {}
        kimg = last.get("kimg")
        if r.error:
            status = "ERROR"
        elif tune_status not in ("TERMINATED", "ERROR"):
            status = "UNFINISHED"  # interrupted (or never started): `--resume` runs it
        elif kimg is not None and kimg < max_kimg - 1e-9:
            status = "STOPPED"  # by ASHA, before the end of its training
        else:
            status = "TERMINATED"
        rows.append({
            "trial": last.get("trial_id") or (r.path or "").rstrip("/").split("/")[-1],
            **{k: cfg.get(k) for k in keys},
            metric: last.get(metric),
            "kimg": kimg,
            "iterations": last.get("training_iteration"),
            "status": status,
            "error": str(r.error).strip().splitlines()[-1][:160] if r.error else "",
        })
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("no trials")
        return
    cols = list(rows[0].keys())

    def fmt(v):
        return f"{v:.5g}" if isinstance(v, float) else ("" if v is None else str(v))

    widths = {c: max(len(c), *(len(fmt(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(fmt(r[c]).ljust(widths[c]) for c in cols))
