"""Small-count suppression rules, on plain numbers."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from api.analytics.service import age_band, suppress_cells


def test_nothing_hidden_when_every_cell_is_zero_or_large() -> None:
    assert suppress_cells([0, 10, 250], threshold=10) == ([False, False, False], False)


def test_one_small_cell_takes_the_next_smallest_with_it() -> None:
    hidden, total_hidden = suppress_cells([3, 40, 12, 0], threshold=10)
    assert hidden == [True, False, True, False]
    assert not total_hidden


def test_hidden_cells_must_add_up_to_the_threshold() -> None:
    hidden, _ = suppress_cells([1, 2, 50, 60, 70], threshold=10)
    assert hidden == [True, True, True, False, False]


def test_total_hidden_when_it_alone_would_give_the_cell_away() -> None:
    assert suppress_cells([4], threshold=10) == ([True], True)
    assert suppress_cells([4, 3], threshold=10) == ([True, True], True)


@given(st.lists(st.integers(0, 40), max_size=12), st.integers(2, 15))
def test_no_hidden_cell_can_be_worked_out_from_the_total(counts: list[int], threshold: int) -> None:
    hidden, total_hidden = suppress_cells(counts, threshold=threshold)
    for count, h in zip(counts, hidden, strict=True):
        if 0 < count < threshold:
            assert h  # every small count is hidden
    if any(hidden) and not total_hidden:
        hidden_counts = [c for c, h in zip(counts, hidden, strict=True) if h]
        assert len(hidden_counts) >= 2 and sum(hidden_counts) >= threshold


def test_age_bands_use_age_reached_this_year() -> None:
    assert age_band(2026, reference_year=2026) == "0-17"
    assert age_band(2008, reference_year=2026) == "18-34"
    assert age_band(2009, reference_year=2026) == "0-17"
    assert age_band(1977, reference_year=2026) == "35-49"
    assert age_band(1946, reference_year=2026) == "80+"
    assert age_band(None, reference_year=2026) == "unknown"
    assert age_band(2030, reference_year=2026) == "unknown"
