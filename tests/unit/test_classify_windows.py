"""classify.window_spans: the windows a long transcript is judged in (pure logic).

The model side (real tokenizer, real scores, the max over windows) is in
tests/integration/test_classifier_cope_a.py.
"""

from __future__ import annotations

from itertools import pairwise

import pytest

from audio_pipeline.classify import ClassifierSettings, window_spans
from audio_pipeline.config import ConfigError


def covered(spans: list[tuple[int, int]]) -> set[int]:
    return {t for start, end in spans for t in range(start, end)}


@pytest.mark.parametrize("n", [0, 1, 99, 100])
def test_content_that_fits_is_one_window(n):
    assert window_spans(n, 100, 12, 32) == ([(0, n)], False)


@pytest.mark.parametrize(
    ("n", "size", "overlap"),
    [(101, 100, 12), (1000, 100, 12), (977, 64, 8), (50, 7, 0), (10_000, 512, 64)],
)
def test_windows_cover_every_token_with_the_overlap(n, size, overlap):
    spans, truncated = window_spans(n, size, overlap, 10_000)
    assert not truncated
    assert covered(spans) == set(range(n))
    assert spans[0][0] == 0
    assert spans[-1][1] == n
    assert all(end - start <= size for start, end in spans)
    for (_, prev_end), (start, end) in pairwise(spans):
        assert prev_end - start == overlap, "neighbours share exactly the overlap"
        assert end > prev_end, "every window adds new tokens"


def test_a_phrase_cut_at_a_window_edge_is_whole_in_the_next():
    spans, _ = window_spans(300, 100, 12, 32)
    for phrase_start in range(0, 300 - 12):
        phrase = set(range(phrase_start, phrase_start + 12))
        assert any(phrase <= set(range(s, e)) for s, e in spans), phrase_start


def test_the_cap_leaves_the_rest_out_and_says_so():
    spans, truncated = window_spans(1000, 100, 12, 3)
    assert truncated
    assert spans == [(0, 100), (88, 188), (176, 276)]
    assert max(covered(spans)) < 999
    exact, truncated = window_spans(276, 100, 12, 3)
    assert exact[-1] == (176, 276)
    assert not truncated, "the cap reached exactly at the end leaves nothing out"


@pytest.mark.parametrize(
    ("size", "overlap", "cap"), [(0, 0, 1), (10, 10, 1), (10, -1, 1), (10, 2, 0)]
)
def test_nonsense_windows_are_refused(size, overlap, cap):
    with pytest.raises(ValueError, match="bad windows"):
        window_spans(100, size, overlap, cap)


def test_max_windows_from_env():
    assert ClassifierSettings.from_env({}).max_windows == 32
    assert ClassifierSettings.from_env({"CLASSIFIER_MAX_WINDOWS": "4"}).max_windows == 4
    with pytest.raises(ConfigError, match="CLASSIFIER_MAX_WINDOWS"):
        ClassifierSettings.from_env({"CLASSIFIER_MAX_WINDOWS": "0"})
