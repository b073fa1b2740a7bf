"""A saved generator out to the formats apps use: .keras, SavedModel, ONNX, LiteRT (.tflite).

SavedModel and LiteRT take uint8 RGB images of any size and return uint8
images: the [-1, 1] scaling and the pad to what the generator's sides need are built in.
`.keras` and ONNX hold the generator itself: float32 NHWC images in
[-1, 1], height and width multiples of 4. Every export is run once on a
test image by its own runtime and compared with the .h5 before it is kept.
"""
import importlib.util
import tempfile
import warnings
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import image_files
import models
from config import UserError
from fileio import checked_output, user_output

# Format -> the ending its --output must have ("" for a folder).
FORMATS = {"keras": ".keras", "saved_model": "", "onnx": ".onnx", "tflite": ".tflite"}
# Packages a format needs beyond the requirements, to write it and to check it.
OPTIONAL_PACKAGES = {"onnx": ("tf2onnx", "onnxruntime")}
# Largest difference from the .h5 an export may show: float32 round-off, one uint8 step.
TOLERANCE = {"float": 1e-3, "uint8": 1}


def serving_function(generator, size=(None, None)):
    """uint8 NHWC images of any size (or of `size`) -> translated uint8 images of the same size."""
    @tf.function(input_signature=[tf.TensorSpec((None, *size, 3), tf.uint8, name="images")])
    def serve(images):
        out = models.translate_padded(generator, image_files.to_network(images))
        return {"images": image_files.to_uint8(out)}
    return serve


def write_saved_model(generator, path, size=(None, None)):
    archive = keras.export.ExportArchive()
    archive.track(generator)
    archive.add_endpoint("serving_default", serving_function(generator, size))
    archive.write_out(str(path), verbose=False)


def write_tflite(generator, path, size=(None, None)):
    """Built-in LiteRT ops only: the Flex (select TensorFlow ops) delegate is not in its runtimes.

    Nearest-neighbour upsampling (`--upsample resize`) lowers to ops LiteRT
    can convert only when height and width are known: such generators need `size`.
    """
    if None in size and any(isinstance(layer, keras.layers.UpSampling2D) for layer in generator.layers):
        raise UserError("LiteRT converts a generator with resize upsampling only for one image "
                        "size: add --size HEIGHT WIDTH")
    with tempfile.TemporaryDirectory() as saved_model:
        write_saved_model(generator, saved_model, size)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved_model)
        Path(path).write_bytes(converter.convert())


def write_onnx(generator, path, size=None):
    with warnings.catch_warnings():  # Keras' own patch of tf2onnx for NumPy 2 warns
        warnings.simplefilter("ignore", FutureWarning)
        generator.export(str(path), format="onnx", verbose=False,
                         input_signature=[tf.TensorSpec((None, None, None, 3), tf.float32,
                                                        name="image")])


def write_keras(generator, path, size=None):
    generator.save(path)


def run_keras(path, image):
    return np.asarray(keras.models.load_model(path, compile=False)(image, training=False))


def run_saved_model(path, images):
    return tf.saved_model.load(str(path)).signatures["serving_default"](images=images)["images"].numpy()


def lite_interpreter(path):
    """LiteRT's interpreter where installed, else TensorFlow's own (deprecated, still present)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        Interpreter = tf.lite.Interpreter
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return Interpreter(model_path=str(path))


def run_tflite(path, images):
    runner = lite_interpreter(path).get_signature_runner("serving_default")
    return runner(images=images)["images"]


def run_onnx(path, image):
    import onnxruntime
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: image})[0]


WRITERS = {"keras": write_keras, "saved_model": write_saved_model, "onnx": write_onnx,
           "tflite": write_tflite}
RUNNERS = {"keras": run_keras, "saved_model": run_saved_model, "onnx": run_onnx,
           "tflite": run_tflite}


def require_packages(fmt):
    """One line naming what is missing, before any work is done."""
    missing = [p for p in OPTIONAL_PACKAGES.get(fmt, ()) if importlib.util.find_spec(p) is None]
    if missing:
        raise UserError(f"--format {fmt} needs the optional package(s) {', '.join(missing)}: "
                        f"pip install {' '.join(missing)}")


def check_images(size=(None, None), seed=0):
    """A uint8 image of `size` (default 70x90, not a multiple of 4) and a 64x64 [-1, 1] one."""
    rng = np.random.default_rng(seed)
    height, width = (70, 90) if None in size else size
    pixels = rng.integers(0, 256, (1, height, width, 3), dtype=np.uint8)
    return pixels, rng.uniform(-1, 1, (1, 64, 64, 3)).astype(np.float32)


def difference(fmt, generator, path, size=(None, None)):
    """(max abs difference from the .h5 on a test image, its unit)."""
    pixels, image = check_images(size)
    if fmt in ("saved_model", "tflite"):
        translated = models.translate_any_size(generator, image_files.to_network(pixels[0]))
        expected = np.asarray(image_files.to_uint8(translated))
        got = RUNNERS[fmt](path, pixels)[0]
        return int(np.abs(got.astype(int) - expected.astype(int)).max()), "uint8"
    expected = np.asarray(generator(image, training=False))
    return float(np.abs(RUNNERS[fmt](path, image) - expected).max()), "float"


def export(generator_path, fmt, output, size=None):
    """Write FMT to OUTPUT, checked against the .h5 on a test image; returns the difference.

    `size` (height, width) fixes the LiteRT model's input size.
    """
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if size and (fmt != "tflite" or min(size) < 4):
        raise UserError("--size applies to --format tflite only, and needs two sizes of at least 4")
    size = tuple(size or (None, None))
    output = checked_output(output, (FORMATS[fmt],))
    require_packages(fmt)
    generator = models.load_generator(generator_path)
    with user_output(output, (FORMATS[fmt],)) as tmp:
        WRITERS[fmt](generator, tmp, size)
        diff, unit = difference(fmt, generator, tmp, size)
        if diff > TOLERANCE[unit]:
            raise UserError(f"the exported {fmt} model differs from {generator_path} by {diff} "
                            f"({unit}); nothing was written")
    scale = "uint8 levels" if unit == "uint8" else "on [-1, 1] images"
    print(f"Exported {generator_path} as {fmt} to {output}; max abs difference from the .h5 "
          f"on a test image: {diff:.3g} ({scale})")
    return diff


def command(args):
    """`main.py export`."""
    export(args.generator, args.format, args.output, args.size)
