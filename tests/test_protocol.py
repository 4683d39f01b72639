"""The protocol id: stable across processes and versions, sensitive to every field."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from ddim_lab.study.protocol import Protocol, ids_digest

BASE = {"benchmark": "pie-bench", "resolution": 512}
PINNED_ID = "f6b1dd85d1a2"  # Protocol.for_images(["b", "a"], **BASE): changing it invalidates every id


def _protocol(**changes) -> Protocol:
    return dataclasses.replace(Protocol.for_images(["b", "a"], **BASE), **changes)


def test_id_is_pinned_and_short():
    p = _protocol()
    assert p.id() == PINNED_ID and len(p.id()) == 12
    assert p.image_count == 2 and p.image_ids == ids_digest(["a", "b"])


@pytest.mark.parametrize("seed", ["0", "12345"])
def test_id_is_the_same_in_another_process(seed):
    code = (
        "from ddim_lab.study.protocol import Protocol;"
        "print(Protocol.for_images(['b', 'a'], benchmark='pie-bench', resolution=512).id())"
    )
    env = {**os.environ, "PYTHONHASHSEED": seed}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == PINNED_ID


def test_image_subset_is_order_free_but_content_sensitive():
    assert ids_digest(["a", "b"]) == ids_digest(["b", "a", "a"])
    assert ids_digest(["a", "b"]) != ids_digest(["a", "c"])
    assert ids_digest(["ab"]) != ids_digest(["a", "b"])
    assert Protocol.for_images(["x", "y"], **BASE).id() != _protocol().id()


def _other_value(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    return value + "-changed" if value != "score-only" else "input"


@pytest.mark.parametrize("name", Protocol.field_names())
def test_every_field_changes_the_id(name):
    base = _protocol()
    changed = dataclasses.replace(base, **{name: _other_value(getattr(base, name))})
    assert changed.id() != base.id()


def test_fields_for_run_json():
    fields = _protocol(mask_use="input").fields()
    assert fields["protocol"] == _protocol(mask_use="input").id()
    assert set(fields) == {"protocol", *Protocol.field_names()}
    assert fields["mask_use"] == "input" and fields["lpips_net"] == "squeeze"


def test_invalid_fields_are_rejected():
    with pytest.raises(ValueError, match="mask_use"):
        _protocol(mask_use="sometimes")
    with pytest.raises(ValueError, match="resolution"):
        _protocol(resolution=0)
