"""The bench workload: length distributions parsed from their spec strings, and bad specs refused clearly."""

from __future__ import annotations

import pytest

from pdserve.bench import workload


def test_bad_distribution_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="uniform:LO:HI"):
        workload.Distribution("uniform:5")
