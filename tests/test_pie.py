"""PIE-Bench data: RLE masks (border rule), brackets, categories, bad entries skipped by id, digits-pie."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from ddim_lab.config.compose import register_resolvers
from ddim_lab.data import digits
from ddim_lab.data.digits_pie import build, edit_success, target_digit
from ddim_lab.data.folders import DataError, load_dataset
from ddim_lab.data.pie import (
    EDITING_TYPES,
    MalformedEntry,
    PieItem,
    decode_mask,
    encode_mask,
    is_pie_dir,
    load_pie,
    load_pie_checked,
    resize_mask,
    strip_brackets,
)
from tests.conftest import ROOT

DIGITS_PIE = ROOT / "ddim_lab" / "assets" / "digits-pie"


def test_decode_mask_hand_made_without_and_with_border():
    runs = [6, 3, 13, 1]  # 5 × 5: row 1 cols 1–3, row 2 col 3
    expected = np.zeros((5, 5), dtype=np.uint8)
    expected[1, 1:4] = 1
    expected[2, 3] = 1
    assert np.array_equal(decode_mask(runs, (5, 5), border=False), expected)
    bordered = expected.copy()
    bordered[0, :] = bordered[-1, :] = bordered[:, 0] = bordered[:, -1] = 1
    assert np.array_equal(decode_mask(runs, (5, 5)), bordered)
    # the border rule alone: an empty encoding still marks the 16 border pixels
    assert decode_mask([], (5, 5)).sum() == 16


def test_decode_mask_is_row_major_on_non_square_masks():
    mask = decode_mask([4, 2], (3, 4), border=False)  # index 4, 5 = row 1, cols 0 and 1
    assert mask.tolist() == [[0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]]


def test_decode_mask_clips_overshooting_runs_and_rejects_bad_ones():
    assert decode_mask([7, 100], (3, 3), border=False).reshape(-1).tolist() == [0] * 7 + [1, 1]
    with pytest.raises(MalformedEntry, match="odd number"):
        decode_mask([1, 2, 3], (3, 3))
    with pytest.raises(MalformedEntry, match="outside"):
        decode_mask([9, 1], (3, 3))
    with pytest.raises(MalformedEntry, match="outside"):
        decode_mask([0, -1], (3, 3))
    with pytest.raises(MalformedEntry, match="integers"):
        decode_mask([0.5, 1], (3, 3))


def test_encode_mask_round_trips():
    rng = np.random.default_rng(0)
    mask = (rng.random((7, 9)) > 0.6).astype(np.uint8)
    mask[0, 0] = mask[-1, -1] = 1  # runs touching both ends
    assert np.array_equal(decode_mask(encode_mask(mask), (7, 9), border=False), mask)
    assert encode_mask(np.zeros((3, 3))) == []


def test_strip_brackets():
    assert strip_brackets("a [cat] sitting on [the] mat") == "a cat sitting on the mat"
    assert strip_brackets("no markers") == "no markers"
    assert strip_brackets("[[x]]") == "x"


def _entry(image_path: str, kind: str = "1", **extra) -> dict:
    return {
        "image_path": image_path,
        "original_prompt": "a [cat] on grass",
        "editing_prompt": "a [dog] on grass",
        "editing_instruction": "make the cat a dog",
        "editing_type_id": kind,
        "blended_word": "cat dog",
        "mask": [0, 0],
        **extra,
    }


def _write_bench(root, entries: dict, images: dict[str, np.ndarray]) -> None:
    for rel, pixels in images.items():
        file = root / "annotation_images" / rel
        file.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(file)
    (root / "mapping_file.json").write_text(json.dumps(entries))


def test_load_pie_fields_and_mask_alignment(tmp_path):
    # a 12 × 8 (H × W) image whose white pixels are exactly the (bordered) mask
    mask = np.zeros((12, 8), dtype=np.uint8)
    mask[3:7, 2:5] = 1
    bordered = decode_mask(encode_mask(mask), (12, 8))
    pixels = np.repeat(bordered[..., None] * 255, 3, axis=2).astype(np.uint8)
    _write_bench(tmp_path, {"000": _entry("1_x/a.png", mask=encode_mask(mask))}, {"1_x/a.png": pixels})
    assert is_pie_dir(tmp_path) and not is_pie_dir(tmp_path / "annotation_images")
    (item,) = load_pie(tmp_path, 8)
    assert isinstance(item, PieItem)
    assert (item.name, item.prompt, item.target_prompt) == ("000", "a cat on grass", "a dog on grass")
    assert item.blended_words == ("cat", "dog") and item.editing_type == "1"
    assert item.instruction == "make the cat a dog" and item.mask_shape == (12, 8)
    assert item.mask.shape == (1, 8, 8) and item.image.shape == (3, 8, 8)
    # same resize + centre crop: the mask lands where the image's white pixels land
    assert torch.equal(item.mask[0], (item.image[0] >= 0.5).float())
    assert torch.equal(item.mask, resize_mask(bordered, 8))
    # the image follows data.py's policy: same pixels and hash as the folder loader
    (plain,) = load_dataset(tmp_path / "annotation_images" / "1_x" / "a.png", 8, "")
    assert plain.content_hash == item.content_hash and torch.equal(plain.image, item.image)


def test_mask_follows_the_exif_orientation_of_its_image(tmp_path):
    mask = np.zeros((6, 10), dtype=np.uint8)  # stored 10 wide × 6 high, shown rotated to 6 × 10
    mask[1:3, 2:8] = 1
    bordered = decode_mask(encode_mask(mask), (6, 10))
    pixels = np.repeat(bordered[..., None] * 255, 3, axis=2).astype(np.uint8)
    _write_bench(tmp_path, {"r": _entry("r.png", mask=encode_mask(mask))}, {})
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    (tmp_path / "annotation_images").mkdir()
    Image.fromarray(pixels).save(tmp_path / "annotation_images" / "r.png", exif=exif)
    (item,) = load_pie(tmp_path, 6)
    assert item.mask_shape == (6, 10)
    assert torch.equal(item.mask[0], (item.image[0] >= 0.5).float())


def test_mask_shape_from_the_entry_and_empty_blended_word(tmp_path):
    pixels = np.zeros((10, 10, 3), dtype=np.uint8)
    entry = _entry("a.png", blended_word="", mask=[0, 4], mask_shape=[4, 4])
    _write_bench(tmp_path, {"id": entry}, {"a.png": pixels})
    (item,) = load_pie(tmp_path, 4)
    assert item.mask_shape == (4, 4) and item.blended_words is None
    assert item.mask.sum() == 12  # 4 × 4 mask: the border's 12 pixels (the run is the top row)


def test_categories_select_editing_types(tmp_path):
    pixels = np.zeros((8, 8, 3), dtype=np.uint8)
    entries = {f"e{k}": _entry("a.png", kind=k) for k in ("0", "1", "9")}
    _write_bench(tmp_path, entries, {"a.png": pixels})
    assert [it.name for it in load_pie(tmp_path, 8)] == ["e0", "e1", "e9"]
    assert [it.name for it in load_pie(tmp_path, 8, categories=[1, "9"])] == ["e1", "e9"]
    with pytest.raises(DataError, match="no usable PIE-Bench entries of editing type"):
        load_pie(tmp_path, 8, categories=["5"])
    with pytest.raises(DataError, match="unknown PIE-Bench editing type"):
        load_pie(tmp_path, 8, categories=["10"])
    assert set(EDITING_TYPES) == {str(i) for i in range(10)}


def test_malformed_entries_are_skipped_and_named(tmp_path, caplog):
    pixels = np.zeros((8, 8, 3), dtype=np.uint8)
    broken = _entry("a.png")
    del broken["editing_prompt"]
    entries = {
        "good": _entry("a.png"),
        "no_prompt": broken,
        "bad_mask": _entry("a.png", mask=[1, 2, 3]),
        "no_image": _entry("missing.png"),
        "bad_type": _entry("a.png", kind="12"),
        "bad_words": _entry("a.png", blended_word="one two three"),
        "not_object": [1, 2],
    }
    _write_bench(tmp_path, entries, {"a.png": pixels})
    (tmp_path / "annotation_images" / "junk.png").write_bytes(b"not a png")
    entries["junk"] = _entry("junk.png")
    (tmp_path / "mapping_file.json").write_text(json.dumps(entries))
    with caplog.at_level(logging.WARNING, logger="ddim_lab.data.pie"):
        items = load_pie(tmp_path, 8)
    assert [it.name for it in items] == ["good"]
    for image_id, why in [
        ("no_prompt", "missing field"),
        ("bad_mask", "odd number"),
        ("no_image", "not found"),
        ("bad_type", "editing_type_id"),
        ("bad_words", "blended_word"),
        ("not_object", "not an object"),
        ("junk", "cannot read"),
    ]:
        assert any(f"entry {image_id} skipped" in m and why in m for m in caplog.messages), image_id
    assert "7 PIE-Bench entries skipped" in caplog.text
    kept, skipped = load_pie_checked(tmp_path, 8)
    assert [it.name for it in kept] == ["good"] and len(skipped) == 7 and "odd number" in skipped["bad_mask"]


def test_not_a_pie_folder(tmp_path):
    with pytest.raises(DataError, match="mapping_file.json"):
        load_pie(tmp_path, 8)
    with pytest.raises(FileNotFoundError):
        load_pie(tmp_path / "nope", 8)
    (tmp_path / "mapping_file.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="keyed by image id"):
        load_pie(tmp_path, 8)


def test_digits_mini_benchmark_loads_end_to_end_offline():
    items = load_pie(DIGITS_PIE, 16)
    assert len(items) == 20 and all(it.image.shape == (3, 16, 16) for it in items)
    assert len(load_pie(DIGITS_PIE, 16, categories=[1])) == 10
    first = items[0]
    assert first.prompt == "a handwritten digit zero" and first.target_prompt == "a handwritten digit eight"
    assert first.blended_words == ("zero", "eight") and first.mask_shape == (64, 64)
    coverage = torch.stack([it.mask.mean() for it in items])
    assert bool(((coverage > 0.4) & (coverage < 0.9)).all())  # around the digit, background left unedited
    sources = [digits.NAMES.index(it.blended_words[0]) for it in items]
    targets = [target_digit(it) for it in items]
    images = torch.stack([it.image for it in items])
    assert np.mean(edit_success(images, sources)) >= 0.85  # the judge reads the unedited digits
    assert np.mean(edit_success(images, targets)) == 0.0  # … and they are not yet the targets
    assert np.isnan(edit_success(images[:1], [None])).all()


def test_digits_mini_benchmark_is_what_the_script_builds(tmp_path):
    build(tmp_path)
    shipped = json.loads((DIGITS_PIE / "mapping_file.json").read_text())
    assert json.loads((tmp_path / "mapping_file.json").read_text()) == shipped
    for entry in shipped.values():
        rebuilt = np.asarray(Image.open(tmp_path / "annotation_images" / entry["image_path"]))
        assert np.array_equal(
            rebuilt, np.asarray(Image.open(DIGITS_PIE / "annotation_images" / entry["image_path"]))
        )


def test_digits_pie_config_points_at_the_asset():
    from omegaconf import OmegaConf

    register_resolvers()
    cfg = OmegaConf.load(ROOT / "conf" / "data" / "digits-pie.yaml")
    assert is_pie_dir(OmegaConf.to_container(cfg, resolve=True)["path"])
