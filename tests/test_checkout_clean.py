"""Tests never write into the checkout: configs composed for tests put the cache (and the models built into
it) under pytest's tmp dir, and the session fails when a watched path of the checkout gained entries
(``tests/conftest.py``: ``checkout_entries`` at the start, ``written_into`` at the end)."""

from __future__ import annotations

from pathlib import Path

from ddim_lab.config.compose import compose_config
from tests.conftest import ROOT, checkout_entries, lab_config, written_into


def test_configs_without_a_cache_keep_built_models_under_the_session_tmp_dir(cache_dir, tmp_path_factory):
    assert cache_dir.is_relative_to(tmp_path_factory.getbasetemp()) and not cache_dir.is_relative_to(ROOT)
    assert Path(lab_config().cache.dir) == cache_dir  # the cache is off; built models still need a place
    assert Path(lab_config(cache=cache_dir / "own").cache.dir) == cache_dir / "own"
    assert Path(compose_config(["model=tiny"]).cache.dir) == cache_dir  # the default reads DDIM_LAB_CACHE


def test_the_guard_names_what_appeared_in_watched_paths(tmp_path):
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / ".gitkeep").touch()
    before = checkout_entries(tmp_path)
    assert before["outputs"] == {".gitkeep"} and before["unused"] is None
    (tmp_path / "outputs" / "2026-12-03").mkdir()
    (tmp_path / "unused" / "models").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()  # other paths are other people's business
    assert written_into(before, checkout_entries(tmp_path)) == ["outputs/2026-12-03", "unused/"]
    assert written_into(before, before) == []
