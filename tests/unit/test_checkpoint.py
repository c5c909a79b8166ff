"""Checkpoint bookkeeping without Ray or DeepSpeed: resume resolution, the model
fingerprint, metrics trimming, sampling seeds, the PPO-ptx cursor's state."""

from __future__ import annotations

import json
import random

import pytest

from services.core.errors import UserError
from services.driver.checkpoint import (
    CheckpointStore, DamagedCheckpoint, model_fingerprint, read_state, resolve_resume, trim_metrics, verify_checkpoint,
)
from services.driver.driver import sampling_seed


def commit(root, step):
    store = CheckpointStore(root, keep_last=5)
    return store.commit(store.begin(step), step, {"draws": step})


def test_resolve_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert resolve_resume(None, False, out) is None
    assert resolve_resume(None, True, out) is None and "starting from step 0" in capsys.readouterr().out
    commit(out / "checkpoints", 2)
    latest = commit(out / "checkpoints", 4)
    assert resolve_resume(None, True, out) == latest
    assert resolve_resume(str(out / "checkpoints" / "step-000002"), False, out).name == "step-000002"
    assert resolve_resume(str(out / "checkpoints"), False, out) == latest
    with pytest.raises(UserError, match="no complete checkpoint at"):
        resolve_resume(str(tmp_path / "nowhere"), False, out)


def test_commit_records_a_manifest_that_finds_a_truncated_or_missing_file(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=5)
    tmp = store.begin(3)
    (tmp / "learner" / "policy" / "global_step3").mkdir(parents=True)
    weights = tmp / "learner" / "policy" / "global_step3" / "mp_rank_00_model_states.pt"
    weights.write_bytes(b"w" * 1000)
    (tmp / "config.yaml").write_text("seed: 0\n")
    (tmp / "empty.txt").write_text("")
    path = store.commit(tmp, 3, {"draws": 3})
    state = verify_checkpoint(path)
    assert state["files"] == {
        "config.yaml": 8, "empty.txt": 0, "learner/policy/global_step3/mp_rank_00_model_states.pt": 1000,
    }
    assert read_state(path) == state  # the manifest is part of driver_state.json (not listing itself)

    final = path / "learner" / "policy" / "global_step3" / "mp_rank_00_model_states.pt"
    final.write_bytes(b"w" * 640)  # a disk that filled, a copy cut short
    with pytest.raises(DamagedCheckpoint) as info:
        verify_checkpoint(path)
    assert str(info.value) == f"checkpoint: {final} is damaged (truncated: 640 of 1000 bytes)"
    final.write_bytes(b"w" * 1001)
    with pytest.raises(DamagedCheckpoint, match=r"is damaged \(longer than recorded: 1001 of 1000 bytes\)"):
        verify_checkpoint(path)
    final.write_bytes(b"w" * 1000)
    (path / "config.yaml").unlink()
    with pytest.raises(DamagedCheckpoint) as info:
        verify_checkpoint(path)
    assert info.value.problem == f"{path / 'config.yaml'} is missing (the checkpoint recorded 8 bytes)"


def test_a_checkpoint_from_before_the_manifest_loads_unchecked(tmp_path):
    path = commit(tmp_path, 2)
    state = json.loads((path / "driver_state.json").read_text())
    del state["files"]
    (path / "driver_state.json").write_text(json.dumps(state))
    (path / "whatever.pt").write_bytes(b"")  # nothing to compare it with
    assert verify_checkpoint(path)["step"] == 2
    assert resolve_resume(str(path), False, tmp_path) == path


def test_commit_never_drops_the_checkpoint_it_wrote(tmp_path):
    """A run resumed from step 2 past a damaged step 4 writes step 3: with keep_last 1 the old
    pruning kept only step 4 (the damaged one) and dropped the checkpoint just written."""
    store = CheckpointStore(tmp_path, keep_last=1)
    for step in (2, 4):
        store.commit(store.begin(step), step, {"draws": step})
    assert [p.name for p in store.complete()] == ["step-000004"]
    store.commit(store.begin(3), 3, {"draws": 3})
    assert [p.name for p in store.complete()] == ["step-000003", "step-000004"]
    store.commit(store.begin(4), 4, {"draws": 4})  # the run writes step 4 again: the older ones go
    assert [p.name for p in store.complete()] == ["step-000004"]


