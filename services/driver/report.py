"""A static report of one run: DIR/metrics.jsonl → DIR/report/{*.png, index.html}.

One PNG per panel against ``step``; a panel whose keys have no finite value is left out.
``compare_runs`` plots one key across several runs (e.g. gold reward against sqrt(KL)).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


# (file stem, title, line keys, (mean key, std key) for a ±std band or None)
PANELS: list[tuple[str, str, list[str], tuple[str, str] | None]] = [
    ("reward", "Reward (proxy, ±std)", ["reward/mean"], ("reward/mean", "reward/std")),
    ("gold", "Gold reward (the toy world's true reward, whatever reward the run trains on)", ["gold/mean"], None),
    ("eval", "Held-out evaluation", ["eval/reward_mean", "eval/gold_mean", "eval/pass@*"], None),
    ("kl", "KL to reference", ["train/kl"], None),
    ("response_length", "Response length (tokens)", ["rollout/response_length_mean"], None),
    ("timing", "Time per step (s, log scale: step 1's start-up apart from the steady state)",
     ["timing/step_s", "timing/rollout_s", "timing/train_s", "timing/sync_s", "timing/score_s", "timing/learn_s"], None),
    ("step_shares", "Share of the step (scoring and reference overlap)", ["perf/share/*"], None),
    ("throughput", "Tokens per second", ["perf/generated_tokens_per_s", "perf/train_tokens_per_s"], None),
    ("staleness", "Off-policy staleness", ["rollout/staleness_max", "rollout/dropped_stale"], None),
    ("episodes", "Multi-turn episodes: length (tokens, 50th and 90th percentile)",
     ["rollout/episode_tokens_p50", "rollout/episode_tokens_p90"], None),
    ("tools", "Multi-turn episodes: policy turns and tool calls per episode, tool errors per step",
     ["rollout/turns_mean", "rollout/tool_calls_mean", "rollout/tool_errors"], None),
    ("loss", "Training loss", ["train/loss"], None),
    ("lr", "Learning rate", ["train/lr"], None),
]
NOT_IN_TABLE = {"step", "time"}
LOG_SCALE = {"timing"}  # panels on a log y axis


def _read(run_dir: str | Path) -> list[dict]:
    """DIR/metrics.jsonl; a line cut short by a crash is skipped, not fatal."""
    records = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def _num(value: Any) -> float | None:
    """A finite float, or None for missing, non-numeric, NaN and ±inf."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _series(records: list[dict], key: str, x_key: str = "step",
            x_transform: Callable[[float], float] | None = None) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, rec in enumerate(records):
        x = _num(rec.get(x_key, i if x_key == "step" else None))
        y = _num(rec.get(key))
        if x is not None and x_transform is not None:
            try:
                x = _num(x_transform(x))
            except (ValueError, ArithmeticError):  # sqrt of a negative KL estimate, ...
                x = None
        if x is not None and y is not None:
            xs.append(x)
            ys.append(y)
    return xs, ys


