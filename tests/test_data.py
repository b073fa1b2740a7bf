import os
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

import tensorflow as tf

import config
import data
import download
import image_files
from config import make_config
from conftest import within, write_images


def test_pixels_are_scaled_to_minus_one_one(tmp_path):
    pixels = np.zeros((40, 40, 3), np.uint8)
    pixels[:, 20:] = 255
    Image.fromarray(pixels).save(tmp_path / "half.png")
    image = data.load_image(str(tmp_path / "half.png"), 40).numpy()
    assert image.shape == (40, 40, 3)
    assert image.min() == pytest.approx(-1.0, abs=1e-5) and image.max() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "RGB"])
def test_any_colour_mode_becomes_rgb(tmp_path, mode):
    path = tmp_path / f"img_{mode}.png"
    Image.new(mode, (50, 30)).save(path)
    assert data.load_image(str(path), 32).shape == (32, 32, 3)


def test_jpg_bmp_gif_decode(tmp_path):
    for ext in ("jpg", "bmp", "gif"):
        Image.new("RGB", (20, 20), (255, 0, 0)).save(tmp_path / f"x.{ext}")
        assert data.load_image(str(tmp_path / f"x.{ext}"), 16).shape == (16, 16, 3)


def test_domain_files_reads_the_train_split_with_a_limit(tiny_dataset):
    files = data.domain_files(tiny_dataset, "train", "A")
    assert len(files) == 5 and all("/trainA/" in f for f in files)
    assert len(data.domain_files(tiny_dataset, "train", "A", limit=2)) == 2


def solid_domain(folder, levels):
    for i, level in enumerate(levels):
        Image.fromarray(np.full((8, 8, 3), level, np.uint8)).save(folder / f"{i}.png")


def test_domains_are_shuffled_on_their_own_and_never_paired_by_index(tmp_path):
    (tmp_path / "A").mkdir()
    (tmp_path / "B").mkdir()
    solid_domain(tmp_path / "A", [0, 40, 80, 120, 160, 200])
    solid_domain(tmp_path / "B", [20, 100, 180])
    cfg = make_config(image_size=32, batch_size=1)
    files_a = image_files.list_images(tmp_path / "A")
    files_b = image_files.list_images(tmp_path / "B")
    assert data.steps_per_epoch(files_a, files_b, cfg) == 6
    level = lambda batch: int(round((float(batch[0, 0, 0, 0]) + 1) * 127.5))
    pairs = [(level(a), level(b)) for a, b in data.train_dataset(files_a, files_b, cfg).take(12)]
    seen_a = [a for a, _ in pairs]
    seen_b = [b for _, b in pairs]
    # Every A image once per epoch; the smaller domain B reshuffled each time it runs out.
    assert sorted(seen_a[:6]) == sorted(seen_a[6:]) == [0, 40, 80, 120, 160, 200]
    for start in (0, 3, 6, 9):
        assert sorted(seen_b[start:start + 3]) == [20, 100, 180]
    assert seen_a[:6] != seen_a[6:] or seen_b[:3] != seen_b[3:6]


def test_steps_per_epoch_follows_the_larger_domain_and_batch_size():
    cfg = make_config(image_size=32, batch_size=2)
    assert data.steps_per_epoch(["a"] * 5, ["b"] * 3, cfg) == 2
    assert data.steps_per_epoch(["a"] * 5, ["b"] * 3, make_config(image_size=32, steps_per_epoch=7)) == 7


def test_random_crop_and_flip_keep_the_crop_size():
    image = np.random.default_rng(0).uniform(-1, 1, (36, 36, 3)).astype(np.float32)
    out = data.augment(image, 32, tf.constant([1, 2], tf.int64)).numpy()
    assert out.shape == (32, 32, 3)
    # The crop is a window of the input (possibly mirrored): its pixels come from it.
    assert np.isin(out[:, :, 0], image[:, :, 0]).all()


def test_photo_datasets_without_scikit_image_are_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage", None)  # import skimage now fails
    for name in ("photos", "painterly"):
        with pytest.raises(config.DataError, match="needs? scikit-image"):
            data.resolve_dataset(name, tmp_path)


