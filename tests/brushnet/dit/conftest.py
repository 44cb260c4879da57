"""Tiny random SD3 and Flux bases saved as real diffusers pipeline folders (built once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from brushnet.testing.tiny_dit import build_tiny_flux_base, build_tiny_sd3_base


@pytest.fixture(scope="session")
def tiny_sd3_base(tmp_path_factory) -> Path:
    return build_tiny_sd3_base(tmp_path_factory.mktemp("base-sd3") / "sd3")


@pytest.fixture(scope="session")
def tiny_flux_base(tmp_path_factory) -> Path:
    return build_tiny_flux_base(tmp_path_factory.mktemp("base-flux") / "flux")


@pytest.fixture(scope="session")
def tiny_dit_bases(tiny_sd3_base, tiny_flux_base) -> dict[str, Path]:
    return {"sd3": tiny_sd3_base, "flux": tiny_flux_base}
