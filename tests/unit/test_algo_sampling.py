import pytest
import torch

from asyncrl.algo.sampling import (
    dynamic_sampling_mask,
    overlong_filter_mask,
    soft_overlong_punishment,
    truncated_from_finish_reasons,
)


def test_dynamic_sampling_keeps_only_groups_with_distinct_rewards():
    r = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 1.0], [0.5, 0.5, 0.50001]])
    assert dynamic_sampling_mask(r).tolist() == [False, False, True, True]
    assert dynamic_sampling_mask(r, atol=1e-3).tolist() == [False, False, True, False]


def test_overlong_filtering_masks_truncated_completions():
    truncated = truncated_from_finish_reasons(["stop", "length", "stop"])
    assert truncated.tolist() == [False, True, False]
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    want = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(overlong_filter_mask(mask, truncated), want)


@pytest.mark.parametrize("length, penalty", [
    (0, 0.0), (10, 0.0), (16, 0.0),  # at or below L_max - L_cache = 16: no penalty
    (17, -0.25), (18, -0.5), (19, -0.75), (20, -1.0),  # linear inside the cache interval
    (21, -1.0), (500, -1.0),  # beyond L_max
])
def test_soft_overlong_punishment_regimes_and_boundaries(length, penalty):
    got = soft_overlong_punishment(torch.tensor([length]), max_len=20, cache_len=4)
    assert got.item() == pytest.approx(penalty)


def test_soft_overlong_punishment_is_vectorised_and_checks_its_arguments():
    got = soft_overlong_punishment(torch.tensor([5, 17, 30]), max_len=20, cache_len=4)
    torch.testing.assert_close(got, torch.tensor([0.0, -0.25, -1.0]))
    with pytest.raises(ValueError, match="cache_len"):
        soft_overlong_punishment(torch.tensor([5]), max_len=20, cache_len=0)
    with pytest.raises(ValueError, match="cache_len"):
        soft_overlong_punishment(torch.tensor([5]), max_len=20, cache_len=21)
