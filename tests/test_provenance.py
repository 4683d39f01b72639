"""provenance(): versions, device, dtype, Python and the git revision of the checkout."""

from __future__ import annotations

import re

from ddim_lab.study.provenance import git_revision, provenance
from tests.conftest import ROOT


def test_provenance_records_versions_device_and_revision():
    info = provenance(device="cpu", dtype="fp16")
    assert {"torch", "diffusers", "transformers", "hydra"} <= set(info["versions"])
    assert info["versions"]["hydra"].startswith("1.3") and info["device"] == "cpu" and info["dtype"] == "fp16"
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", info["git_revision"])  # the tests run in a checkout
    assert info["python"].count(".") == 2


def test_revision_is_unknown_outside_a_checkout(tmp_path):
    assert git_revision(tmp_path) == "unknown"
    assert git_revision(ROOT) != "unknown"
