"""CONTRIBUTING.md's walkthroughs, followed literally in a temporary copy of the lab.

Each walkthrough's code blocks start with a path comment (after Hydra's ``# @package`` line, which must come
first). :class:`Checkout` applies them the way the walkthrough says, without touching the checkout:

- ``# conf/GROUP/NAME.yaml``: written into a copy of the config folder, which the lab composes from
  (``ddim_lab.config.compose.config_dir``, as an installed wheel's ``ddim_lab/conf`` would be);
- ``# ddim_lab/PACKAGE/NAME.py``: written under the tmp dir, whose folder joins the package's ``__path__``, so
  ``ddim_lab.PACKAGE.NAME`` imports it;
- ``# PATH.py: a new line in NAME``: the line evaluated in that module, its entries added to the dict or
  tuple NAME (``schema.SCHEMA``'s lookup ``BY_NAME`` too, which an edited ``schema.py`` derives again);
- ``# tests/FILE.py: a new test``: run in FILE's namespace (a new file: its own), fixtures from this session.

Then each test runs the new piece through the engine on the shipped digits model, its config composed as the
CLI composes it (``tests.conftest.lab_config``), checks its rows (counted evaluations against the cost
formulas, the cache key, the new columns, the drawn table) and runs the walkthrough's test blocks.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import itertools
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from omegaconf import DictConfig, OmegaConf, open_dict
from PIL import Image

from ddim_lab import schema
from ddim_lab.cli import main as cli
from ddim_lab.config import compose as lab_config_module
from ddim_lab.config.validate import validate
from ddim_lab.data.folders import load_dataset
from ddim_lab.errors import ConfigError
from ddim_lab.report.main import collect_results
from ddim_lab.report.main import main as report_main
from ddim_lab.study.records import write_results
from ddim_lab.study.runner import Runner, load_items
from ddim_lab.study.sweep import config_hash
from tests import test_method_coverage
from tests.conftest import DIGITS, lab_config

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "CONTRIBUTING.md"
PATH_COMMENT = re.compile(r"^# (?P<path>[\w./-]+\.(?:py|yaml))(?:: (?P<note>.+))?$")
REGISTRY_LINE = re.compile(r"^a new line in (?P<registry>\w+)$")


@dataclass(frozen=True)
class Block:
    """A fenced code block of the walkthrough whose first line names the file it belongs to."""

    path: str
    note: str | None
    code: str


def section(title: str, doc: Path = DOC) -> str:
    """The text of the walkthrough headed ``## <title>``, up to the next ``## ``."""
    text = doc.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def blocks(text: str) -> list[Block]:
    """The code blocks of ``text`` that start with a path comment, in order."""
    found = []
    for code in re.findall(r"```\w+\n(.*?)```", text, re.S):
        lines = [line for line in code.splitlines() if not line.startswith("# @package")]  # Hydra's, first
        match = PATH_COMMENT.match(lines[0])
        if match:
            found.append(Block(match["path"], match["note"], code))
    return found


def module_name(path: str) -> str:
    """A file's module: ``ddim_lab/methods/inversion/__init__.py`` → ``ddim_lab.methods.inversion``."""
    parts = Path(path).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


