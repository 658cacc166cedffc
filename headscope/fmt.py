"""Numbers as people read them: one definition for the CLI, reports and the dashboard.

fp32 scores carry float noise (0.7700000107288361, 67.25925925925927); printed with every digit
they suggest a precision the measurement does not have. Floats get 4 significant digits in plain
notation between 1e-4 and 1e6 (all integer digits kept: 12346), scientific outside (5e-11);
integers stay exact.
"""
from __future__ import annotations

import math


def number(x, digits: int = 4, std: float | None = None) -> str:
    """``x`` to ``digits`` significant digits; ints, bools, None and strings unchanged (as str).

    With a spread ``std`` > 0 the value is rounded where the std's second significant digit falls
    and shown with it: ``0.624 ± 0.013``, ``1235 ± 150``."""
    if isinstance(x, bool) or x is None or isinstance(x, (str, int)):
        return str(x)
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(v) or math.isinf(v):
        return str(v)
    if std is not None and math.isfinite(std) and std > 0:
        decimals = min(max(0, 1 - math.floor(math.log10(std))), 12)
        return f"{v:.{decimals}f} ± {std:.{decimals}f}"
    if v == 0:
        return "0"
    if 1e-4 <= abs(v) < 1e6:
        decimals = max(0, digits - 1 - math.floor(math.log10(abs(v))))
        text = f"{v:.{decimals}f}"
        return text.rstrip("0").rstrip(".") if "." in text else text
    return f"{v:.{digits}g}"
