"""Numbers to their precision (headscope.fmt), on hand-worked cases."""
import pytest

from headscope.fmt import number


@pytest.mark.parametrize("x, want", [
    (0.7700000107288361, "0.77"), (67.25925925925927, "67.26"), (0.00000000005, "5e-11"), (1.0, "1"),
    (12345.678, "12346"), (0.00012346, "0.0001235"), (-2.5, "-2.5"), (3, "3"), (True, "True"), (None, "None"),
    ("L3H1", "L3H1"), (0.0, "0"), (float("nan"), "nan"), (2.5e7, "2.5e+07"),
])
def test_number(x, want):
    assert number(x) == want


@pytest.mark.parametrize("x, std, want", [(0.62412, 0.0131, "0.624 ± 0.013"), (12.345, 2.1, "12.3 ± 2.1"),
                                          (1234.7, 150.0, "1235 ± 150"), (0.5, 0.0, "0.5")])
def test_number_with_spread(x, std, want):
    assert number(x, std=std) == want
