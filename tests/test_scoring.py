"""Data sets bring their own scorers (``data.scorers``, ddim_lab/data/scoring.py): a scorer from outside the lab
adds its column to the rows through a data YAML alone; a wrong scorer is one line before any model loads."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from ddim_lab.cli import main as cli
from ddim_lab.config.compose import config_dir, group_options
from ddim_lab.config.validate import validate
from ddim_lab.data import digits
from ddim_lab.data.scoring import SCORERS, ScoreBatch, Scorer, scorer_class
from ddim_lab.errors import ConfigError
from ddim_lab.models import loading
from ddim_lab.study.runner import Runner, load_items
from ddim_lab.study.tasks import generation_scores
from tests.conftest import lab_config


class ToyScorer(Scorer):
    """A toy data set's own success measure: the fraction of each result's pixels brighter than its input's."""

    name = "toy_brighter"
    columns = ("edit_success",)

    def score(self, batch: ScoreBatch) -> dict[str, list[float]]:
        if batch.generated:
            return {}
        brighter = batch.results.cpu() > batch.sources.cpu()  # (B, 3, R, R)
        return {"edit_success": brighter.flatten(1).float().mean(dim=1).tolist()}


class Undeclared(ToyScorer):
    columns = ("brightness",)


class CoreColumn(ToyScorer):
    columns = ("psnr",)


class NotAScorer:
    name = "plain"
    columns = ("edit_success",)


TOY = "tests.test_scoring:ToyScorer"


def toy_data(tmp_path, scorers: list[str]) -> list[str]:
    """Overrides that select data=toy: a data YAML under ``tmp_path`` (on Hydra's search path) that lists
    ``scorers`` for the held-out digits."""
    folder = tmp_path / "conf" / "data"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "toy.yaml").write_text(
        f"path: ${{asset:digits-heldout}}\ncaptions: true\nscorers: {json.dumps(scorers)}\n"
    )
    return [f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "data=toy"]


def test_a_scorer_of_a_test_module_adds_its_column_through_a_data_yaml(digits, tmp_path):
    overrides = ["task=edit", "edit_prompt=a handwritten digit eight", "guidance_scale=[1,3]", "batch_size=4"]
    cfg = lab_config(*toy_data(tmp_path, [TOY]), *overrides, model="digits", steps=4)
    validate(cfg)
    runner = Runner(cfg, digits)
    items = load_items(cfg, digits.resolution)[:2]
    rows, columns = runner.run_group(items)
    labels = [p.label for p in runner.points]
    # row r = image i at grid point j (image-major): the toy's measure of that result against that input
    expected = [
        (columns[label][i] > columns["input"][i]).float().mean().item()
        for i in range(len(items))
        for label in labels
    ]
    assert [r["edit_success"] for r in rows] == pytest.approx(expected)
    assert len(set(expected)) > 1  # the rows differ, so a misaligned row would show
    plain = lab_config(*toy_data(tmp_path, []), *overrides, model="digits", steps=4)
    assert all("edit_success" not in r for r in Runner(plain, digits).run_group(items)[0])


def test_generation_rows_take_the_data_sets_scorers():
    scans, labels = digits.split()["held_out"]
    images = digits.to_rgb(scans[:6], 16)
    prompts = [digits.caption(int(k)) for k in labels[:6]]
    judged = generation_scores(lab_config(model="digits"), images, prompts)
    assert set(judged) == {"judge_agreement"}  # data=digits lists the digit judge
    assert generation_scores(lab_config("data.scorers=[]", model="digits"), images, prompts) == {}


@pytest.mark.parametrize(
    ("scorers", "message"),
    [
        ("[no_such_scorer]", "data.scorers: unknown scorer 'no_such_scorer': choose one of pie_masked"),
        (
            "[no_such_module:Scorer]",
            "scorer 'no_such_module:Scorer': cannot import 'no_such_module'",
        ),
        ("[tests.test_scoring:Missing]", "'tests.test_scoring' has no 'Missing'"),
        ("[tests.test_scoring:NotAScorer]", "is not a ddim_lab.data.scoring.Scorer with a name and columns"),
        (
            "[tests.test_scoring:Undeclared]",
            "undeclared columns ['brightness']: declare them in schema.py",
        ),
        ("[tests.test_scoring:CoreColumn]", "writes the core columns ['psnr']"),
        (f"[digit_edit_success,'{TOY}']", f"'digit_edit_success' and '{TOY}' both write 'edit_success'"),
    ],
)
def test_a_wrong_scorer_is_one_line_before_any_model_loads(scorers, message, monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the check")

    monkeypatch.setattr(loading, "load_model", refuse)
    cfg = lab_config(f"data.scorers={scorers}", model="digits")
    with pytest.raises(ConfigError) as err:
        cli.prepare(cfg, tmp_path / "run")
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


def test_every_shipped_data_config_names_registered_scorers():
    for option in group_options("data"):
        scorers = OmegaConf.load(config_dir() / "data" / f"{option}.yaml").get("scorers", [])
        assert all(s in SCORERS for s in scorers), option
    assert {name: scorer_class(name).name for name in SCORERS} == {name: name for name in SCORERS}


def test_a_scorer_writing_a_column_it_does_not_name_is_refused():
    from ddim_lab.data.scoring import ScoringContext, score_rows

    class Stray(ToyScorer):
        def score(self, batch: ScoreBatch) -> dict[str, list[float]]:
            return {"judge_agreement": [1.0] * len(batch.results)}

    batch = ScoreBatch(torch.zeros(2, 3, 4, 4), ["", ""], sources=torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="wrote \\['judge_agreement'\\], which its columns do not name"):
        score_rows([Stray(ScoringContext())], batch)
