"""`translate`: folders at speed, photos larger than memory, video clips."""
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import one_line_error, run_cli

import image_files
import machine
import main
import models
import pretrained
import tiling
import translate
from config import make_config

FIXTURE = Path(__file__).parent / "fixtures" / "official" / "resnet_2blocks_ngf8.zip.pth"


@pytest.fixture(scope="module")
def generators(tmp_path_factory):
    """{preset: .h5}: a small book generator (batch norm in its residual blocks, its running
    statistics made non-trivial) and an official-layout paper one (reflection padding)."""
    folder = tmp_path_factory.mktemp("generators")
    book = models.build_generator(make_config("book", image_size=32, filters=8, res_blocks=2,
                                              precision="float32"))
    rng = np.random.default_rng(0)
    for layer in book.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            layer.moving_mean.assign(rng.normal(0, 0.1, layer.moving_mean.shape))
            layer.moving_variance.assign(rng.uniform(0.5, 2, layer.moving_variance.shape))
    book.save(folder / "book.h5")
    pretrained.convert(FIXTURE, folder / "paper.h5")
    return {"book": folder / "book.h5", "paper": folder / "paper.h5"}


def photos(folder, sizes, seed=0):
    """Smooth random photos (JPEG and PNG) of the given (height, width)s; returns their paths."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (height, width) in enumerate(sizes):
        small = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((width, height), Image.BILINEAR)
        paths.append(folder / f"photo_{i}.{'jpg' if i % 2 else 'png'}")
        image.save(paths[-1])
    return paths


def per_image(generator_h5, path, target):
    """Write what translate wrote before issue 20, one image at a time: the reference."""
    image_files.write_image(target, models.translate_any_size(models.load_generator(generator_h5),
                                                              image_files.read_image(path)))
    return levels(target)


def levels(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


@pytest.mark.parametrize("preset", ["book", "paper"])
def test_a_folder_comes_out_as_the_per_image_path_wrote_it(generators, tmp_path, capsys, preset):
    sizes = [(48, 64)] * 5 + [(37, 51), (64, 40)]   # five to batch together, two alone
    inputs = photos(tmp_path / "in", sizes)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways, shown upright
    Image.open(inputs[0]).save(tmp_path / "in" / "turned.jpg", exif=exif.tobytes())
    inputs.append(tmp_path / "in" / "turned.jpg")
    assert main.main(["translate", "--generator", str(generators[preset]), "--input",
                      str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                      "--precision", "float32"]) == 0
    out = capsys.readouterr().out
    assert "Precision: float32 (as asked)" in out
    assert "8/8" in out and "images/s" in out and "Translated 8 image(s)" in out
    for path in inputs:
        got = levels(tmp_path / "out" / path.name)
        expected = per_image(generators[preset], path, tmp_path / f"reference{path.suffix}")
        assert got.shape == expected.shape
        difference = np.abs(got - expected)
        # JPEG's encoder turns a one-level difference into a few levels around it.
        assert difference.max() <= 1 if path.suffix == ".png" else difference.mean() < 0.5
    assert levels(tmp_path / "out" / "turned.jpg").shape == (64, 48, 3)
    assert not list((tmp_path / "out").glob(".*"))  # no temporary files left


def test_a_small_image_of_a_rare_size_goes_untraced_the_rest_traced_to_the_same_result(
        generators, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(translate, "BATCH_PIXELS", 48 * 64)  # one image a batch
    monkeypatch.setattr(translate, "UNTRACED_PIXELS", 50 * 70)  # larger images go traced
    photos(tmp_path / "in", [(48, 64)] * translate.TRACE_FROM_BATCHES + [(37, 51), (60, 64)])
    calls = []
    call = translate.Translator.__call__
    monkeypatch.setattr(translate.Translator, "__call__", lambda self, images, size=None, trace=True:
                        calls.append((tuple(images.shape[1:3]), trace)) or call(self, images, size, trace))
    assert main.main(["translate", "--generator", str(generators["paper"]), "--input",
                      str(tmp_path / "in"), "--output", str(tmp_path / "out")]) == 0
    assert sorted(set(calls)) == [((37, 51), False), ((48, 64), True), ((60, 64), True)]
    translator = translate.Translator(models.load_generator(generators["paper"]), "float32")
    image = np.random.default_rng(0).integers(0, 256, (2, 32, 48, 3), dtype=np.uint8)
    np.testing.assert_allclose(translator(image, trace=False), translator(image), atol=1e-5)


def test_images_of_one_size_go_together_within_the_pixel_budget():
    images = [image_files.ImageFile(f"{i}.png", 1, size) for i, size in
              enumerate([(256, 256)] * 6 + [(100, 80), (1000, 1000), (256, 256)])]
    batches = translate.image_batches(images, max_size=0, keep_size=False, tile=0)
    assert [members for members, _, _ in batches] == [[0, 1, 2, 3], [4, 5, 8], [6], [7]]
    tiled = translate.image_batches(images, max_size=0, keep_size=False, tile=512)
    assert [members for members, _, _ in tiled][-1:] == [[7]]


@pytest.mark.parametrize("size, max_size, expected", [
    ((3000, 4000), 1024, (768, 1024)), ((4000, 3000), 1024, (1024, 768)),
    ((100, 200), 1024, (100, 200)), ((37, 51), 20, (15, 20)), ((37, 51), 0, (37, 51))])
def test_max_size_bounds_the_longer_side_and_keeps_the_shape(size, max_size, expected):
    assert translate.scaled_size(size, max_size) == expected


def test_max_size_translates_smaller_and_keep_size_scales_back(generators, tmp_path, capsys):
    photos(tmp_path / "in", [(60, 80), (30, 20)])
    args = ["translate", "--generator", str(generators["book"]), "--input", str(tmp_path / "in")]
    assert main.main(args + ["--output", str(tmp_path / "small"), "--max-size", "40"]) == 0
    assert Image.open(tmp_path / "small" / "photo_0.png").size == (40, 30)
    assert Image.open(tmp_path / "small" / "photo_1.jpg").size == (20, 30)  # already small
    assert main.main(args + ["--output", str(tmp_path / "back"), "--max-size", "40",
                             "--keep-size"]) == 0
    assert Image.open(tmp_path / "back" / "photo_0.png").size == (80, 60)
    # The same translation, scaled back up: close to the small one's pixels on average.
    small = tf.image.resize(levels(tmp_path / "small" / "photo_0.png")[None], (60, 80))[0]
    assert np.abs(levels(tmp_path / "back" / "photo_0.png") - np.asarray(small)).mean() < 2


@pytest.mark.parametrize("preset", ["book", "paper"])
def test_tiles_give_the_whole_images_translation(generators, preset):
    generator = models.load_generator(generators[preset])
    image = image_files.read_image(photos(Path(generators[preset]).parent / f"tiles_{preset}",
                                          [(150, 203)])[0])
    tiled = tiling.TiledGenerator(generator, 32)
    # Only maps at a quarter of the image's resolution are kept whole between segments.
    assert len(tiled.segments) > 2
    assert {tiled.scale[s.end] for s in tiled.segments[:-1]} == {Fraction(1, 4)}
    whole = models.translate_any_size(generator, image)
    got = np.asarray(tiled(image))
    assert got.shape == whole.shape
    np.testing.assert_allclose(got, whole, atol=1e-4, rtol=0)
    levels = lambda images: np.asarray(image_files.to_uint8(images), int)
    assert np.abs(levels(got) - levels(whole)).max() <= 1


def test_tile_flag_writes_what_the_whole_image_gives(generators, tmp_path, capsys):
    photos(tmp_path / "in", [(96, 120)])
    args = ["translate", "--generator", str(generators["paper"]), "--input", str(tmp_path / "in")]
    assert main.main(args + ["--output", str(tmp_path / "whole")]) == 0
    assert main.main(args + ["--output", str(tmp_path / "tiled"), "--tile", "32"]) == 0
    assert np.abs(levels(tmp_path / "tiled" / "photo_0.png")
                  - levels(tmp_path / "whole" / "photo_0.png")).max() <= 1


def test_a_generator_with_a_layer_tiles_do_not_know_is_refused_in_one_line():
    import keras
    inputs = keras.Input((None, None, 3))
    model = keras.Model(inputs, keras.layers.MaxPooling2D(1)(inputs), name="pooling")
    with pytest.raises(main.config.UserError, match="--tile cannot split pooling: its layer"):
        tiling.TiledGenerator(model, 32)


def test_out_of_memory_is_one_line_naming_max_size_and_tile(generators, tmp_path, capsys,
                                                            monkeypatch):
    def exhausted(self, images, size=None, trace=True):
        raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")
    monkeypatch.setattr(translate.Translator, "__call__", exhausted)
    photos(tmp_path / "in", [(40, 60)])
    err = one_line_error(["translate", "--generator", generators["book"], "--input",
                          tmp_path / "in", "--output", tmp_path / "out"], capsys)
    assert "out of memory translating photo_0.png (60x40)" in err
    assert "--max-size" in err and "--tile" in err


def test_a_photo_larger_than_free_memory_is_refused_whole_and_translates_in_tiles(
        generators, tmp_path, capsys, monkeypatch):
    """On a CPU, running out of memory aborts the process: the estimate refuses it first."""
    photos(tmp_path / "in", [(40, 60)])
    monkeypatch.setattr(machine, "available_memory", lambda: 100_000)
    args = ["translate", "--generator", generators["book"], "--input", tmp_path / "in"]
    err = one_line_error(args + ["--output", tmp_path / "whole"], capsys)
    assert "out of memory translating photo_0.png (60x40)" in err and "--tile" in err
    assert main.main([str(a) for a in args + ["--output", tmp_path / "tiled", "--tile", "16"]]) == 0
    assert Image.open(tmp_path / "tiled" / "photo_0.png").size == (60, 40)


def test_the_memory_estimate_covers_the_widest_activation(generators):
    generator = models.load_generator(generators["paper"])  # 8 channels at full size, padded by 3
    assert translate.bytes_per_pixel(generator) == pytest.approx(
        translate.LIVE_ACTIVATIONS * 8 * 4 * (70 / 64) ** 2)
    assert machine.available_memory() is None or machine.available_memory() > 0


@pytest.mark.parametrize("flags, words", [
    (["--tile", "30"], "--tile must be a multiple of 4 for this generator"),
    (["--tile", "8"], "--tile must be at least 16"),
    (["--max-size", "2"], "--max-size must be at least 4"),
    (["--keep-size"], "--keep-size goes with --max-size"),
    (["--precision", "float8"], "invalid choice"),
])
def test_bad_translate_flags_are_one_line_errors(generators, tmp_path, capsys, flags, words):
    photos(tmp_path / "in", [(40, 40)])
    err = one_line_error(["translate", "--generator", generators["book"], "--input",
                          tmp_path / "in", "--output", tmp_path / "out", *flags], capsys)
    assert words in err
    assert not (tmp_path / "out").exists()


def test_bfloat16_translates_close_to_float32(generators):
    generator = models.load_generator(generators["paper"])
    image = np.random.default_rng(0).integers(0, 256, (2, 32, 48, 3), dtype=np.uint8)
    float32 = translate.Translator(generator, "float32")(image)
    bfloat16 = translate.Translator(generator, "bfloat16")
    assert bfloat16.generator.layers[1].compute_dtype == "bfloat16"
    got = bfloat16(image)
    assert got.dtype == np.float32 and got.shape == float32.shape
    assert np.abs(got - float32).mean() < 0.05


# --- video clips ---------------------------------------------------------------

def make_clip(path, frames=10, rate=12, size=(48, 64), sound=False):
    """A short H.264 clip of a bar moving across, with or without a sound track."""
    av = pytest.importorskip("av")
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as clip:
        video = clip.add_stream("libx264", rate=rate)
        video.height, video.width = size
        video.pix_fmt = "yuv420p"
        audio = clip.add_stream("aac", rate=8000) if sound else None
        for i in range(frames):
            image = np.full((*size, 3), 40, np.uint8)
            image[:, 4 * i:4 * i + 8] = 220
            for packet in video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                clip.mux(packet)
        if audio:
            tone = np.sin(np.arange(8000 * frames // rate) / 3).astype(np.float32)[None]
            frame = av.AudioFrame.from_ndarray(tone, format="flt", layout="mono")
            frame.sample_rate = 8000
            for packet in audio.encode(frame) + audio.encode():
                clip.mux(packet)
        for packet in video.encode():
            clip.mux(packet)
    return path


def clip_facts(path):
    """(frames decoded, frame rate, (height, width))."""
    import av
    with av.open(str(path)) as clip:
        stream = clip.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in clip.decode(stream)]
        return len(frames), stream.average_rate, frames[0].shape[:2]


def test_a_clip_comes_out_with_its_frames_rate_and_size(generators, tmp_path, capsys):
    make_clip(tmp_path / "clip.mp4", frames=10, rate=12, sound=True)
    assert main.main(["translate", "--generator", str(generators["book"]), "--input",
                      str(tmp_path / "clip.mp4"), "--output", str(tmp_path / "out.mp4")]) == 0
    out = capsys.readouterr().out
    assert "10/10" in out and "frames/s" in out
    assert "Translated 1 clip(s)" in out and "the sound of clip.mp4 is not carried over" in out
    assert clip_facts(tmp_path / "out.mp4") == (10, Fraction(12), (48, 64))
    assert not list(tmp_path.glob(".*"))


def test_a_folder_of_clips_and_images_with_max_size(generators, tmp_path, capsys):
    make_clip(tmp_path / "in" / "a.mp4", frames=6, rate=25, size=(64, 96))
    make_clip(tmp_path / "in" / "b.mkv", frames=4, rate=8, size=(32, 32))
    photos(tmp_path / "in", [(64, 96)])
    assert main.main(["translate", "--generator", str(generators["book"]), "--input",
                      str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                      "--max-size", "48"]) == 0
    assert "Translated 1 image(s) and 2 clip(s)" in capsys.readouterr().out
    assert clip_facts(tmp_path / "out" / "a.mp4") == (6, Fraction(25), (32, 48))
    assert clip_facts(tmp_path / "out" / "b.mkv") == (4, Fraction(8), (32, 32))
    assert Image.open(tmp_path / "out" / "photo_0.png").size == (48, 32)


def test_a_clip_without_the_video_package_is_one_line_naming_it(generators, tmp_path, capsys,
                                                                 monkeypatch):
    (tmp_path / "clip.mp4").write_bytes(b"not needed")
    monkeypatch.setitem(sys.modules, "av", None)  # as if not installed
    err = one_line_error(["translate", "--generator", generators["book"], "--input",
                          tmp_path / "clip.mp4", "--output", tmp_path / "out.mp4"], capsys)
    assert "pip install av" in err
    assert not (tmp_path / "out.mp4").exists()


@pytest.mark.slow
def test_a_clip_that_breaks_mid_stream_keeps_its_first_frames_and_the_folder_goes_on(
        generators, tmp_path):
    for name in ("a.mp4", "b.mp4", "c.mp4"):
        make_clip(tmp_path / "in" / name, frames=24)
    import av
    broken = tmp_path / "in" / "b.mp4"
    with av.open(str(broken)) as clip:
        packets = [(p.pos, p.size) for p in clip.demux(clip.streams.video[0]) if p.size]
    raw = bytearray(broken.read_bytes())
    for pos, size in packets[12:16]:  # noise in place of four frames in the middle
        raw[pos:pos + size] = np.random.default_rng(pos).integers(0, 256, size, np.uint8).tobytes()
    broken.write_bytes(raw)
    result = run_cli("translate", "--generator", generators["book"], "--input", tmp_path / "in",
                     "--output", tmp_path / "out", cwd=tmp_path)
    warned = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and "BrokenClipWarning: b.mp4 breaks off" in warned[0], result.stderr
    assert "Traceback" not in result.stderr and "Translated 3 clip(s)" in result.stdout
    assert clip_facts(tmp_path / "out" / "a.mp4")[0] == clip_facts(tmp_path / "out" / "c.mp4")[0] == 24
    kept = clip_facts(tmp_path / "out" / "b.mp4")[0]
    assert 0 < kept < 24 and f"the {kept} frames before are translated" in warned[0]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.mp4", "b.mp4", "c.mp4"]
