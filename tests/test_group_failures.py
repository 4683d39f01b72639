"""A failing image group costs only itself: its error is recorded, the other groups' rows are saved, and a
rerun computes only what failed."""

from __future__ import annotations

import json

import pytest

from ddim_lab.config.compose import compose_config
from ddim_lab.study.loggers import LocalLogger
from ddim_lab.study.runner import GroupsFailed, NonFiniteResult, Runner, reconstruct_or_edit


def test_a_failed_group_is_recorded_and_a_rerun_finishes_only_it(digits, tmp_path, monkeypatch):
    cfg = compose_config(
        ["num_steps=4", "batch_size=2", "metrics.lpips=off", "runtime.progress=false", "cache.enabled=false"]
    )  # 20 digits, 2 per group: 10 groups
    original = Runner.run_group

    def flaky(self, items, first_index=0):
        if first_index == 4:
            raise NonFiniteResult("sampling gave NaN/inf latents for digit2_0.png")
        return original(self, items, first_index)

    monkeypatch.setattr(Runner, "run_group", flaky)
    with pytest.raises(GroupsFailed, match="1 of 10 image group"), LocalLogger() as logger:
        reconstruct_or_edit(cfg, digits, tmp_path, logger)
    errors = [json.loads(line) for line in (tmp_path / "group_errors.jsonl").read_text().splitlines()]
    assert [(e["group"], e["type"]) for e in errors] == [(2, "NonFiniteResult")]
    assert json.loads((tmp_path / "run.json").read_text())["failed_groups"] == 1

    monkeypatch.setattr(Runner, "run_group", original)
    calls = []
    monkeypatch.setattr(
        Runner, "run_group", lambda self, items, first=0: calls.append(first) or original(self, items, first)
    )
    with LocalLogger() as logger:
        table = reconstruct_or_edit(cfg, digits, tmp_path, logger)
    assert calls == [4]  # only the failed group is computed again
    assert len(table) == 20 and table["image"].is_unique
