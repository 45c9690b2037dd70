"""The arithmetic the benchmark scripts report."""

from __future__ import annotations

import pytest

from benchmarks.hypervolume import hypervolume


def test_hypervolume_of_a_staircase():
    # two non-dominated points and one dominated one, reference (0, 0)
    points = [(3.0, 1.0), (1.0, 2.0), (0.5, 0.5)]
    assert hypervolume(points, (0.0, 0.0)) == pytest.approx(3 * 1 + 1 * 1)
    assert hypervolume([], (0.0, 0.0)) == 0.0
    assert hypervolume([(1.0, -1.0)], (0.0, 0.0)) == 0.0  # below the reference: no area