def test_bad_dataset_paths_are_one_line_errors(tmp_path, tiny_dataset):
    with pytest.raises(config.DataError, match="neither a folder"):
        data.resolve_dataset(str(tmp_path / "nope"))
    (tiny_dataset / "trainB").rename(tiny_dataset / "elsewhere")
    with pytest.raises(config.DataError, match="missing folder .*trainB"):
        data.domain_files(tiny_dataset, "train", "B")
    (tiny_dataset / "trainB").mkdir()
    with pytest.raises(config.DataError, match="no usable images"):
        data.domain_files(tiny_dataset, "train", "B")


def test_unreadable_images_are_skipped_with_a_named_warning(tiny_dataset):
    (tiny_dataset / "trainA" / "broken.jpg").write_bytes(b"")
    (tiny_dataset / "trainA" / "text.png").write_text("not an image")
    with pytest.warns(image_files.SkippedImagesWarning, match="broken.jpg, text.png"):
        files = data.domain_files(tiny_dataset, "train", "A")
    assert len(files) == 5


def test_official_dataset_offline_fails_fast_with_where_to_put_it(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(download, "fetch", offline)
    with pytest.raises(config.DataError) as error:
        data.resolve_dataset("monet2photo", datasets_dir=str(tmp_path))
    message = str(error.value)
    assert "\n" not in message
    assert "monet2photo.zip" in message and str(tmp_path / "monet2photo") in message


def test_existing_official_dataset_folder_is_used_without_download(tmp_path, monkeypatch):
    monkeypatch.setattr(download, "fetch", lambda *a, **k: pytest.fail("downloaded"))
    write_images(tmp_path / "horse2zebra" / "trainA", 1)
    assert data.resolve_dataset("horse2zebra", datasets_dir=str(tmp_path)) == tmp_path / "horse2zebra"


def test_bad_input_corpus_loads_what_can_be_read_and_names_what_cannot(tmp_path):
    """Every odd file a real folder holds: usable ones load as RGB, the rest are skipped by name."""
    import io
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    folder = tmp_path / "trainA"
    folder.mkdir()
    Image.fromarray(rgb).convert("L").save(folder / "gray.png")
    Image.fromarray(rgb).convert("RGBA").save(folder / "rgba.png")
    Image.fromarray(rgb).convert("P").save(folder / "palette.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(np.full((40, 40), 65535, np.uint16)).save(folder / "white16.png")
    Image.fromarray(rgb[:1, :1]).save(folder / "one_pixel.png")
    Image.fromarray(rng.integers(0, 256, (50, 4000, 3), dtype=np.uint8)).save(folder / "wide.jpg")
    Image.fromarray(rgb).save(folder / "ñandú_写真.png")
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG")
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[:300])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.png").write_text("not an image")
    (folder / ".hidden.jpg").write_bytes(b"")
    (folder / "readme.txt").write_text("ignored")

    with pytest.warns(image_files.SkippedImagesWarning) as caught:
        files = data.domain_files(tmp_path, "train", "A")
    message = str(caught[0].message)
    assert "3 unreadable" in message
    for name in ("empty.jpg", "text.png", "truncated.jpg"):
        assert name in message
    assert len(files) == 8
    for path in files:
        image = data.load_image(path, 32).numpy()
        assert image.shape == (32, 32, 3) and -1 <= image.min() and image.max() <= 1
    white16 = data.load_image(str(folder / "white16.png"), 32).numpy()
    assert white16.min() == pytest.approx(1.0)  # 16-bit white stays white, not clipped noise


def test_paper_preset_pipeline_resizes_to_load_size_then_crops(tiny_dataset):
    cfg = make_config("paper", image_size=32)
    assert cfg.load_px == 36  # the paper's 286/256 ratio
    files_a = data.domain_files(tiny_dataset, "train", "A")
    files_b = data.domain_files(tiny_dataset, "train", "B")
    batch_a, batch_b = next(iter(data.train_dataset(files_a, files_b, cfg)))
    assert batch_a.shape == batch_b.shape == (1, 32, 32, 3)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_turns_the_image_upright_as_pil_does(tmp_path, orientation):
    from PIL import ImageOps
    pixels = np.random.default_rng(orientation).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[image_files.EXIF_ORIENTATION] = orientation
    path = tmp_path / "phone.png"
    Image.fromarray(pixels).save(path, exif=exif.tobytes())
    expected = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    assert expected.shape == ((10, 6, 3) if orientation >= 5 else (6, 10, 3))
    (file,) = image_files.usable_images([str(path)], tmp_path)
    assert file.orientation == orientation
    got = np.asarray(image_files.to_uint8(image_files.read_image(path)))
    np.testing.assert_array_equal(got, expected)
    loaded = data.load_image(str(path), 32).numpy()  # samples, evaluation: upright too
    np.testing.assert_allclose(loaded, data.load_image(file, 32).numpy(), atol=1e-6)


def test_training_batches_are_upright(tmp_path):
    """A portrait photo stored sideways trains as portrait: its top row stays on top."""
    pixels = np.zeros((32, 48, 3), np.uint8)
    pixels[:, :8] = 255  # white left edge; orientation 6 turns it into the top edge
    exif = Image.Exif()
    exif[image_files.EXIF_ORIENTATION] = 6
    Image.fromarray(pixels).save(tmp_path / "side.png", exif=exif.tobytes())
    files = image_files.usable_images([str(tmp_path / "side.png")], tmp_path)
    cfg = make_config(image_size=32)
    batch, _ = next(iter(data.train_dataset(files, files, cfg)))
    image = batch[0].numpy()
    assert image[:4].min() > 0.9 and image[-4:].max() < -0.9


def write_png_claiming(path, width, height):
    """A small PNG file whose header claims width x height pixels."""
    import struct
    import zlib
    Image.new("RGB", (1, 1)).save(path)
    raw = bytearray(path.read_bytes())
    header = b"IHDR" + struct.pack(">II", width, height) + bytes(raw[24:29])
    raw[12:29] = header
    raw[29:33] = struct.pack(">I", zlib.crc32(header))
    path.write_bytes(bytes(raw))


def test_an_image_over_the_pixel_limit_is_skipped_by_name_without_decoding(tmp_path):
    write_images(tmp_path / "trainA", 2)
    write_png_claiming(tmp_path / "trainA" / "huge.png", 16000, 16000)
    with pytest.warns(image_files.SkippedImagesWarning, match=r"huge.png \(over the 89-megapixel limit\)"):
        files = data.domain_files(tmp_path, "train", "A")
    assert len(files) == 2
    with pytest.raises(image_files.UnusableImage, match="megapixel"):
        image_files.read_image(tmp_path / "trainA" / "huge.png")


def test_a_file_name_that_is_not_utf8_is_read(tmp_path):
    folder = tmp_path / "trainA"
    write_images(folder, 1)
    name = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes, as an old camera or zip writes them
    os.rename(folder / "img_000.png", folder / name)
    (file,) = data.domain_files(tmp_path, "train", "A")
    assert os.fsencode(file).endswith(b"caf\xe9.png")
    assert data.load_image(file, 32).shape == (32, 32, 3)
    cfg = make_config(image_size=32)
    batch, _ = next(iter(data.train_dataset([file], [file], cfg)))
    assert batch.shape == (1, 32, 32, 3)


def only_pillow_decodes(folder):
    """White images TensorFlow's decoder cannot read, as real folders hold them: an AVIF
    named .jpg (as web downloads often are; where this Pillow writes AVIF), a TIFF named .png
    and a 1-bit BMP."""
    from PIL import features
    folder.mkdir(parents=True)
    white = Image.new("RGB", (40, 40), "white")
    if features.check("avif"):
        white.save(folder / "web.jpg", "AVIF")
    white.save(folder / "scan.png", "TIFF")
    white.convert("1").save(folder / "fax.bmp")
    for path in folder.iterdir():
        with pytest.raises(tf.errors.InvalidArgumentError):
            tf.io.decode_image(tf.io.read_file(str(path)))
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_images_only_pillow_decodes_are_trained_on_from_copies_outside_the_users_folder(
        tmp_path, monkeypatch):
    """Start-up decodes each file as the pipeline does: what passes trains, and is counted."""
    monkeypatch.chdir(tmp_path)
    before = only_pillow_decodes(tmp_path / "data" / "trainA")
    write_images(tmp_path / "data" / "trainB", 2)
    files_a = data.domain_files(tmp_path / "data", "train", "A")
    assert sorted(os.path.basename(f) for f in files_a) == sorted(before)
    copies = {p: p.stat().st_mtime_ns for p in (tmp_path / image_files.DECODED_DIR).iterdir()}
    assert len(copies) == len(before)
    batches = iter(data.train_dataset(files_a, data.domain_files(tmp_path / "data", "train", "B"),
                                      make_config(image_size=32)))
    for _ in range(3):  # the whole domain: before, the pipeline dropped each and never returned
        batch_a, _ = within(60, data.next_batch, batches)
        assert batch_a.numpy().min() > 0.9  # white: the images themselves
    assert image_files.read_image(tmp_path / "data" / "trainA" / "scan.png").min() > 0.9  # translate
    assert {p.name: p.read_bytes() for p in (tmp_path / "data" / "trainA").iterdir()} == before
    data.domain_files(tmp_path / "data", "train", "A")  # decoded once: the copies are reused
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / image_files.DECODED_DIR).iterdir()} == copies


