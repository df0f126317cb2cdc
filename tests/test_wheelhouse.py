"""Which wheels a board can run: the manylinux tags from its glibc."""

from __future__ import annotations

import pytest

from skip2fleet.server.operations.wheelhouse import dependencies, platform_tags
from skip2fleet.shared.errors import FleetError


def test_a_pi_on_bookworm_takes_every_manylinux_tag_up_to_its_glibc():
    tags = platform_tags("aarch64", "2.36")
    assert tags[0] == "manylinux_2_36_aarch64" and tags[-1] == "manylinux2014_aarch64"
    assert "manylinux_2_17_aarch64" in tags and "manylinux_2_37_aarch64" not in tags
    assert len(tags) == 36 - 17 + 2


@pytest.mark.parametrize(("glibc", "problem"), [("none", "musl"), ("2.5", "2.17 or newer")])
def test_a_board_without_a_usable_glibc_is_refused(glibc, problem):
    with pytest.raises(FleetError, match=problem):
        platform_tags("armv7l", glibc)


def test_the_installer_travels_with_the_dependencies():
    assert "uv" in dependencies() and any(d.startswith("flwr") for d in dependencies())
