"""CHES (Razin et al. 2024) against an explicit loop over fixed hidden states."""

import torch

from services.core.rl_math import ches_keep_mask, ches_scores, response_hidden_sum


def slow_ches(hidden_c, mask_c, hidden_r, mask_r):
    """Loop form: for each response token k at position t, add the hidden state at t - 1."""
    out = []
    for b in range(hidden_c.shape[0]):
        sums = []
        for hidden, mask in ((hidden_c, mask_c), (hidden_r, mask_r)):
            total = [0.0] * hidden.shape[2]
            for t in range(1, hidden.shape[1]):
                if mask[b, t]:
                    for d in range(hidden.shape[2]):
                        total[d] += float(hidden[b, t - 1, d])
            sums.append(total)
        c, r = sums
        out.append(sum(ci * ri for ci, ri in zip(c, r)) - sum(ci * ci for ci in c))
    return out


def test_ches_matches_the_explicit_loop():
    g = torch.Generator().manual_seed(0)
    hidden_c, hidden_r = torch.randn(3, 6, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    # prompt of 2 tokens then responses of different lengths, right padding
    mask_c = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1], [0, 1, 0, 0, 0, 0]])
    mask_r = torch.tensor([[0, 0, 1, 1, 0], [0, 0, 0, 1, 0], [0, 1, 1, 1, 1]])
    got = ches_scores(response_hidden_sum(hidden_c, mask_c), response_hidden_sum(hidden_r, mask_r))
    expected = slow_ches(hidden_c, mask_c, hidden_r, mask_r)
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), atol=1e-5)


def test_ches_by_hand():
    # one token each: h+ = (1, 2), h- = (3, 0): <h+, h-> - |h+|^2 = 3 - 5 = -2
    hidden_c = torch.tensor([[[1.0, 2.0], [9.0, 9.0]]])
    hidden_r = torch.tensor([[[3.0, 0.0], [9.0, 9.0]]])
    mask = torch.tensor([[0, 1]])
    assert ches_scores(response_hidden_sum(hidden_c, mask), response_hidden_sum(hidden_r, mask)).item() == -2.0
    # identical responses: <h, h> - |h|^2 = 0, the most a pair with |h+| fixed can score
    same = response_hidden_sum(hidden_c, mask)
    assert ches_scores(same, same).item() == 0.0


def test_keep_mask_drops_the_top_fraction():
    scores = torch.tensor([0.5, -3.0, 2.0, 1.0, -1.0])
    assert ches_keep_mask(scores, 0.4).tolist() == [True, True, False, False, True]  # ceil(2.0) = 2 dropped
    assert ches_keep_mask(scores, 0.0).all()
    assert ches_keep_mask(scores, 0.1).tolist() == [True, True, False, True, True]  # ceil(0.5) = 1
    assert ches_keep_mask(torch.tensor([1.0]), 0.5).tolist() == [True]  # never drops every pair
