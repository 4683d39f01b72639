"""Tests for ddim_lab.data.folders: the preprocessing policy, captions, error handling and the bundled
assets."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ddim_lab
from ddim_lab.data import digits
from ddim_lab.data.folders import IMAGE_SUFFIXES, export_digits, load_dataset, load_image

ASSETS = Path(ddim_lab.__file__).parent / "assets"
WHITE = (255, 255, 255)
RED, BLUE = (255, 0, 0), (0, 0, 255)


def rgb_at(image: torch.Tensor, row: int, col: int) -> tuple[float, ...]:
    """Pixel of a (3, R, R) [0, 1] tensor on the 0–255 scale."""
    return tuple((image[:, row, col] * 255).tolist())


def assert_colour(image: torch.Tensor, row: int, col: int, expected: tuple[int, int, int], tol: float = 1.0):
    got = rgb_at(image, row, col)
    assert np.allclose(got, expected, atol=tol), f"pixel ({row}, {col}) is {got}, expected {expected}"


def check_tensor(image: torch.Tensor, resolution: int) -> None:
    assert image.shape == (3, resolution, resolution)
    assert image.dtype == torch.float32
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0


def two_halves(mode: str, left, right, size: tuple[int, int] = (32, 32)) -> Image.Image:
    """An image whose left half has colour ``left`` and right half ``right``."""
    img = Image.new(mode, size, left)
    img.paste(Image.new(mode, (size[0] // 2, size[1]), right), (size[0] // 2, 0))
    return img


def test_rgb_png(tmp_path):
    path = tmp_path / "rgb.png"
    Image.new("RGB", (24, 24), (10, 200, 30)).save(path)
    image = load_image(path, 8)
    check_tensor(image, 8)
    assert torch.allclose(image, torch.tensor([10, 200, 30]).view(3, 1, 1) / 255.0, atol=1e-6)


def test_rgba_transparency_is_composited_over_white(tmp_path):
    path = tmp_path / "rgba.png"
    two_halves("RGBA", (0, 0, 255, 255), (255, 0, 0, 0)).save(path)
    image = load_image(path, 16)
    check_tensor(image, 16)
    assert_colour(image, 8, 0, BLUE)
    assert_colour(image, 8, 15, WHITE)  # transparent red is not red


def test_rgba_half_alpha_blends_with_white(tmp_path):
    path = tmp_path / "half.png"
    Image.new("RGBA", (16, 16), (0, 0, 0, 128)).save(path)
    image = load_image(path, 16)
    expected = round(255 * (1 - 128 / 255))
    assert_colour(image, 5, 5, (expected,) * 3)


def test_grayscale_is_replicated(tmp_path):
    path = tmp_path / "gray.png"
    Image.new("L", (20, 20), 77).save(path)
    image = load_image(path, 10)
    check_tensor(image, 10)
    assert_colour(image, 3, 7, (77, 77, 77))


def test_la_transparency(tmp_path):
    path = tmp_path / "la.png"
    two_halves("LA", (50, 255), (0, 0)).save(path)
    image = load_image(path, 32)
    assert_colour(image, 0, 0, (50, 50, 50))
    assert_colour(image, 31, 31, WHITE)


def palette_image() -> Image.Image:
    img = Image.new("P", (32, 32), 1)
    img.putpalette([0, 0, 0, 200, 100, 0] + [0] * (254 * 3))
    img.paste(0, (16, 0, 32, 32))
    return img


def test_palette_without_transparency(tmp_path):
    path = tmp_path / "p.png"
    palette_image().save(path)
    image = load_image(path, 32)
    assert_colour(image, 4, 4, (200, 100, 0))
    assert_colour(image, 4, 28, (0, 0, 0))


@pytest.mark.parametrize("suffix", [".png", ".gif"])
def test_palette_with_transparency(tmp_path, suffix):
    path = tmp_path / f"pt{suffix}"
    palette_image().save(path, transparency=0)
    with Image.open(path) as img:
        assert img.mode == "P" and "transparency" in img.info
    image = load_image(path, 32)
    assert_colour(image, 4, 4, (200, 100, 0))
    assert_colour(image, 4, 28, WHITE)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_grayscale_scaled_by_full_range(tmp_path, suffix):
    path = tmp_path / f"g16{suffix}"
    values = np.full((16, 16), 257 * 100, dtype=np.uint16)
    values[:, 8:] = 257 * 200
    Image.fromarray(values).save(path)
    with Image.open(path) as img:
        assert img.mode.startswith("I;16")
    image = load_image(path, 16)
    check_tensor(image, 16)
    assert_colour(image, 0, 0, (100, 100, 100), tol=1e-3)
    assert_colour(image, 0, 15, (200, 200, 200), tol=1e-3)


def test_32_bit_integer_is_treated_as_16_bit(tmp_path):
    path = tmp_path / "i32.tif"
    Image.fromarray(np.full((16, 16), 257 * 40, dtype=np.int32)).save(path)
    with Image.open(path) as img:
        assert img.mode == "I"
    assert_colour(load_image(path, 16), 3, 3, (40, 40, 40), tol=1e-3)


@pytest.mark.parametrize(("suffix", "tol"), [(".tif", 1.0), (".jpg", 12.0)])
def test_cmyk(tmp_path, suffix, tol):
    path = tmp_path / f"cmyk{suffix}"
    two_halves("CMYK", (0, 255, 255, 0), (255, 255, 0, 0)).save(path)
    with Image.open(path) as img:
        assert img.mode == "CMYK"
    image = load_image(path, 32)
    assert_colour(image, 16, 2, RED, tol=tol)
    assert_colour(image, 16, 29, BLUE, tol=tol)


def test_exif_orientation_is_applied(tmp_path):
    # Stored 60 wide × 30 tall, red top half and blue bottom half. Orientation 6 means "rotate 90° clockwise
    # to display", so a viewer shows 30 × 60 with red on the right and blue on the left.
    stored = Image.new("RGB", (60, 30), BLUE)
    stored.paste(Image.new("RGB", (60, 15), RED), (0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    stored.save(path, quality=95, exif=exif)
    image = load_image(path, 30)
    check_tensor(image, 30)
    assert_colour(image, 15, 2, BLUE, tol=20)
    assert_colour(image, 15, 27, RED, tol=20)
    assert_colour(image, 2, 15 - 4, BLUE, tol=20)  # top row: blue on the left, red on the right
    assert_colour(image, 2, 15 + 4, RED, tol=20)


def test_non_square_is_centre_cropped(tmp_path):
    # 80 × 40: green | red | red | blue quarters; at R = 40 the crop keeps exactly the red middle half.
    img = Image.new("RGB", (80, 40), (0, 255, 0))
    img.paste(Image.new("RGB", (40, 40), RED), (20, 0))
    img.paste(Image.new("RGB", (20, 40), BLUE), (60, 0))
    path = tmp_path / "wide.png"
    img.save(path)
    image = load_image(path, 40)
    assert torch.allclose(image, torch.tensor(RED).view(3, 1, 1) / 255.0, atol=1e-6)
    tall = tmp_path / "tall.png"
    img.transpose(Image.Transpose.ROTATE_90).save(tall)
    image = load_image(tall, 20)  # resized to 20 × 40 first, then cropped; away from the edges it is red
    check_tensor(image, 20)
    assert_colour(image, 10, 10, RED, tol=2)


def test_resize_uses_shorter_side(tmp_path):
    # A horizontal gradient: after resizing 64 × 32 to 32 × 16, the 16 × 16 crop spans the middle half.
    ramp = np.tile(np.linspace(0, 255, 64).round().astype(np.uint8), (32, 1))
    path = tmp_path / "ramp.png"
    Image.fromarray(ramp).save(path)
    image = load_image(path, 16)
    row = image[0, 8] * 255
    assert 55 < float(row[0]) < 75 and 180 < float(row[-1]) < 200
    assert bool((row[1:] >= row[:-1] - 1).all())


def make_folder(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (16, 16), RED).save(root / "a.png")
    Image.new("RGB", (16, 16), BLUE).save(root / "sub" / "b.JPG")
    Image.new("L", (16, 16), 128).save(root / "c.bmp")
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    Image.new("RGB", (16, 16)).save(root / ".hidden" / "skip.png")


def write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "prompt"])
        writer.writerows(rows)


def test_folder_with_csv_captions(tmp_path):
    make_folder(tmp_path)
    write_csv(tmp_path / "captions.csv", [("a.png", "a red square"), ("sub/b.JPG", "a blue, square thing")])
    items = load_dataset(tmp_path, 8, "default prompt")
    assert [item.name for item in items] == ["a.png", "c.bmp", "sub/b.JPG"]
    assert [item.prompt for item in items] == ["a red square", "default prompt", "a blue, square thing"]
    assert items[2].path == tmp_path / "sub" / "b.JPG"
    for item in items:
        check_tensor(item.image, 8)
    assert_colour(items[0].image, 4, 4, RED)


def test_jsonl_captions_by_file_name(tmp_path):
    make_folder(tmp_path)
    lines = [json.dumps({"image": "b.JPG", "prompt": "blue"}), "", json.dumps({"image": "c.bmp", "prompt": ""})]
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    prompts = {item.name: item.prompt for item in load_dataset(str(tmp_path), 8, "dflt")}
    assert prompts == {"a.png": "dflt", "sub/b.JPG": "blue", "c.bmp": ""}


def test_both_caption_files_is_an_error(tmp_path):
    make_folder(tmp_path)
    write_csv(tmp_path / "captions.csv", [])
    (tmp_path / "captions.jsonl").write_text("")
    with pytest.raises(ValueError, match="captions.csv"):
        load_dataset(tmp_path, 8, "x")


def test_csv_without_prompt_column(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "captions.csv").write_text("image,text\na.png,hello\n")
    with pytest.raises(ValueError, match="prompt"):
        load_dataset(tmp_path, 8, "x")


def test_single_file_uses_parent_captions(tmp_path):
    make_folder(tmp_path)
    write_csv(tmp_path / "captions.csv", [("a.png", "red")])
    items = load_dataset(tmp_path / "a.png", 8, "x")
    assert len(items) == 1 and items[0].name == "a.png" and items[0].prompt == "red"
    other = load_dataset(tmp_path / "c.bmp", 8, "x")
    assert other[0].prompt == "x"


def test_content_hash_depends_on_pixels_and_resolution(tmp_path):
    Image.new("RGB", (16, 16), RED).save(tmp_path / "one.png")
    Image.new("RGB", (16, 16), RED).save(tmp_path / "two.bmp")
    Image.new("RGB", (16, 16), BLUE).save(tmp_path / "three.png")
    one, three, two = load_dataset(tmp_path, 8, "x")
    assert one.content_hash == two.content_hash != three.content_hash
    assert len(one.content_hash) == 64
    assert load_dataset(tmp_path / "one.png", 4, "x")[0].content_hash != one.content_hash


def test_corrupt_file_is_skipped_with_warning(tmp_path, caplog):
    make_folder(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    good = tmp_path / "a.png"
    (tmp_path / "truncated.jpg").write_bytes(b"")
    Image.new("RGB", (64, 64), RED).save(tmp_path / "full.jpg")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "full.jpg").read_bytes()[:200])
    (tmp_path / "full.jpg").unlink()
    with caplog.at_level(logging.WARNING, logger="ddim_lab.data.folders"):
        items = load_dataset(tmp_path, 8, "x")
    assert [item.name for item in items] == ["a.png", "c.bmp", "sub/b.JPG"]
    warned = "\n".join(record.getMessage() for record in caplog.records if record.levelno == logging.WARNING)
    for name in ("broken.png", "truncated.jpg", "cut.jpg"):
        assert name in warned
    assert str(good) not in warned


def test_unreadable_single_file_raises(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="broken.png"):
        load_image(path, 8)
    with pytest.raises(ValueError, match="broken.png"):
        load_dataset(path, 8, "x")


def test_missing_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_dataset(missing, 8, "x")
    with pytest.raises(FileNotFoundError):
        load_image(missing / "x.png", 8)


def test_folder_without_images(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(ValueError, match=str(tmp_path.name)):
        load_dataset(tmp_path, 8, "x")


def test_suffixes_are_lowercase_with_dot():
    assert all(s.startswith(".") and s == s.lower() for s in IMAGE_SUFFIXES)


def test_bundled_photos_load():
    folder = ASSETS / "photos"
    items = load_dataset(folder, 64, "unused")
    assert 4 <= len(items) <= 6
    assert sum(p.stat().st_size for p in folder.iterdir()) < 300_000
    for item in items:
        check_tensor(item.image, 64)
        assert item.prompt != "unused" and item.prompt.startswith("a photograph of")
        assert float(item.image.std()) > 0.05  # real content, not a flat image
        with Image.open(item.path) as img:
            assert min(img.size) == 256 and img.format == "JPEG"
    assert len({item.content_hash for item in items}) == len(items)
    assert (folder / "README.md").is_file()


def test_bundled_digits_match_the_held_out_split():
    items = load_dataset(ASSETS / "digits-heldout", 16, "unused")
    assert len(items) == 20
    images, labels = digits.split()["held_out"]
    for item in items:
        label, index = (int(part) for part in item.name.removeprefix("digit").removesuffix(".png").split("_"))
        assert item.prompt == digits.caption(label)
        expected = digits.to_rgb(images[np.flatnonzero(labels == label)[index]][None], 16)[0]
        assert torch.allclose(item.image, expected, atol=0.5 / 255 + 1e-6)


def test_export_digits(tmp_path):
    export_digits(tmp_path / "out", count_per_digit=3, resolution=8)
    files = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert len(files) == 30 and "digit7_2.png" in files and "digit7_3.png" not in files
    with (tmp_path / "out" / "captions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 30 and {"image": "digit3_1.png", "prompt": digits.caption(3)} in rows
    items = {item.name: item for item in load_dataset(tmp_path / "out", 8, "x")}
    images, labels = digits.split()["held_out"]
    second_five = images[np.flatnonzero(labels == 5)[1]]
    expected = digits.to_rgb(second_five[None], 8)[0]
    assert torch.allclose(items["digit5_1.png"].image, expected, atol=0.5 / 255 + 1e-6)
    assert not torch.allclose(items["digit5_0.png"].image, expected, atol=0.05)


def _resize_then_crop(img: Image.Image, resolution: int) -> Image.Image:
    """The former policy: resize the whole image, then crop the centre square."""
    width, height = img.size
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    img = img.resize((new_w, new_h), Image.Resampling.LANCZOS)
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


@pytest.mark.parametrize(
    "size, resolution", [((80, 40), 40), ((64, 32), 16), ((37, 53), 24), ((300, 200), 512)]
)
def test_normal_images_keep_their_pixels(tmp_path, size, resolution):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    img.save(tmp_path / "x.png")
    expected = np.asarray(_resize_then_crop(img, resolution), dtype=np.float32) / 255
    got = load_image(tmp_path / "x.png", resolution).permute(1, 2, 0).numpy()
    assert np.array_equal(got, expected)


def test_very_long_image_is_cropped_before_resizing(tmp_path):
    import time

    Image.new("RGB", (3000, 2), RED).save(tmp_path / "strip.png")
    start = time.perf_counter()
    image = load_image(tmp_path / "strip.png", 512)  # resizing the whole strip first: 768000 × 512 px
    assert time.perf_counter() - start < 1.0
    check_tensor(image, 512)
    assert_colour(image, 256, 256, RED)


def test_elongated_image_crop_first_is_close_to_resize_first(tmp_path):
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (30, 200, 3), dtype=np.uint8))
    img.save(tmp_path / "wide.png")
    expected = np.asarray(_resize_then_crop(img, 24), dtype=np.float32) / 255
    got = load_image(tmp_path / "wide.png", 24).permute(1, 2, 0).numpy()
    assert np.abs(got - expected).mean() < 1 / 255  # same filter and sample positions (float rounding aside)


def test_folder_without_captions_says_which_prompt_is_used(tmp_path, caplog):
    Image.new("RGB", (8, 8), RED).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8), BLUE).save(tmp_path / "b.png")
    with caplog.at_level(logging.INFO, logger="ddim_lab.data.folders"):
        items = load_dataset(tmp_path, 8, "a photo")
    notes = [r.getMessage() for r in caplog.records if "captions.csv" in r.getMessage()]
    assert len(notes) == 1 and "prompt='a photo'" in notes[0]
    assert [it.prompt for it in items] == ["a photo", "a photo"]