def test_read_state_rejects_other_directories_and_versions(tmp_path):
    with pytest.raises(UserError, match="not a complete Flywheel checkpoint"):
        read_state(tmp_path)
    path = commit(tmp_path, 1)
    assert read_state(path)["step"] == 1 and read_state(path)["draws"] == 1
    (path / "driver_state.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(UserError, match="format version 99"):
        read_state(path)


def test_model_fingerprint_ignores_paths_and_dtype_but_not_shapes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    config = {"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 512}
    (a / "config.json").write_text(json.dumps({**config, "_name_or_path": "/x", "dtype": "float32"}))
    (b / "config.json").write_text(json.dumps({**config, "_name_or_path": "/y", "dtype": "bfloat16"}))
    assert model_fingerprint(a) == model_fingerprint(b)
    (b / "config.json").write_text(json.dumps({**config, "hidden_size": 128}))
    assert model_fingerprint(a) != model_fingerprint(b)


def test_trim_metrics_keeps_steps_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "x": s * 2}) + "\n" for s in range(1, 6)))
    trim_metrics(path, 3)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    trim_metrics(tmp_path / "missing.jsonl", 3)  # nothing to trim: no error


def test_trim_metrics_drops_a_last_line_cut_short_by_a_crash(tmp_path):
    path = tmp_path / "metrics.jsonl"
    whole = "".join(json.dumps({"step": s, "x": s * 2}) + "\n" for s in range(1, 5))
    path.write_text(whole + json.dumps({"step": 5, "x": 10})[:9])  # died mid-write of step 5
    assert trim_metrics(path, 5) == 4
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
    assert path.read_text().endswith("\n") and not (tmp_path / "metrics.jsonl.tmp").exists()


def test_sampling_seed_is_stable_distinct_and_in_range():
    seeds = {sampling_seed(0, draw, f"p{i}") for draw in range(1, 20) for i in range(50)}
    assert len(seeds) == 19 * 50
    assert all(0 <= s < 2**30 for s in seeds)
    assert sampling_seed(0, 3, "p1") == sampling_seed(0, 3, "p1") != sampling_seed(1, 3, "p1")


def test_ptx_cursor_state_round_trips():
    from services.driver.ptx_data import PtxBatches

    class Fake(PtxBatches):  # the cursor only: no tokenizer or rows
        def __init__(self):
            self.examples, self.batch_size = list(range(7)), 3
            self._rng, self._order = random.Random("ptx-0"), []

    a = Fake()
    a.next_indices(), a.next_indices()
    state = json.loads(json.dumps(a.state_dict()))  # JSON-able, as driver_state.json stores it
    expected = [a.next_indices() for _ in range(4)]
    b = Fake()
    b.load_state_dict(state)
    assert [b.next_indices() for _ in range(4)] == expected


def test_pending_batches_round_trip_in_step_order_and_read_the_one_batch_format(tmp_path):
    from services.core.batch_types import Trajectory
    from services.driver.checkpoint import read_pending, write_pending
    from services.rpc.trajectory_io import write_trajectories

    def batch(tag: str) -> list[Trajectory]:
        return [Trajectory(prompt_id=f"{tag}{i}", prompt="p", prompt_ids=[1], response=tag, response_ids=[2 + i],
                           logprobs=[-0.5], finish_reason="stop", policy_version=3, sample_index=i) for i in range(2)]

    pending = [(batch(tag), 1.5, {"rollout/workers": float(n)}) for n, tag in enumerate("abc")]
    figures = write_pending(tmp_path / "new.pb", 7, pending)
    assert figures == [{"rollout/workers": 0.0}, {"rollout/workers": 1.0}, {"rollout/workers": 2.0}]
    back = read_pending(tmp_path / "new.pb", figures)
    assert [[t.prompt_id for t in b] for b, _, _ in back] == [["a0", "a1"], ["b0", "b1"], ["c0", "c1"]]
    assert [(seconds, stats) for _, seconds, stats in back] == [(0.0, f) for f in figures]  # no rollout time here
    write_trajectories(tmp_path / "old.pb", batch("x"), [None, None])  # max_staleness 1 before the buffer
    (old,) = read_pending(tmp_path / "old.pb", {"rollout/workers": 1.0})
    assert [t.prompt_id for t in old[0]] == ["x0", "x1"] and old[2] == {"rollout/workers": 1.0}
    assert read_pending(tmp_path / "missing.pb", []) == []
    with pytest.raises(UserError, match="holds 3 batches but the state names 2"):
        read_pending(tmp_path / "new.pb", figures[:2])
