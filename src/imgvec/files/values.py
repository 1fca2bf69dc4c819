"""What a stored number may be: finite, and small enough that what imgvec computes from it cannot overflow.

Vectors are normalised and compared in float32. A component above ~1.8e19 overflows the sum of squares
(the row's norm becomes inf and the row scores 0 against everything), so a value that is finite is not
yet usable. :data:`MAX_ABS_VALUE` leaves room for any dimension up to 10^8; real embeddings are below 10^4.
"""

from __future__ import annotations

import numpy as np

MAX_ABS_VALUE = 1e15


def unusable_rows(values: np.ndarray) -> np.ndarray:
    """Per row (first axis), whether any value is NaN, infinite or above :data:`MAX_ABS_VALUE` in size."""
    values = np.asarray(values)
    if values.ndim == 0:
        values = values.reshape(1)
    if not values.size:
        return np.zeros(len(values), bool)
    flat = values.reshape(len(values), -1)
    # NaN compares False: one pass of abs().max() catches NaN, inf and the too large together
    return ~(np.abs(flat).max(axis=1) <= MAX_ABS_VALUE)


def describe_unusable() -> str:
    """The words errors use for an unusable value."""
    return f"NaN, infinite or out-of-range values (imgvec keeps |v| <= {MAX_ABS_VALUE:.0e})"