def smoothed(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what is there so far)."""
    window = max(1, int(window))
    return [sum(values[max(0, i - window + 1): i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)  # Agg explicitly: no display, no pyplot global state
    fig.savefig(path, dpi=100)


def _plot_panel(records: list[dict], title: str, keys: list[str], band: tuple[str, str] | None,
                path: Path, log_y: bool = False) -> bool:
    """Draw one panel; False (and no file) when none of its keys has data."""
    fig = Figure(figsize=(6.4, 3.6), layout="constrained")
    ax = fig.add_subplot()
    drawn = False
    for key in keys:
        xs, ys = _series(records, key)
        if not xs:
            continue
        ax.plot(xs, ys, marker="." if len(xs) < 50 else None, label=key)
        drawn = True
    if band is not None:
        mean_key, std_key = band
        pts = [(_num(r.get("step", i)), _num(r.get(mean_key)), _num(r.get(std_key))) for i, r in enumerate(records)]
        pts = [p for p in pts if None not in p]
        if pts:
            xs, means, stds = zip(*pts)
            ax.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                            alpha=0.25, label=f"±{std_key}")
    if not drawn:
        return False
    ax.set_title(title)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    _save(fig, path)
    return True


def _summary_rows(records: list[dict]) -> list[tuple[str, float, float, float, float]]:
    keys = sorted({k for r in records for k, v in r.items() if k not in NOT_IN_TABLE and _num(v) is not None})
    rows = []
    for key in keys:
        vals = [v for v in (_num(r.get(key)) for r in records) if v is not None]
        rows.append((key, vals[0], vals[-1], min(vals), max(vals)))
    return rows


def _config_line(run_dir: Path) -> str:
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        return ""
    detail = ""
    try:
        import yaml

        cfg = yaml.safe_load(cfg_path.read_text()) or {}
        algo = (cfg.get("algorithm") or {}).get("name")
        model = (cfg.get("model") or {}).get("path") or "toy model"
        detail = f"algorithm <b>{html.escape(str(algo))}</b>, model <b>{html.escape(str(model))}</b>, seed {html.escape(str(cfg.get('seed')))}; "
    except Exception:  # a report must not fail on an odd config file
        pass
    return f'<p>Produced by Flywheel: {detail}full resolved config: <a href="../config.yaml">config.yaml</a></p>\n'


def write_report(run_dir: str | Path) -> Path:
    """Write DIR/report/ (PNGs + index.html) from DIR/metrics.jsonl; return the index.html path."""
    run_dir = Path(run_dir)
    records = _read(run_dir)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    images = []
    logged = sorted({k for r in records for k in r})
    for stem, title, keys, band in PANELS:
        # "prefix*": every logged key with that prefix and no further "/" (eval/pass@1, eval/pass@4)
        keys = [m for k in keys for m in ([k] if not k.endswith("*") else
                [x for x in logged if x.startswith(k[:-1]) and "/" not in x[len(k) - 1:]])]
        png = out / f"{stem}.png"
        png.unlink(missing_ok=True)  # no stale panel from an earlier report of this run
        if _plot_panel(records, title, keys, band, png, log_y=stem in LOG_SCALE):
            images.append((png.name, title))

    fmt = lambda v: f"{v:.6g}"  # noqa: E731
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td>" + "".join(f"<td>{fmt(v)}</td>" for v in vals) + "</tr>\n"
        for k, *vals in _summary_rows(records)
    )
    steps = [s for s in (_num(r.get("step")) for r in records) if s is not None]
    name = html.escape(run_dir.resolve().name)
    page = (
        f"<!doctype html>\n<html><head><meta charset='utf-8'><title>Flywheel run: {name}</title>\n"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}td:first-child{text-align:left}"
        "img{display:block;margin:1em 0}</style></head><body>\n"
        f"<h1>Flywheel run: {name}</h1>\n"
        + _config_line(run_dir)
        + f"<p>{len(records)} records" + (f", steps {fmt(steps[0])} to {fmt(steps[-1])}" if steps else "") + "</p>\n"
        + "<table><tr><th>key</th><th>first</th><th>last</th><th>min</th><th>max</th></tr>\n" + rows + "</table>\n"
        + "".join(f'<h2>{html.escape(t)}</h2><img src="{f}" alt="{html.escape(t)}">\n' for f, t in images)
        + "</body></html>\n"
    )
    index = out / "index.html"
    index.write_text(page)
    return index


def compare_runs(run_dirs: dict[str, str | Path], key: str, x_key: str, out_png: str | Path,
                 x_transform: Callable[[float], float] | None = None, x_label: str | None = None,
                 smooth: int = 1, title: str | None = None) -> Path:
    """Plot ``key`` against ``x_key`` (optionally ``x_transform``-ed, e.g. math.sqrt) for each run.

    Runs without data for the pair are skipped; ValueError if none has any.
    """
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    plotted = 0
    for label, run_dir in run_dirs.items():
        xs, ys = _series(_read(run_dir), key, x_key, x_transform)
        if xs:
            ax.plot(xs, smoothed(ys, smooth), marker="." if len(xs) < 50 else None, label=label)
            plotted += 1
    if not plotted:
        raise ValueError(f"no run has finite values of {key!r} against {x_key!r}")
    ax.set_xlabel(x_label or (f"{getattr(x_transform, '__name__', 'f')}({x_key})" if x_transform else x_key))
    ax.set_ylabel(key)
    ax.set_title(title or key)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    _save(fig, out_png)
    return out_png
