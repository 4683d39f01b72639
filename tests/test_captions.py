"""Captions: a folder without any says once which prompt its images get; data.captions=false ignores them."""

from __future__ import annotations

import logging

from PIL import Image

from ddim_lab.data.folders import load_dataset, with_prompt
from ddim_lab.study.runner import load_items
from tests.conftest import DIGITS, lab_config


def _folder(path, names=("a.png", "b.png", "c.png")):
    for n, name in enumerate(names):
        Image.new("RGB", (8, 8), (40 * n, 0, 0)).save(path / name)
    return path


def _messages(caplog, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level and r.name == "ddim_lab.data.folders"]


def test_a_folder_without_captions_warns_once_that_every_image_gets_the_empty_prompt(tmp_path, caplog):
    _folder(tmp_path)
    with caplog.at_level(logging.INFO, logger="ddim_lab.data.folders"):
        items = load_dataset(tmp_path, 8, "")
    (warning,) = _messages(caplog, logging.WARNING)
    assert f"data.path={tmp_path} has no captions" in warning
    assert "using prompt='' for all 3 images" in warning
    assert [it.prompt for it in items] == ["", "", ""]


def test_a_chosen_prompt_for_an_uncaptioned_folder_is_said_once_without_a_warning(tmp_path, caplog):
    _folder(tmp_path, ("a.png", "b.png"))
    with caplog.at_level(logging.INFO, logger="ddim_lab.data.folders"):
        load_dataset(tmp_path, 8, "a photo")
    assert not _messages(caplog, logging.WARNING)
    said = [m for m in _messages(caplog, logging.INFO) if "has no captions" in m]
    assert len(said) == 1 and "using prompt='a photo' for all 2 images" in said[0]


def test_a_captioned_folder_does_not_say_it_has_no_captions(caplog):
    with caplog.at_level(logging.INFO, logger="ddim_lab.data.folders"):
        items = load_dataset(DIGITS, 8, "")
    said = _messages(caplog, logging.WARNING) + _messages(caplog, logging.INFO)
    assert not any("has no captions" in m for m in said)
    assert all(it.prompt.startswith("a handwritten digit") for it in items)


def test_captions_false_ignores_the_caption_file_and_says_so(caplog):
    with caplog.at_level(logging.INFO, logger="ddim_lab.data.folders"):
        items = load_dataset(DIGITS, 8, "", captions=False)
    assert {it.prompt for it in items} == {""}
    said = [m for m in _messages(caplog, logging.INFO) if "data.captions=false" in m]
    assert len(said) == 1 and f"for all {len(items)} images" in said[0]
    captioned = load_dataset(DIGITS, 8, "")
    assert [it.content_hash for it in items] == [it.content_hash for it in captioned]  # same images


def test_data_captions_false_replaces_pie_source_prompts_but_keeps_their_targets():
    captioned = load_items(lab_config("data=digits-pie", "data.categories=[1]"), 16)
    plain = load_items(lab_config("data=digits-pie", "data.categories=[1]", "data.captions=false"), 16)
    assert {it.prompt for it in plain} == {""} and {it.prompt for it in captioned} != {""}
    assert [it.target_prompt for it in plain] == [it.target_prompt for it in captioned]
    assert [it.mask.sum() for it in plain] == [it.mask.sum() for it in captioned]


def test_with_prompt_leaves_the_items_it_is_given_unchanged():
    items = load_dataset(DIGITS, 8, "")[:2]
    out = with_prompt(items, "a digit", DIGITS)
    assert [it.prompt for it in out] == ["a digit", "a digit"]
    assert [it.prompt for it in items] != ["a digit", "a digit"]