class Checkout:
    """A walkthrough's files and registry lines applied in a tmp dir (undone at the test's end)."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
        self.root, self.monkeypatch, self.request = root, monkeypatch, request
        self.conf = root / "conf"
        shutil.copytree(lab_config_module.config_dir(), self.conf)
        monkeypatch.setattr(lab_config_module, "config_dir", lambda: self.conf)

    def follow(self, title: str) -> list[Block]:
        """Apply the walkthrough ``title``: its files and registry lines; returns its test blocks."""
        tests = []
        for block in blocks(section(title)):
            registry = REGISTRY_LINE.match(block.note or "")
            if block.path.startswith("tests/"):
                tests.append(block)
            elif registry:
                self.add_entries(block, registry["registry"])
            elif block.path.startswith("conf/"):
                self.write(self.conf / Path(block.path).relative_to("conf"), block.code)
            else:
                self.add_module(block)
        return tests

    def add_entries(self, block: Block, name: str) -> None:
        """The block's lines, evaluated in their module, added to its dict or tuple ``name``."""
        module = importlib.import_module(module_name(block.path))
        table = getattr(module, name)
        body = block.code.split("\n", 1)[1]
        if isinstance(table, dict):
            for key, value in eval("{" + body + "}", vars(module)).items():
                self.monkeypatch.setitem(table, key, value)
            return
        new = eval("(" + body + ")", vars(module))
        self.monkeypatch.setattr(module, name, (*table, *new))
        if module is schema:  # BY_NAME: the lookup schema.py derives from SCHEMA
            for column in new:
                self.monkeypatch.setitem(schema.BY_NAME, column.name, column)

    def write(self, path: Path, text: str) -> None:
        assert not path.exists(), f"{path}: the walkthrough would overwrite an existing file"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def add_module(self, block: Block) -> None:
        """A new module of an existing package: written under the tmp dir, found through the package."""
        self.write(self.root / block.path, block.code)
        package = importlib.import_module(module_name(str(Path(block.path).parent / "__init__.py")))
        self.monkeypatch.setattr(
            package, "__path__", [*package.__path__, str(self.root / Path(block.path).parent)]
        )
        name = module_name(block.path)
        self.request.addfinalizer(lambda: sys.modules.pop(name, None))
        importlib.invalidate_caches()

    def run_tests(self, tests: list[Block]) -> list[str]:
        """Run each test block's functions in its file's namespace, fixtures from this session; their names."""
        ran = []
        for block in tests:
            exists = (ROOT / block.path).exists()
            namespace = dict(vars(importlib.import_module(module_name(block.path)))) if exists else {}
            before = set(namespace)
            exec(compile(block.code, f"CONTRIBUTING.md ({block.path})", "exec"), namespace)
            for name in sorted(set(namespace) - before):
                if name.startswith("test_"):
                    test = namespace[name]
                    test(
                        **{arg: self.request.getfixturevalue(arg) for arg in inspect.signature(test).parameters}
                    )
                    ran.append(name)
        return ran


@pytest.fixture
def checkout(tmp_path, monkeypatch, request) -> Checkout:
    return Checkout(tmp_path, monkeypatch, request)


def variant(cfg: DictConfig, **changes: Any) -> DictConfig:
    """A copy of a composed config with dotted keys replaced (``inverter={"name": "ddim"}``,
    ``inverter__shrink=0.5``: ``__`` for ``.``), cheaper than composing again."""
    out = copy.deepcopy(cfg)
    with open_dict(out):
        for key, value in changes.items():
            OmegaConf.update(out, key.replace("__", "."), value, merge=False)
    return out


def test_blocks_name_their_files_and_registry_lines():
    text = "```python\n# ddim_lab/x/y.py\nA = 1\n```\n```yaml\nname: z\n```\n"
    text += (
        "```python\n# a/__init__.py: a new line in R\n```\n```yaml\n# @package _global_\n# conf/e/s.yaml\n```"
    )
    found = blocks(text)
    assert [(b.path, b.note) for b in found] == [
        ("ddim_lab/x/y.py", None),
        ("a/__init__.py", "a new line in R"),
        ("conf/e/s.yaml", None),
    ]
    assert module_name("ddim_lab/methods/inversion/__init__.py") == "ddim_lab.methods.inversion"


# -- 1. An inverter --------------------------------------------------------------------------------------------


