"""The data planes under test. Mooncake's are skipped, with the reason, where its library
cannot load (scripts/setup.sh installs it, so a `make test` machine runs them)."""

from __future__ import annotations

import pytest

from mmdisagg.transfer.planes.base import PlaneError
from mmdisagg.transfer.planes.mooncake import engine_class


def _mooncake_missing() -> str | None:
    try:
        engine_class()
    except PlaneError as exc:
        return str(exc)
    return None


MOONCAKE_MISSING = _mooncake_missing()
requires_mooncake = pytest.mark.skipif(MOONCAKE_MISSING is not None,
                                       reason=f"mooncake data plane: {MOONCAKE_MISSING}")
BACKENDS = ["shm", "tcp", pytest.param("mooncake", marks=requires_mooncake)]
