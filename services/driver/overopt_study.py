"""`flywheel study overopt`: proxy-reward overoptimization on the toy world, by aggregation.

Gao et al. (2023): optimising a learned proxy reward, the gold reward first rises and then
falls as the policy moves away from its start (measured as sqrt(KL(pi || pi_ref))), while the
proxy keeps rising. Coste et al. (2024): reward-model ensembles aggregated worst-case (WCO)
or uncertainty-weighted (UWO) overoptimize less than a single model or the ensemble mean.

The study reuses (or makes) a toy SFT policy and a trained K-member reward ensemble
(``rm-toy``), then runs GRPO with the same seed, steps and a weak KL leash for each proxy:

- ``single``: member rm-0 alone;
- ``mean``, ``wco``, ``uwo``: the whole ensemble, aggregated so.

It writes DIR/overopt.png (gold and proxy reward against sqrt(KL), smoothed), DIR/overopt.json
and DIR/overopt.md (peak and final gold reward per proxy) and prints the table.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from services.core.config_loading import load_config
from services.driver.bootstrap import bootstrap_toy_policy, train_reward_ensemble
from services.driver.report import smoothed
from services.driver.train import run_train

PROXIES = ("single", "mean", "wco", "uwo")
STUDY_STEPS = 120
STUDY_KL_COEF = 0.01  # weak on purpose: the policy must be free to move far enough to overoptimize
SMOOTH = 10


def proxy_overrides(proxy: str, scorers: list[dict]) -> list[str]:
    """Config overrides making ``proxy`` the RL reward."""
    chosen = scorers[:1] if proxy == "single" else scorers
    return [f"reward.scorers={json.dumps(chosen)}", f"reward.aggregate={'mean' if proxy == 'single' else proxy}"]


def _smoothed_curve(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(sqrt KL, value), both trailing-averaged over SMOOTH steps; KL is the sequence-level
    k1 estimate ``rollout/kl_seq`` (clamped at 0: the sample estimate can dip below)."""
    rows = [(r["rollout/kl_seq"], r[key]) for r in records if "rollout/kl_seq" in r and key in r]
    kl = smoothed([max(k, 0.0) for k, _ in rows], SMOOTH)
    return [math.sqrt(k) for k in kl], smoothed([v for _, v in rows], SMOOTH)


def summarize(records: list[dict]) -> dict[str, float]:
    """Peak and final (last SMOOTH steps) gold reward, with where the peak was."""
    gold = smoothed([r["gold/mean"] for r in records], SMOOTH)
    proxy = smoothed([r["reward/mean"] for r in records], SMOOTH)
    sqrt_kl, _ = _smoothed_curve(records, "gold/mean")
    peak = max(range(len(gold)), key=gold.__getitem__)
    return {
        "gold_start": gold[min(SMOOTH, len(gold)) - 1], "gold_peak": gold[peak], "gold_peak_step": peak + 1,
        "gold_peak_sqrt_kl": sqrt_kl[peak], "gold_final": gold[-1], "gold_drop_from_peak": gold[peak] - gold[-1],
        "proxy_start": proxy[min(SMOOTH, len(proxy)) - 1], "proxy_final": proxy[-1], "sqrt_kl_final": sqrt_kl[-1],
    }


def plot(runs: dict[str, list[dict]], out_png: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 4.2), layout="constrained")
    gold_ax, proxy_ax, step_ax = fig.subplots(1, 3)
    for proxy, records in runs.items():
        step_ax.plot([r["step"] for r in records], smoothed([r["gold/mean"] for r in records], SMOOTH), label=proxy)
        x, gold = _smoothed_curve(records, "gold/mean")
        gold_ax.plot(x, gold, label=proxy)
        x, reward = _smoothed_curve(records, "reward/mean")
        proxy_ax.plot(x, [v - reward[0] for v in reward], label=proxy)
    gold_ax.set(title="gold reward (hidden from the policy)", xlabel="sqrt(KL(pi || pi_ref)), nats^0.5",
                ylabel="gold reward")
    proxy_ax.set(title="proxy reward it optimises (change since the start)", xlabel="sqrt(KL(pi || pi_ref)), nats^0.5",
                 ylabel="proxy reward - its start")
    step_ax.set(title="gold reward by step (KL need not grow monotonically)", xlabel="step", ylabel="gold reward")
    for ax in (gold_ax, proxy_ax, step_ax):
        ax.grid(alpha=0.3)
        ax.legend(title="proxy", fontsize="small")
    FigureCanvasAgg(fig)
    fig.savefig(out_png, dpi=110)
    return out_png


