"""Numbers to their precision (headscope.fmt), on hand-worked cases."""
import pytest

from headscope.fmt import number


@pytest.mark.parametrize("x, want", [
    (0.7700000107288361, "0.77"), (67.25925925925927, "67.26"), (0.00000000005, "5.000e-11"), (1.0, "1"),
    (12345.678, "12346"), (0.00012346, "0.0001235"), (-2.5, "-2.5"), (3, "3"), (True, "True"), (None, "None"),
    ("L3H1", "L3H1"), (0.0, "0"), (float("nan"), "nan"), (2.5e7, "2.500e+07"),
])
def test_number(x, want):
    assert number(x) == want
