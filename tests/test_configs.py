"""Every file in configs/ loads and validates."""

from __future__ import annotations

from pathlib import Path

import pytest

from dyprag.world import load_schema

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_validates(path):
    if path.name.startswith("world"):
        schema = load_schema(path)
        assert schema["splits"]["test"] > 0
    else:
        pytest.fail(f"{path.name}: no loader knows this config kind; add one to this test")