def write_table(summaries: dict[str, dict], out_md: Path) -> str:
    header = "| proxy | gold start | gold peak (step, sqrt KL) | gold final | drop from peak | proxy start → final | sqrt KL final |"
    lines = [header, "| --- | --- | --- | --- | --- | --- | --- |"]
    for proxy, s in summaries.items():
        lines.append(
            f"| {proxy} | {s['gold_start']:.3f} | {s['gold_peak']:.3f} ({s['gold_peak_step']}, {s['gold_peak_sqrt_kl']:.2f}) "
            f"| {s['gold_final']:.3f} | {s['gold_drop_from_peak']:.3f} | {s['proxy_start']:.3f} → {s['proxy_final']:.3f} "
            f"| {s['sqrt_kl_final']:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    out_md.write_text(text)
    return text


def run_overopt_study(out_dir: str | Path, steps: int = STUDY_STEPS, kl_coef: float = STUDY_KL_COEF,
                      rl_overrides: list[str] | None = None) -> dict:
    """``rl_overrides``: dotted overrides applied to every GRPO run (after the study's own)."""
    from rich.console import Console
    from rich.table import Table

    console, out, rl_overrides = Console(), Path(out_dir), list(rl_overrides or [])
    load_config("grpo-toy", rl_overrides)  # a bad override fails now, not after SFT and reward models
    out.mkdir(parents=True, exist_ok=True)
    sft_cfg = load_config("sft-toy")
    console.rule("[bold]overoptimization study[/]: SFT policy and reward ensemble (reused when present)")
    policy = bootstrap_toy_policy(sft_cfg, out)
    rm, reward = train_reward_ensemble(policy, out)
    runs: dict[str, list[dict]] = {}
    for proxy in PROXIES:
        console.rule(f"[bold]GRPO against {proxy}[/] ({steps} steps, kl_coef {kl_coef})")
        cfg = load_config("grpo-toy", [
            f"model.path={policy}", f"algorithm.total_steps={steps}", f"algorithm.kl_coef={kl_coef}",
            *proxy_overrides(proxy, reward["scorers"]), *rl_overrides,
        ])
        runs[proxy] = run_train(cfg, out / proxy, overwrite=True)  # a re-run of the study redoes its GRPO runs
    summaries = {proxy: summarize(records) for proxy, records in runs.items()}
    png = plot(runs, out / "overopt.png")
    write_table(summaries, out / "overopt.md")
    result = {
        "steps": steps, "kl_coef": kl_coef, "smooth": SMOOTH, "overrides": rl_overrides,
        "summaries": summaries,
        "reward_models": {k: rm[k] for k in ("label_noise_rate", "train_pairs")} | {
            "heldout_gold_accuracy": {k: v.get("gold_accuracy") for k, v in rm["eval"]["pairs"]["accuracy"].items()}
        },
    }
    (out / "overopt.json").write_text(json.dumps(result, indent=2))
    table = Table(title=f"gold reward, GRPO against each proxy ({steps} steps, smoothed over {SMOOTH})")
    for column in ("proxy", "gold start", "gold peak", "peak step", "gold final", "drop from peak", "sqrt KL final"):
        table.add_column(column, justify="left" if column == "proxy" else "right")
    for proxy, s in summaries.items():
        table.add_row(proxy, f"{s['gold_start']:.3f}", f"{s['gold_peak']:.3f}", str(s["gold_peak_step"]),
                      f"{s['gold_final']:.3f}", f"{s['gold_drop_from_peak']:.3f}", f"{s['sqrt_kl_final']:.2f}")
    console.print(table)
    console.print(f"plot: {png}    table: {out / 'overopt.md'}    numbers: {out / 'overopt.json'}")
    return result


__all__ = ["run_overopt_study", "summarize", "proxy_overrides", "plot", "PROXIES"]