def test_images_gone_after_the_check_end_the_pipeline_in_one_line_naming_them(tiny_dataset):
    """Nothing is dropped, so no endless search for an image that reads: one line says why."""
    files_a, files_b = (data.domain_files(tiny_dataset, "train", d) for d in "AB")
    batches = iter(data.train_dataset(files_a, files_b, make_config(image_size=32)))
    within(60, data.next_batch, batches)
    shutil.rmtree(tiny_dataset / "trainA")
    with pytest.raises(config.DataError, match=r"can no longer be read \(.*trainA.*No such file") as error:
        for _ in range(20):  # past the batches read ahead
            within(60, data.next_batch, batches)
    assert "\n" not in str(error.value)


def test_an_image_read_on_its_own_that_cannot_be_used_is_a_one_line_error(tmp_path):
    """Samples, truth images, evaluation: a damaged file is named, never a traceback."""
    (tmp_path / "truth.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(config.DataError, match="cannot use image .*truth.png.*: unreadable"):
        data.load_batch([str(tmp_path / "truth.png")], 32)


def test_a_second_check_of_an_unchanged_folder_decodes_nothing_and_a_changed_file_again(
        tmp_path, monkeypatch):
    """What the decode check found is remembered in the program's own cache, keyed by each
    file's path, size and time: nothing is written beside the user's images."""
    monkeypatch.chdir(tmp_path)
    paths = write_images(tmp_path / "mine" / "trainA", 4)
    (tmp_path / "mine" / "trainA" / "cut.png").write_bytes(paths[0].read_bytes()[:200])
    decoded = []
    real = image_files.tensorflow_decodes
    monkeypatch.setattr(image_files, "tensorflow_decodes", lambda images: decoded.append(
        sorted(os.path.basename(i) for i in images)) or real(images))

    def check():
        with pytest.warns(image_files.SkippedImagesWarning, match="cut.png"):
            return [os.path.basename(f) for f in data.domain_files(tmp_path / "mine", "train", "A")]
    first = check()
    assert decoded.pop() == sorted(first + ["cut.png"]) and len(first) == 4
    assert check() == first and decoded.pop() == []
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(paths[1])  # another size and time
    assert check() == first and decoded.pop() == ["img_001.png"]
    for record in (tmp_path / image_files.CHECKED_DIR).iterdir():
        record.write_bytes(b"\xff{ damaged")
    assert check() == first and len(decoded.pop()) == 5
    written = {p.relative_to(tmp_path).parts[:2] for p in tmp_path.rglob("*") if p.is_file()
               and not p.is_relative_to(tmp_path / "mine")}
    assert written == {("datasets", ".checked")}
    assert sorted(p.name for p in (tmp_path / "mine" / "trainA").iterdir()) == sorted(first + ["cut.png"])
