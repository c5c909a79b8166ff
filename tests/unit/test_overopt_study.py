"""The overoptimization study's summary, table and plot from synthetic run records."""

import json
import math

import pytest

from services.core.config_loading import load_config
from services.driver.overopt_study import SMOOTH, plot, proxy_overrides, summarize, write_table


def records(n=60, peak_at=30):
    """Gold rises to step `peak_at` then falls; proxy keeps rising; KL grows quadratically."""
    out = []
    for step in range(1, n + 1):
        gold = 0.4 + 0.01 * min(step, peak_at) - 0.02 * max(0, step - peak_at)
        out.append({"step": step, "gold/mean": gold, "reward/mean": 0.01 * step, "rollout/kl_seq": (step / 10) ** 2})
    return out


def test_summary_finds_the_peak_and_the_drop():
    s = summarize(records())
    # trailing mean over 10 steps peaks where the window still averages mostly rising values
    assert 30 <= s["gold_peak_step"] <= 33
    assert s["gold_final"] < s["gold_peak"] and s["gold_drop_from_peak"] == pytest.approx(s["gold_peak"] - s["gold_final"])
    assert s["proxy_final"] > s["proxy_start"]
    # final sqrt KL: sqrt of the mean of the last SMOOTH KL values
    last = [(step / 10) ** 2 for step in range(61 - SMOOTH, 61)]
    assert s["sqrt_kl_final"] == pytest.approx(math.sqrt(sum(last) / SMOOTH))


def test_proxy_overrides_build_valid_configs(tmp_path):
    scorers = [{"kind": "toy_noisy_gold", "name": f"rm-{k}", "seed": k} for k in range(3)]
    single = load_config("grpo-toy", proxy_overrides("single", scorers))
    assert [s.name for s in single.reward.scorers] == ["rm-0"] and single.reward.aggregate == "mean"
    uwo = load_config("grpo-toy", proxy_overrides("uwo", scorers))
    assert [s.name for s in uwo.reward.scorers] == ["rm-0", "rm-1", "rm-2"] and uwo.reward.aggregate == "uwo"


def test_plot_and_table_files(tmp_path):
    runs = {"single": records(peak_at=20), "wco": records(peak_at=40)}
    png = plot(runs, tmp_path / "overopt.png")
    assert png.stat().st_size > 10_000
    text = write_table({k: summarize(v) for k, v in runs.items()}, tmp_path / "overopt.md")
    assert text.count("\n") == 4 and "| single |" in text and "| wco |" in text
    json.dumps({k: summarize(v) for k, v in runs.items()})  # JSON-able
