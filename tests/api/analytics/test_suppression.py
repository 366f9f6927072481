"""Small-count suppression rules, on plain numbers."""

from __future__ import annotations

from datetime import date, timedelta

from hypothesis import given
from hypothesis import strategies as st

from api.analytics.service import HiddenDays, age_band, hidden_days, suppress_cells


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


# -- registrations: one set of hidden days per series, decided on the whole series --------------------------

D = date(2025, 3, 12)


def test_no_hidden_days_without_small_counts() -> None:
    rule = hidden_days(small_days=0, small_sum=0, smallest_large_day=D, threshold=10)
    assert rule.complement is None
    assert not rule.hides(D, 0) and not rule.hides(D, 10) and not rule.hides(D, 500)


def test_every_small_day_is_hidden_whatever_the_question() -> None:
    rule = hidden_days(small_days=3, small_sum=12, smallest_large_day=D, threshold=10)
    assert rule.complement is None  # three hidden days adding up to 12: the all-time total gives nothing away
    assert [rule.hides(D, c) for c in (0, 1, 9, 10)] == [False, True, True, False]


def test_a_lone_small_day_takes_the_smallest_large_day_with_it() -> None:
    """The all-time total (active + removed patients) minus every shown day would be that one day."""
    rule = hidden_days(small_days=1, small_sum=4, smallest_large_day=D, threshold=10)
    assert rule.complement == D
    assert rule.hides(D, 57) and not rule.hides(D + timedelta(days=1), 57)


def test_small_days_adding_up_to_less_than_the_threshold_take_a_large_day_with_them() -> None:
    assert hidden_days(small_days=2, small_sum=9, smallest_large_day=D, threshold=10).complement == D
    assert hidden_days(small_days=2, small_sum=10, smallest_large_day=D, threshold=10).complement is None
    # No large day at all: then the all-time total is itself small, and hidden wherever it is published.
    assert hidden_days(small_days=1, small_sum=4, smallest_large_day=None, threshold=10).complement is None


def test_nothing_is_hidden_when_suppression_does_not_apply() -> None:
    assert not HiddenDays(threshold=10, complement=D, applied=False).hides(D, 3)
