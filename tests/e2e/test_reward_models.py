"""The reward-model stage end to end: `flywheel train-rm` trains a Bradley-Terry ensemble
with DeepSpeed (CPU, gloo) on toy pairs sampled from the SFT policy, `flywheel eval-rm`
re-evaluates the written ensemble, and bad preference files exit 2 naming file and line."""

from __future__ import annotations

import json

import pytest

from services.core.config_loading import load_config
from services.core.data import write_jsonl
from tests.conftest import run_flywheel

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def toy_rm_run(toy_sft_run, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("rm-toy")
    proc = run_flywheel(
        "train-rm", "rm-toy", "--out", str(out), f"model.path={toy_sft_run['out'] / 'model'}",
        "reward.variance.prompts=16",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"summary": json.loads((out / "summary.json").read_text()), "out": out, "stdout": proc.stdout}


def test_toy_ensemble_beats_chance_against_the_gold_order(toy_rm_run):
    summary = toy_rm_run["summary"]
    accuracy = summary["eval"]["pairs"]["accuracy"]
    print("label noise", summary["label_noise_rate"], "accuracy", json.dumps(accuracy))
    assert summary["train_pairs"] == 2000 and summary["heldout_pairs"] == 500
    # Bradley-Terry labels at beta 5 on the SFT policy's samples: some, not most, are wrong
    assert 0.05 < summary["label_noise_rate"] < 0.35
    for name in ("rm-0", "rm-1", "rm-2"):
        assert accuracy[name]["gold_accuracy"] > 0.58, name
    assert accuracy["ensemble/wco"]["gold_accuracy"] > 0.62
    assert accuracy["ensemble/mean"]["gold_accuracy"] > 0.62
    assert "ensemble/wco*" in toy_rm_run["stdout"]  # the table marks the configured aggregate


def test_members_are_bootstrap_resamples_saved_as_hf_directories(toy_rm_run):
    from services.core.config import ScorerConfig
    from services.reward.scorers import build_scorer

    members = toy_rm_run["summary"]["members"]
    assert [m["name"] for m in members] == ["rm-0", "rm-1", "rm-2"]
    # each resample of 2000 pairs holds about 1 - 1/e = 63% of them, and they differ
    assert all(1150 < m["distinct_pairs"] < 1370 for m in members)
    scorers = [build_scorer(ScorerConfig(kind="hf", path=m["path"]), i) for i, m in enumerate(members)]
    prompts, texts = ["list 3 colors:"] * 2, [" red blue green", " apple"]
    scores = [s.score(prompts, texts) for s in scorers]
    assert len({tuple(round(v, 6) for v in s) for s in scores}) == 3  # different seeds, different models


def test_eval_json_reports_variance_and_disagreement(toy_rm_run):
    report = json.loads((toy_rm_run["out"] / "eval.json").read_text())
    variance = report["variance"]["by_scorer"]
    assert set(variance) >= {"rm-0", "rm-1", "rm-2", "ensemble/mean", "ensemble/wco", "ensemble/uwo", "gold"}
    for stats in variance.values():
        assert stats["p10"] <= stats["p50"] <= stats["p90"]
        assert 0.0 <= stats["fraction_below_threshold"] <= 1.0
        assert stats["mean"] >= 0.0
    assert report["variance"]["prompts"] == 16 and report["variance"]["samples_per_prompt"] == 8
    disagreement = report["pairs"]["disagreement"]
    assert 0.0 < disagreement["order_disagreement"] < 1.0
    assert -1.0 <= disagreement["mean_pairwise_correlation"] <= 1.0
    assert disagreement["centered_member_std"] > 0.0


def test_eval_rm_on_the_written_ensemble_reproduces_the_accuracies(toy_rm_run, tmp_path):
    ensemble_yaml = toy_rm_run["out"] / "ensemble.yaml"
    cfg = load_config(str(ensemble_yaml))
    assert [s.kind for s in cfg.reward.scorers] == ["hf"] * 3 and cfg.reward.aggregate == "wco"
    proc = run_flywheel("eval-rm", str(ensemble_yaml), "--out", str(tmp_path), "reward.variance.prompts=4")
    assert proc.returncode == 0, proc.stderr[-4000:]
    again = json.loads((tmp_path / "eval.json").read_text())["pairs"]["accuracy"]
    first = toy_rm_run["summary"]["eval"]["pairs"]["accuracy"]
    for name, entry in first.items():
        assert again[name]["label_accuracy"] == pytest.approx(entry["label_accuracy"], abs=1e-9), name
        assert again[name]["gold_accuracy"] == pytest.approx(entry["gold_accuracy"], abs=1e-9), name


def test_train_rm_on_a_user_jsonl_learns_an_easy_preference(tiny_model_dir, tmp_path):
    from services.core.toy_world import TOPICS

    colors, fruits = TOPICS["colors"], TOPICS["fruits"]
    rows = [
        {"prompt": f"list {1 + i % 3} colors:", "chosen": " " + " ".join(colors[(i + j) % 8] for j in range(1 + i % 3)),
         "rejected": " " + " ".join(fruits[(i + j) % len(fruits)] for j in range(1 + i % 3))}
        for i in range(240)
    ]
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    proc = run_flywheel(
        "train-rm", "rm-toy", "--out", str(tmp_path / "rm"), f"data.source={tmp_path / 'pairs.jsonl'}",
        f"model.path={tiny_model_dir}", "ensemble.size=2", "learner.epochs=3", "learner.lr=3e-3",
        "data.eval_fraction=0.25", "reward.variance.prompts=4", "reward.variance.samples=2",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((tmp_path / "rm" / "summary.json").read_text())
    assert summary["train_pairs"] == 180 and summary["heldout_pairs"] == 60
    assert summary["label_noise_rate"] is None  # user labels carry no gold
    accuracy = summary["eval"]["pairs"]["accuracy"]
    assert accuracy["ensemble/wco"]["label_accuracy"] > 0.9
    assert "gold_accuracy" not in accuracy["rm-0"]


@pytest.mark.parametrize("rows, expected", [
    ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n',
     "pairs.jsonl:2: missing key 'rejected'"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "x", "rejected": "x"}\n',
     "pairs.jsonl:2: 'chosen' and 'rejected' are identical"),
])
def test_train_rm_bad_rows_exit_2(rows, expected, tmp_path):
    (tmp_path / "pairs.jsonl").write_text(rows)
    proc = run_flywheel("train-rm", "rm-toy", "--out", str(tmp_path / "rm"), f"data.source={tmp_path / 'pairs.jsonl'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr


def test_demo_runs_grpo_against_the_trained_ensemble(toy_sft_run, toy_rm_run, ray_session, tmp_path):
    """The demo's third stage scores with the members `train-rm` wrote (stages 1 and 2 are
    reused from the session's runs, as the demo reuses an existing OUT/sft and OUT/rm)."""
    import shutil

    import yaml

    from services.demo import run_demo

    shutil.copytree(toy_sft_run["out"], tmp_path / "sft")
    shutil.copytree(toy_rm_run["out"], tmp_path / "rm")  # ensemble.yaml points at the original members
    result = run_demo(str(tmp_path), steps=30)
    used = yaml.safe_load((tmp_path / "grpo" / "config.yaml").read_text())["reward"]
    assert [s["kind"] for s in used["scorers"]] == ["hf"] * 3 and used["aggregate"] == "wco"
    assert [s["path"] for s in used["scorers"]] == [m["path"] for m in toy_rm_run["summary"]["members"]]
    assert result["reward_models"]["label_noise_rate"] == toy_rm_run["summary"]["label_noise_rate"]
    print(f"GRPO against the trained WCO ensemble, gold {result['grpo_gold_first']:.3f} -> {result['grpo_gold_last']:.3f}")


def test_overopt_study_writes_plot_and_table(toy_sft_run, toy_rm_run, tmp_path):
    """`flywheel study overopt` end to end, short: four GRPO runs (single, mean, wco, uwo) of
    4 prompts per step against the session's trained ensemble, then the plot, table and JSON."""
    import shutil

    shutil.copytree(toy_sft_run["out"], tmp_path / "sft")
    shutil.copytree(toy_rm_run["out"], tmp_path / "rm")
    proc = run_flywheel("study", "overopt", "--out", str(tmp_path), "--steps", "20",
                        "rollout.prompts_per_step=4", timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "overopt.json").read_text())
    assert list(result["summaries"]) == ["single", "mean", "wco", "uwo"] and result["steps"] == 20
    assert result["overrides"] == ["rollout.prompts_per_step=4"]
    for proxy, s in result["summaries"].items():
        assert s["gold_peak"] >= s["gold_final"] and 1 <= s["gold_peak_step"] <= 20, proxy
        assert len(json.loads((tmp_path / proxy / "metrics.jsonl").read_text().splitlines()[-1])) > 5
        assert "prompts_per_step: 4" in (tmp_path / proxy / "config.yaml").read_text()
    used = {p: yaml_reward(tmp_path / p) for p in result["summaries"]}
    assert used["single"] == (["rm-0"], "mean") and used["wco"] == (["rm-0", "rm-1", "rm-2"], "wco")
    assert (tmp_path / "overopt.png").stat().st_size > 20_000
    assert (tmp_path / "overopt.md").read_text().count("\n") == 6
    assert "gold reward, GRPO against each proxy" in proc.stdout


def yaml_reward(run_dir):
    import yaml

    reward = yaml.safe_load((run_dir / "config.yaml").read_text())["reward"]
    return [s["name"] for s in reward["scorers"]], reward["aggregate"]
