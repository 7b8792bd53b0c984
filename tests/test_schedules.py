import math

import pytest

from keras_prune.schedules import (
    ConstantSchedule,
    GeometricSchedule,
    ListSchedule,
    PolynomialSchedule,
    PruningSchedule,
)


def test_polynomial_is_cubic_in_the_number_of_cuts_and_ends_at_final():
    schedule = PolynomialSchedule(0.8, begin_step=2, end_step=5)
    # Four cuts (steps 2, 3, 4, 5): 0.8 * (1 - (1 - k/4) ** 3) for k = 1..4.
    expected = [
        0.0,
        0.0,
        0.8 * (1 - 0.75**3),
        0.8 * (1 - 0.5**3),
        0.8 * (1 - 0.25**3),
        0.8,
        0.8,
    ]
    assert [schedule(step) for step in range(7)] == pytest.approx(expected)


def test_polynomial_frequency_holds_between_cuts_and_still_lands_on_end():
    schedule = PolynomialSchedule(0.5, begin_step=0, end_step=5, frequency=2)
    values = [schedule(step) for step in range(7)]
    # Cuts at 0, 2, 4 and the end step 5.
    assert values[0] == values[1] < values[2] == values[3] < values[4] < values[5]
    assert values[5] == values[6] == 0.5


def test_polynomial_starts_from_initial_sparsity():
    schedule = PolynomialSchedule(
        0.9, begin_step=0, end_step=1, initial_sparsity=0.5, power=1
    )
    assert schedule(0) == pytest.approx(0.7)
    assert schedule(1) == 0.9


def test_geometric_keeps_factor_per_cut_until_final():
    schedule = GeometricSchedule(0.9977, factor=0.7)
    kept = [1 - schedule(step) for step in range(20)]
    assert kept[:3] == pytest.approx([0.7, 0.49, 0.343])
    # The seed report's ladder: 0.7 ** 17 = 0.0023 is the 17th cut.
    rounds = math.ceil(math.log(1 - 0.9977) / math.log(0.7))
    assert kept[rounds - 1] == pytest.approx(0.0023)
    assert kept[rounds - 2] > 0.0023


def test_geometric_jumps_to_final_at_end_step():
    schedule = GeometricSchedule(0.99, begin_step=1, end_step=3, factor=0.5)
    assert [schedule(step) for step in range(5)] == [0.0, 0.5, 0.75, 0.99, 0.99]


def test_constant_cuts_once():
    schedule = ConstantSchedule(0.6, begin_step=2)
    assert [schedule(step) for step in range(4)] == [0.0, 0.0, 0.6, 0.6]


@pytest.mark.parametrize(
    "schedule",
    [
        PolynomialSchedule(0.95, begin_step=1, end_step=7, power=2, frequency=3),
        GeometricSchedule(0.9, begin_step=1, end_step=None, factor=0.5),
        ConstantSchedule(0.5, begin_step=3),
        ListSchedule([0.1, 0.1, 0.7], begin_step=2, frequency=2),
    ],
    ids=["polynomial", "geometric", "constant", "list"],
)
def test_schedules_round_trip_config_through_json_and_never_decrease(schedule):
    import json

    clone = type(schedule).from_config(json.loads(json.dumps(schedule.get_config())))
    assert clone == schedule
    values = [schedule(step) for step in range(12)]
    assert values == sorted(values)
    assert repr(schedule).startswith(type(schedule).__name__ + "(")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: PolynomialSchedule(1.2),
            r"Expected `final_sparsity` in \[0, 1\)\. Received: final_sparsity=1.2",
        ),
        (
            lambda: PolynomialSchedule(0.5, initial_sparsity=0.6),
            r"Expected `initial_sparsity` <= `final_sparsity` \(0.5\)\. "
            r"Received: initial_sparsity=0.6",
        ),
        (
            lambda: PolynomialSchedule(0.5, begin_step=3, end_step=2),
            r"Expected `end_step` >= 3, the first pruning step\. Received: end_step=2",
        ),
        (
            lambda: PolynomialSchedule(0.5, frequency=0),
            r"Expected `frequency` to be an integer >= 1\. Received: frequency=0",
        ),
        (
            lambda: PolynomialSchedule(0.5, power=0),
            r"Expected `power` > 0\. Received: power=0",
        ),
        (
            lambda: GeometricSchedule(0.5, factor=1.0),
            r"Expected `factor` in \(0, 1\)\. Received: factor=1.0",
        ),
        (
            lambda: ConstantSchedule(0.5, begin_step=-1),
            r"Expected `begin_step` to be an integer >= 0\. Received: begin_step=-1",
        ),
        (
            lambda: ListSchedule([0.5, 0.4]),
            r"Expected `sparsities` to be a non-empty, non-decreasing list\. "
            r"Received: sparsities=\[0.5, 0.4\]",
        ),
        (
            lambda: ListSchedule([]),
            r"Expected `sparsities` to be a non-empty, non-decreasing list\. "
            r"Received: sparsities=\[\]",
        ),
        (
            lambda: ListSchedule([0.5, 1.0]),
            r"Expected `sparsities` in \[0, 1\)\. Received: sparsities=1.0",
        ),
    ],
    ids=[
        "final",
        "initial",
        "end",
        "frequency",
        "power",
        "factor",
        "begin",
        "list-decreasing",
        "list-empty",
        "list-value",
    ],
)
def test_bad_schedule_arguments(make, message):
    with pytest.raises(ValueError, match="^" + message + "$"):
        make()


def test_base_schedule_must_be_subclassed():
    with pytest.raises(NotImplementedError, match=r"^PruningSchedule must implement"):
        PruningSchedule()(0)


def test_list_schedule_replays_values_then_holds():
    schedule = ListSchedule([0.3, 0.51, 0.657], begin_step=1, frequency=2)
    assert [schedule(step) for step in range(9)] == [
        0.0,
        0.3,
        0.3,
        0.51,
        0.51,
        0.657,
        0.657,
        0.657,
        0.657,
    ]
