"""Update and pruning schedules against brute force, for any parameters."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rigl_keras.schedules import PolynomialSchedule, UpdateSchedule


@settings(max_examples=60, deadline=None)
@given(delta_t=st.integers(1, 20), begin=st.integers(0, 30), end=st.integers(1, 120),
       first=st.integers(0, 130), gap=st.integers(1, 25))
def test_update_steps_match_brute_force(delta_t, begin, end, first, gap):
    schedule = UpdateSchedule(delta_t=delta_t, end_step=end, begin_step=begin)
    brute = [t for t in range(first + 1, first + gap + 1) if t > 0 and t >= begin and t < end and t % delta_t == 0]
    assert schedule.last_update_step(first, first + gap, end) == (brute[-1] if brute else None)
    upcoming = [t for t in range(first + 1, end) if schedule.is_update_step(t, end)]
    assert schedule.next_update_step(first, end) == (upcoming[0] if upcoming else None)


@settings(max_examples=60, deadline=None)
@given(delta_t=st.integers(1, 20), begin=st.integers(0, 30), length=st.integers(0, 90),
       first=st.integers(-1, 130))
def test_official_update_steps_match_brute_force(delta_t, begin, length, first):
    end = max(begin + length, 1)
    schedule = UpdateSchedule(delta_t=delta_t, end_step=end, begin_step=begin, timing="official")
    official = [t for t in range(0, end + 1) if t >= begin and (t - begin) % delta_t == 0]
    assert [t for t in range(0, end + 2) if schedule.is_update_step(t, end)] == official
    upcoming = [t for t in official if t > first]
    assert schedule.next_update_step(first, end) == (upcoming[0] if upcoming else None)


def test_official_drop_fraction_is_tf_cosine_decay_over_end_minus_begin():
    schedule = UpdateSchedule(alpha=0.3, end_step=1000, begin_step=200, timing="official")
    assert schedule.drop_fraction(0, 1000) == pytest.approx(0.3)
    assert schedule.drop_fraction(400, 1000) == pytest.approx(0.15)  # 400 / (1000 - 200) = 1/2
    assert schedule.drop_fraction(900, 1000) == pytest.approx(0.0)  # clamped at the span


@settings(max_examples=60, deadline=None)
@given(frequency=st.integers(1, 20), begin=st.integers(0, 30), length=st.integers(1, 90),
       first=st.integers(0, 130), gap=st.integers(1, 25))
def test_prune_steps_match_brute_force(frequency, begin, length, first, gap):
    schedule = PolynomialSchedule(0.9, begin, begin + length, frequency=frequency)
    brute = [t for t in range(first + 1, first + gap + 1) if schedule.is_prune_step(t)]
    assert schedule.last_prune_step(first, first + gap) == (brute[-1] if brute else None)
    upcoming = [t for t in range(first + 1, begin + length + 1) if schedule.is_prune_step(t)]
    assert schedule.next_prune_step(first) == (upcoming[0] if upcoming else None)


def test_cosine_and_constant_decay():
    cosine = UpdateSchedule(alpha=0.3, end_step=1000)
    assert cosine.drop_fraction(0, 1000) == pytest.approx(0.3)
    assert cosine.drop_fraction(500, 1000) == pytest.approx(0.15)
    assert cosine.drop_fraction(250, 1000) == pytest.approx(0.15 * (1 + math.cos(math.pi / 4)))
    assert UpdateSchedule(alpha=0.3, decay="constant").drop_fraction(700, 1000) == 0.3
    assert cosine.end(2000) == 1000 and UpdateSchedule(end_step=0.75).end(2000) == 1500


@pytest.mark.parametrize("kwargs", [dict(begin_step=-1), dict(begin_step=1.5), dict(delta_t=True),
                                    dict(timing="tf1"), dict(timing="official", end_step=0.5),
                                    dict(timing="official", end_step=10, begin_step=20)])
def test_bad_update_schedule(kwargs):
    with pytest.raises(ValueError):
        UpdateSchedule(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [dict(initial_sparsity=0.95), dict(exponent=0), dict(begin_step=-1), dict(final_sparsity=1.0)],
)
def test_bad_polynomial_schedule(kwargs):
    args = dict(final_sparsity=0.9, begin_step=0, end_step=10) | kwargs
    with pytest.raises(ValueError):
        PolynomialSchedule(**args)