def test_an_inverter_as_the_walkthrough_adds_it(checkout, digits):
    tests = checkout.follow("1. An inverter")
    cfg = lab_config("inverter=shrunk", "guidance_scale=[1,3]", "start_step=[0,2]", model="digits", steps=4)
    validate(cfg)
    assert OmegaConf.to_container(cfg.inverter) == {"name": "shrunk", "shrink": 0.1}  # its YAML, composed
    with pytest.raises(ConfigError, match="inverter.shrink=1.5"):  # check() runs before any model loads
        validate(variant(cfg, inverter__shrink=1.5))
    # through the engine: rows, counted evaluations = the cost formulas; s = 0 is DDIM, bit for bit
    items = load_dataset(DIGITS, digits.resolution, "")[:2]
    rows = {}
    for name, spec in (("ddim", {"name": "ddim"}), ("shrunk", {"name": "shrunk", "shrink": 0.0})):
        runner = Runner(variant(cfg, inverter=spec), digits)
        rows[name], _ = runner.run_group(items)
        assert runner.denoiser.unet_evals == runner.minimum.forwards > 0
    assert [r["latent_mse"] for r in rows["shrunk"]] == [r["latent_mse"] for r in rows["ddim"]]
    assert {(r["inverter"], r["inverter_knobs"]) for r in rows["shrunk"]} == {("shrunk", '{"shrink": 0.0}')}
    # step 5: the cache key holds the knob and no sampling setting (what the suite's key test checks of every
    # registered method), and the walkthrough's parity test passes
    key = Runner(cfg, digits).inversion_key(items[0])
    for sampling in ({"start_step": [1]}, {"batch_size": 3}, {"task": "edit", "edit_prompt": "a dog"}):
        assert Runner(variant(cfg, **sampling), digits).inversion_key(items[0]) == key, sampling
    assert Runner(variant(cfg, inverter__shrink=0.2), digits).inversion_key(items[0]) != key
    assert checkout.run_tests(tests) == ["test_shrunk_matches_the_notebooks_ddim_loop_then_eq_1"]


# -- 2. An editor ----------------------------------------------------------------------------------------------


def test_an_editor_as_the_walkthrough_adds_it(checkout, digits):
    tests = checkout.follow("2. An editor")
    edit = [
        "task=edit",
        "edit_prompt=[null,a handwritten digit eight]",
        "guidance_scale=[1,3]",
        "start_step=[2]",
    ]
    cfg = lab_config("editor=boosted_swap", *edit, model="digits", steps=4)
    validate(cfg)
    with pytest.raises(ConfigError, match="editor.boost=-1"):
        validate(variant(cfg, editor__boost=-1))
    item = load_dataset(DIGITS, digits.resolution, "")[:1]
    rows = {}
    for boost in (None, 1.0, 1.5):  # None: prompt_swap
        spec = {"name": "prompt_swap"} if boost is None else {"name": "boosted_swap", "boost": boost}
        rows[boost], _ = Runner(variant(cfg, editor=spec), digits).run_group(item)
    swap, one, boosted = rows.values()
    assert [r["latent_mse"] for r in one] == [r["latent_mse"] for r in swap]  # boost 1 is prompt swap
    for a, b in zip(boosted, swap, strict=True):
        assert (a["latent_mse"] == b["latent_mse"]) == (a["edit_prompt"] == "")  # only edits change
    # points (recon, edit) × guidance (1, 3): an edit at guidance 1 boosted to 1.5 pays two rows a step
    assert [r["unet_evals"] for r in swap] == [2, 4, 2, 4]
    assert [r["unet_evals"] for r in boosted] == [2, 4, 4, 4]
    # the suite's cost-formula and cache-key test runs over every registered editor; its parity test passes
    test_method_coverage.test_every_editor_spends_its_formula_and_stays_out_of_the_key(digits, "boosted_swap")
    assert checkout.run_tests(tests) == ["test_boosted_swap_is_the_notebooks_ddim_edit_at_boosted_guidance"]


# -- 3. A data set with a scorer -------------------------------------------------------------------------------


