"""The pure parts of benchmarks/streaming.py: lump-to-lump rate windows, batch occupancy."""

import math

from benchmarks.streaming import event_window, mean_running, percentile


def test_event_window_spans_first_to_last_change_inside():
    ts = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    counts = [0, 64, 64, 128, 128, 192, 256]
    # the change at t=1 is before the window opens, the one at t=6 after it closes
    assert event_window(ts, counts, 1.5, 5.5) == (3, 5)
    # rate lump to lump: 64 completions per 2 s, whatever the edges
    i, j = event_window(ts, counts, 1.5, 5.5)
    assert (counts[j] - counts[i]) / (ts[j] - ts[i]) == 32.0


def test_event_window_needs_two_lumps():
    assert event_window([0.0, 1.0, 2.0], [0, 0, 8], 0.0, 2.0) is None
    assert event_window([0.0, 1.0], [0, 0], 0.0, 1.0) is None


def test_mean_running_is_tokens_per_decode_step():
    # one call: 4 sequences of lengths 10, 10, 10, 40 run 40 steps for 70 tokens
    assert mean_running([[10, 10, 10, 40]]) == 70 / 40
    assert mean_running([[5, 5], [10, 10]]) == 30 / 15
    assert math.isnan(mean_running([]))


def test_percentile_interpolates():
    assert percentile([1, 2, 3, 4, 5], 0.5) == 3
    assert percentile([0, 10], 0.9) == 9
    assert math.isnan(percentile([], 0.5))
