"""PromptSource: exactly once per epoch, seeded permutations, resumable cursor; toy prompts."""

from __future__ import annotations

import json

import pytest

from services.core.config import FlywheelConfig
from services.core.errors import UserError
from services.driver.prompt_source import PromptSource, toy_prompt_source
from services.rollout.worker import PromptItem

IDS = [f"p{i}" for i in range(10)]


def items(ids=IDS):
    return [PromptItem(id=i, prompt=f"prompt {i}", columns={"k": i}) for i in ids]


def draw(source, sizes):
    return [item.id for n in sizes for item in source.next_batch(n)]


def test_every_prompt_exactly_once_per_epoch_with_uneven_batches():
    source = PromptSource(items(), seed=3)
    sizes = [3, 7, 4, 3, 7, 4, 3, 7, 2]  # 40 prompts = 4 epochs; batches cross boundaries
    drawn = draw(source, sizes)
    assert len(drawn) == 40
    epochs = [drawn[i : i + 10] for i in range(0, 40, 10)]
    for e, chunk in enumerate(epochs):
        assert sorted(chunk) == sorted(IDS)
        assert chunk == source.epoch_order(e)
    assert len({tuple(c) for c in epochs}) == 4  # a new permutation every epoch
    assert (source.epoch, source.position) == (4, 0)


def test_batch_crossing_boundary_takes_rest_of_old_epoch_then_new_order():
    source = PromptSource(items(), seed=1)
    first = draw(source, [8])
    assert (source.epoch, source.position) == (0, 8)
    crossing = draw(source, [5])
    assert crossing == source.epoch_order(0)[8:] + source.epoch_order(1)[:3]
    assert (source.epoch, source.position) == (1, 3)
    assert first == source.epoch_order(0)[:8]


def test_batch_larger_than_dataset_spans_epochs():
    source = PromptSource(items(), seed=0)
    drawn = draw(source, [25])
    assert drawn == source.epoch_order(0) + source.epoch_order(1) + source.epoch_order(2)[:5]
    assert (source.epoch, source.position) == (2, 5)
    assert source.next_batch(0) == []


def test_deterministic_by_seed_and_shuffle_off_keeps_order():
    assert draw(PromptSource(items(), seed=7), [6, 9, 11]) == draw(PromptSource(items(), seed=7), [26])
    assert draw(PromptSource(items(), seed=7), [10]) != draw(PromptSource(items(), seed=8), [10])
    assert draw(PromptSource(items(), seed=7, shuffle=False), [4, 9, 7]) == IDS + IDS
    assert draw(PromptSource(items(), seed=7), [10]) != IDS


def test_items_keep_prompt_and_columns():
    source = PromptSource([{"id": "a", "prompt": "x", "columns": {"task": "t"}}, {"id": "b", "prompt": "y"}])
    got = {item.id: item for item in source.next_batch(2)}
    assert isinstance(got["a"], PromptItem)
    assert (got["a"].prompt, got["a"].columns) == ("x", {"task": "t"})
    assert got["b"].columns is None


def test_state_dict_round_trip_continues_identically():
    original = PromptSource(items(), seed=5)
    draw(original, [4, 9])  # epoch 1, position 3
    state = json.loads(json.dumps(original.state_dict()))
    assert (state["epoch"], state["position"]) == (1, 3)
    resumed = PromptSource(items(), seed=999)  # the saved seed wins
    resumed.load_state_dict(state)
    assert (resumed.epoch, resumed.position) == (1, 3)
    assert draw(resumed, [5, 12, 3]) == draw(original, [5, 12, 3])


def test_state_from_another_dataset_is_refused():
    state = PromptSource(items(), seed=0).state_dict()
    with pytest.raises(UserError, match="data config changed"):
        PromptSource(items(IDS[:9]), seed=0).load_state_dict(state)
    with pytest.raises(UserError):
        PromptSource(items([f"q{i}" for i in range(10)]), seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="lacks"):
        PromptSource(items(), seed=0).load_state_dict({"epoch": 0})


def test_bad_items_are_errors():
    with pytest.raises(ValueError, match="at least one"):
        PromptSource([], seed=0)
    with pytest.raises(ValueError, match="unique"):
        PromptSource(items(["a", "b", "a"]), seed=0)
    with pytest.raises(ValueError, match="needs 'id' and 'prompt'"):
        PromptSource([{"id": "a"}], seed=0)
    with pytest.raises(ValueError, match="n >= 0"):
        PromptSource(items(), seed=0).next_batch(-1)


def test_toy_prompt_source_ids_unique_and_columns():
    cfg = FlywheelConfig(seed=2, data={"toy_size": 30})
    source = toy_prompt_source(cfg)
    assert len(source) == 60
    all_items = source.items
    assert len({item.id for item in all_items}) == 60
    assert {item.columns["task"] for item in all_items} == {"preference", "arithmetic"}
    drawn = draw(source, [60])
    assert sorted(drawn) == sorted(item.id for item in all_items)
    only_arith = toy_prompt_source(FlywheelConfig(data={"toy_size": 5, "toy_tasks": ["arithmetic"], "shuffle": False}))
    assert [i.prompt for i in only_arith.next_batch(5)] == [r.prompt for r in _arith_prompts(5, 0)]


def _arith_prompts(n, seed):
    from services.core.toy_world import TASKS

    return TASKS["arithmetic"].prompts(n, seed=seed)


def test_toy_prompt_source_rejects_non_toy_source():
    cfg = FlywheelConfig(data={"source": "rows.jsonl"})
    with pytest.raises(UserError, match="serves the toy world only"):
        toy_prompt_source(cfg)