def test_a_data_set_with_a_scorer_as_the_walkthrough_adds_it(checkout, digits):
    tests = checkout.follow("3. A data set with a scorer")
    edit = [
        "task=edit",
        "edit_prompt=[null,a handwritten digit eight]",
        "guidance_scale=[1,4]",
        "start_step=[0]",
    ]
    cfg = lab_config("data=ink-digits", *edit, model="digits", steps=4)
    validate(cfg)
    with pytest.raises(ConfigError, match="unknown scorer 'ink'"):  # a wrong name stops before any model loads
        validate(variant(cfg, data__scorers=["ink"]))
    runner = Runner(cfg, digits)
    items = load_items(cfg, digits.resolution)[:3]
    rows, columns = runner.run_group(items)
    scores = {(r["edit_prompt"], r["guidance_scale"]): [] for r in rows}
    for r in rows:
        assert 0 <= r["ink_iou"] <= 1
        scores[r["edit_prompt"], r["guidance_scale"]].append(r["ink_iou"])
    mean = {k: sum(v) / len(v) for k, v in scores.items()}
    recon, edit8 = mean["", 1.0], mean["a handwritten digit eight", 4.0]
    assert recon > 0.8 and edit8 < recon  # a reconstruction keeps its stroke, an edit to 8 at guidance 4 less
    frame = write_results(rows, checkout.root / "run")  # the row schema takes the declared column
    assert frame["ink_iou"].dtype == "float64"
    assert checkout.run_tests(tests) == ["test_ink_iou_counts_the_shared_stroke"]


# -- 4. A study figure -----------------------------------------------------------------------------------------


def test_a_study_figure_as_the_walkthrough_adds_it(checkout, digits, tmp_path):
    checkout.follow("4. A study figure")
    data = tmp_path / "digits"  # two held-out digits: `data.path=...` on the command line
    data.mkdir()
    names = ["digit3_0.png", "digit7_0.png"]
    for name in names:
        shutil.copy(DIGITS / name, data / name)
    (data / "captions.csv").write_text("image,prompt\n" + "".join(f"{n},{c}\n" for n, c in caption_rows(names)))
    # the sweep the preset declares, its num_steps replaced as `num_steps=4,8` on the command line would
    params = OmegaConf.load(checkout.conf / "experiment" / "course_vs_ddim.yaml").hydra.sweeper.params
    sweep = tmp_path / "sweep"
    for job, (inverter, steps) in enumerate(itertools.product(str(params.inverter).split(","), (4, 8))):
        if steps == 4:  # one composition per method; the step count set as the command line would
            composed = lab_config("+experiment=course_vs_ddim", f"inverter={inverter}", f"data.path='{data}'")
        cfg = variant(composed, num_steps=steps)
        validate(cfg)
        run_dir = sweep / str(job)
        run_dir.mkdir(parents=True)
        cli.work(cli.Prepared(run_dir, config_hash(cfg), digits), cfg)  # what each job of the sweep runs
    with pytest.raises(ConfigError, match="xscale"):  # a section that cannot be drawn: before any model loads
        validate(variant(cfg, **{"report.figures[0].xscale": "cubic"}))
    assert report_main([str(sweep), "--resamples", "200"]) == 0
    rows = collect_results(sweep)
    table = (sweep / "course_vs_ddim.md").read_text()
    for (steps, inverter), part in rows.groupby(["num_steps", "inverter"]):
        line = next(t for t in table.splitlines() if t.startswith(f"| {steps} | {inverter} |"))
        assert f"| {part['psnr'].mean():.2f} [" in line and line.endswith(f"| {len(part)} |"), line
    with Image.open(sweep / "figures" / "course_vs_ddim.png") as figure:
        assert figure.width > 200 and figure.height > 100


def caption_rows(names: list[str]) -> list[tuple[str, str]]:
    """Each copied digit's caption, as the held-out folder's captions.csv has it."""
    captions = dict(row.split(",", 1) for row in (DIGITS / "captions.csv").read_text().splitlines()[1:])
    return [(n, captions[n]) for n in names]
