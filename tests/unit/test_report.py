"""write_report / compare_runs on hand-written metrics.jsonl files (matplotlib Agg, no display)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from services.driver.report import compare_runs, smoothed, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir: Path, steps: int = 20, gold: bool = True, config: bool = False) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(1, steps + 1):
        rec = {
            "time": 1000.0 + step,
            "step": step,
            "policy_version": step,
            "reward/mean": 0.1 * step,
            "reward/std": 0.5,
            "train/kl": 0.01 * step,
            "rollout/kl_seq": 0.2 * step,
            "rollout/response_length_mean": 10 + step,
            "timing/step_s": 1.5,
            "timing/rollout_s": 1.0,
            "timing/train_s": 0.4,
        }
        if gold:
            rec["gold/mean"] = 0.05 * step
        if step % 2:
            rec["timing/sync_s"] = 0.1  # missing on even steps
        if step == 7:
            rec["train/kl"] = float("nan")
        lines.append(json.dumps(rec))  # NaN is written as the bare token NaN, as MetricsWriter does
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if config:
        (run_dir / "config.yaml").write_text("seed: 3\nalgorithm:\n  name: grpo\nmodel:\n  path: null\n")
    return run_dir


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_SIGNATURE, path


def test_report_panels_table_and_html(tmp_path):
    run = write_run(tmp_path / "run-a", config=True)
    index = write_report(run)
    report = run / "report"
    assert index == report / "index.html"
    pngs = sorted(p.name for p in report.glob("*.png"))
    assert pngs == ["gold.png", "kl.png", "response_length.png", "reward.png", "timing.png"]
    for name in pngs:
        assert_png(report / name)
    page = index.read_text()
    assert "<title>Flywheel run: run-a</title>" in page
    assert sorted(re.findall(r'<img src="([^"]+)"', page)) == pngs  # relative paths
    assert 'href="../config.yaml"' in page and "grpo" in page
    # table: first, last, min, max over finite values; the NaN at step 7 is skipped
    row = re.search(r"<tr><td>train/kl</td>(.*?)</tr>", page).group(1)
    assert re.findall(r"<td>([^<]*)</td>", row) == ["0.01", "0.2", "0.01", "0.2"]
    assert "nan" not in page.lower()
    assert "<td>time</td>" not in page and "<td>step</td>" not in page


def test_no_gold_panel_without_gold_and_no_config_line(tmp_path):
    run = write_run(tmp_path / "run-b", gold=False)
    page = write_report(run).read_text()
    assert not (run / "report" / "gold.png").exists()
    assert "gold.png" not in page and "gold/mean" not in page
    assert "config.yaml" not in page
    assert (run / "report" / "reward.png").exists()


def test_sparse_and_broken_records_are_skipped(tmp_path):
    run = tmp_path / "run-c"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        '{"step": 1, "train/loss": 2.0}\n'
        '{"step": 2, "train/loss": NaN, "reward/mean": Infinity}\n'
        '{"step": 3, "train/loss": 1.5, "note": "text"}\n'
        '{"step": 4, "train/lo'  # cut short by a crash
    )
    page = write_report(run).read_text()
    assert sorted(p.name for p in (run / "report").glob("*.png")) == ["loss.png"]
    assert "reward.png" not in page and "reward/mean" not in page and "<td>note</td>" not in page


def test_empty_run_gives_a_page_without_panels(tmp_path):
    run = tmp_path / "empty"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    page = write_report(run).read_text()
    assert "<img" not in page and "0 records" in page


def test_compare_runs_against_sqrt_kl(tmp_path):
    a, b = write_run(tmp_path / "a"), write_run(tmp_path / "b", gold=False)
    out = compare_runs({"a": a, "b": b}, "gold/mean", "rollout/kl_seq", tmp_path / "cmp" / "gold.png",
                       x_transform=math.sqrt, smooth=3)
    assert_png(out)
    with pytest.raises(ValueError, match="gold/mean"):
        compare_runs({"b": b}, "gold/mean", "rollout/kl_seq", tmp_path / "none.png")


def test_smoothed():
    assert smoothed([1, 2, 3, 4], 2) == [1, 1.5, 2.5, 3.5]
    assert smoothed([1, 2, 3], 1) == [1, 2, 3]
    assert smoothed([], 5) == []
