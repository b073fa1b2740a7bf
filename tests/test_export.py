"""Each export format, loaded back by its own runtime, computes what the .h5 computes."""
import sys
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import one_line_error

import export
import image_files
import main
import models
import pretrained
from config import make_config

FIXTURE = Path(__file__).parent / "fixtures" / "official" / "resnet_2blocks_ngf8.zip.pth"


@pytest.fixture(scope="module")
def generator_h5(tmp_path_factory):
    """An official-layout generator (the paper preset, reflection padding included) as .h5."""
    path = tmp_path_factory.mktemp("export") / "g.h5"
    pretrained.convert(FIXTURE, path)
    return path


def exported(generator_h5, tmp_path, capsys, fmt, name):
    output = tmp_path / name
    assert main.main(["export", "--generator", str(generator_h5), "--format", fmt,
                      "--output", str(output)]) == 0
    assert "max abs difference from the .h5 on a test image" in capsys.readouterr().out
    assert output.exists() and not list(tmp_path.glob(".*tmp*"))
    return output


def float_image(height=48, width=60):
    return np.random.default_rng(1).uniform(-1, 1, (1, height, width, 3)).astype(np.float32)


def uint8_image(height=30, width=50):
    """Not a multiple of 4: the exported signature must pad and crop itself."""
    return np.random.default_rng(2).integers(0, 256, (1, height, width, 3), dtype=np.uint8)


def expected_uint8(generator_h5, pixels):
    out = models.translate_any_size(models.load_generator(generator_h5), pixels[0] / 127.5 - 1.0)
    return np.asarray(image_files.to_uint8(out))


def assert_uint8_close(got, expected):
    assert got.dtype == np.uint8 and got.shape == expected.shape
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


def test_keras_format_reloads_with_the_same_output(generator_h5, tmp_path, capsys):
    path = exported(generator_h5, tmp_path, capsys, "keras", "g.keras")
    image = float_image()
    reloaded = keras.models.load_model(path, compile=False)
    original = models.load_generator(generator_h5)
    np.testing.assert_allclose(reloaded(image), original(image), atol=1e-5)


def test_saved_model_serves_uint8_images_of_any_size(generator_h5, tmp_path, capsys):
    path = exported(generator_h5, tmp_path, capsys, "saved_model", "served")
    pixels = uint8_image()
    serve = tf.saved_model.load(str(path)).signatures["serving_default"]
    got = serve(images=tf.constant(pixels))["images"].numpy()
    assert_uint8_close(got[0], expected_uint8(generator_h5, pixels))


@pytest.fixture(scope="module")
def tflite_model(generator_h5, tmp_path_factory):
    path = tmp_path_factory.mktemp("tflite") / "g.tflite"
    export.export(generator_h5, "tflite", path)
    return path


def test_tflite_export_prints_its_check(generator_h5, tmp_path, capsys):
    exported(generator_h5, tmp_path, capsys, "tflite", "g.tflite")


def test_tflite_runs_in_tensorflows_interpreter(generator_h5, tflite_model):
    pixels = uint8_image(36, 42)
    with warnings.catch_warnings():  # deprecated in favour of LiteRT's, still in every TF install
        warnings.simplefilter("ignore", UserWarning)
        interpreter = tf.lite.Interpreter(model_path=str(tflite_model))
    got = interpreter.get_signature_runner("serving_default")(images=pixels)["images"]
    assert_uint8_close(got[0], expected_uint8(generator_h5, pixels))


def test_tflite_runs_in_the_litert_interpreter(generator_h5, tflite_model):
    litert = pytest.importorskip("ai_edge_litert.interpreter")
    pixels = uint8_image(36, 42)
    runner = litert.Interpreter(model_path=str(tflite_model)).get_signature_runner("serving_default")
    assert_uint8_close(runner(images=pixels)["images"][0], expected_uint8(generator_h5, pixels))


def test_onnx_runs_in_onnxruntime(generator_h5, tmp_path, capsys):
    pytest.importorskip("tf2onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    path = exported(generator_h5, tmp_path, capsys, "onnx", "g.onnx")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    image = float_image(40, 64)
    got = session.run(None, {session.get_inputs()[0].name: image})[0]
    np.testing.assert_allclose(got, models.load_generator(generator_h5)(image), atol=1e-4)


def test_a_missing_converter_is_one_line_naming_the_package(generator_h5, tmp_path, capsys,
                                                            monkeypatch):
    monkeypatch.setitem(sys.modules, "tf2onnx", None)  # as if not installed
    err = one_line_error(["export", "--generator", generator_h5, "--format", "onnx",
                          "--output", tmp_path / "g.onnx"], capsys)
    assert "pip install tf2onnx" in err
    assert not (tmp_path / "g.onnx").exists()


def test_bad_outputs_are_refused_and_nothing_is_overwritten(generator_h5, tmp_path, capsys):
    one_line_error(["export", "--generator", generator_h5, "--format", "tflite",
                    "--output", tmp_path / "g.onnx"], capsys)
    kept = tmp_path / "g.keras"
    kept.write_text("someone's file")
    err = one_line_error(["export", "--generator", generator_h5, "--format", "keras",
                          "--output", kept], capsys)
    assert "already exists" in err and kept.read_text() == "someone's file"
    one_line_error(["export", "--generator", tmp_path / "missing.h5", "--format", "keras",
                    "--output", tmp_path / "new.keras"], capsys)


@pytest.mark.slow
def test_a_resize_upsampling_generator_exports_to_tflite_at_one_size(tmp_path, capsys):
    """LiteRT lowers nearest-neighbour upsampling only when height and width are known."""
    h5 = tmp_path / "fast.h5"
    models.build_generator(make_config("fast", image_size=32)).save(h5)
    err = one_line_error(["export", "--generator", h5, "--format", "tflite",
                          "--output", tmp_path / "any.tflite"], capsys)
    assert "--size" in err and not (tmp_path / "any.tflite").exists()
    path = tmp_path / "fixed.tflite"
    assert main.main(["export", "--generator", str(h5), "--format", "tflite", "--output", str(path),
                      "--size", "30", "50"]) == 0
    pixels = uint8_image(30, 50)
    assert_uint8_close(export.run_tflite(path, pixels)[0], expected_uint8(h5, pixels))
    one_line_error(["export", "--generator", h5, "--format", "onnx", "--output", tmp_path / "g.onnx",
                    "--size", "30", "50"], capsys)
