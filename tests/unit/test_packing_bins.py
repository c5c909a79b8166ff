"""Sequence packing's pure pieces: token-budget bins computed by hand, one packed row and
back, and the config settings that switch it on."""

from __future__ import annotations

import pytest
import torch

from services.core.config import packing_budget
from services.core.config_loading import load_config
from services.core.errors import UserError
from services.core.packing import pack_bins, pack_row, row_bins


def test_first_fit_decreasing_by_hand():
    # longest first: 8 -> A; 7 -> B (15 > 10); 5 -> C; 3 -> B (10); 2 -> A (10); 1 -> C (6)
    assert pack_bins([5, 3, 8, 2, 7, 1], 10) == [[0, 5], [1, 4], [2, 3]]
    # everything fits in one budget: one bin; a budget of one sequence each: one bin each
    assert pack_bins([4, 2, 3], 9) == [[0, 1, 2]]
    assert pack_bins([4, 2, 3], 4) == [[0], [1], [2]]
    # ties keep index order: 3 (i0) -> A, 3 (i1) -> A (6), 3 (i2) -> B, 1 (i3) -> B
    assert pack_bins([3, 3, 3, 1], 6) == [[0, 1], [2, 3]]
    assert pack_bins([], 10) == []


def test_sequences_longer_than_the_budget_run_alone():
    # 12 > 10 opens bin A alone; 4 does not fit A (16) -> B; 3 -> B (7)
    assert pack_bins([12, 3, 4], 10) == [[0], [1, 2]]
    assert pack_bins([11, 11], 10) == [[0], [1]]


def test_min_bins_splits_the_fullest_bin():
    assert pack_bins([1, 1, 1, 1, 1], 10) == [[0, 1, 2, 3, 4]]
    # [0..4] -> [0, 1] + [2, 3, 4]; then the 3-row bin -> [2] + [3, 4]
    assert pack_bins([1, 1, 1, 1, 1], 10, min_bins=3) == [[0, 1], [2], [3, 4]]
    assert pack_bins([5, 3, 8, 2, 7, 1], 10, min_bins=2) == [[0, 5], [1, 4], [2, 3]]  # already 3
    assert pack_bins([2, 2], 10, min_bins=2) == [[0], [1]]


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_tokens must be at least 1"):
        pack_bins([1], 0)
    with pytest.raises(ValueError, match="2 sequences cannot fill 3 bins"):
        pack_bins([1, 1], 10, min_bins=3)
    with pytest.raises(ValueError, match="negative length"):
        pack_bins([1, -1], 10)


def test_row_bins_are_the_padded_micro_batches():
    assert row_bins(5, 2) == [[0, 1], [2, 3], [4]]
    assert row_bins(0, 2) == []


def test_pack_row_and_unpack():
    ids = torch.tensor([[5, 6, 7, 1], [8, 1, 1, 1], [9, 10, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]])
    packed = pack_row(ids, mask)
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9, 10]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 0, 1]]
    assert packed.tokens == 6 and packed.shape == (3, 4)
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]], requires_grad=True)
    # per-token (shifted) values: each sequence's first position is 0, padding is 0
    shifted = packed.unpack(values)
    assert shifted.tolist() == [[0, 2, 3, 0], [0, 0, 0, 0], [0, 6, 0, 0]]
    assert packed.unpack(values, shifted=False).tolist() == [[1, 2, 3, 0], [4, 0, 0, 0], [5, 6, 0, 0]]
    shifted.sum().backward()
    assert values.grad.tolist() == [[0, 1, 1, 0, 0, 1]]
    hidden = torch.arange(12.0).view(1, 6, 2)  # trailing dimensions are carried along
    assert packed.unpack(hidden, shifted=False)[2].tolist() == [[8, 9], [10, 11], [0, 0], [0, 0]]


def test_pack_row_needs_right_padding():
    with pytest.raises(ValueError, match="right-padded"):
        pack_row(torch.tensor([[1, 5, 6]]), torch.tensor([[0, 1, 1]]))


def test_packing_settings():
    cfg = load_config("grpo-toy", ["learner.packing=true", "learner.max_tokens_per_micro_batch=512",
                                   "reference.packing=true"])
    assert cfg.learner.packing and cfg.learner.max_tokens_per_micro_batch == 512
    assert cfg.reference.packing and packing_budget(cfg.reference) == 4096  # null: the default budget
    assert packing_budget(cfg.learner) == 512
    assert not load_config("grpo-toy").learner.packing  # off by default
    with pytest.raises(UserError, match="max_tokens_per_micro_batch is used only with packing: true"):
        load_config("grpo-toy", ["learner.max_tokens_per_micro_batch=512"])
    with pytest.raises(UserError, match="reference.max_tokens_per_micro_batch"):
        load_config("grpo-toy", ["reference.max_tokens_per_micro_batch=512"])
    with pytest.raises(UserError, match="learner.max_tokens_per_micro_batch"):
        load_config("grpo-toy", ["learner.packing=true", "learner.max_tokens_per_micro_batch=0"])


def test_stages_with_their_own_padded_loop_refuse_packing(tmp_path):
    from services.learner.reward_model import run_train_rm
    from services.learner.sft import run_sft

    with pytest.raises(UserError, match="`flywheel sft` trains on padded micro-batches"):
        run_sft(load_config("sft-toy", ["learner.packing=true"]), tmp_path / "sft")
    with pytest.raises(UserError, match="`flywheel train-rm` trains on padded micro-batches"):
        run_train_rm(load_config("rm-toy", ["learner.packing=true"]), tmp_path / "rm")
