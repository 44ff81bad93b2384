"""Shared fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def qm9_all():
    """All 130,831 QM9 molecules with hydrogens.

    The first run parses the qm9pack CSVs into the on-disk cache (about 10 s); later runs load it.
    """
    from rgdm.data.qm9 import load_qm9

    return load_qm9("all")
