"""Image files: which are usable (headers, EXIF orientation, a full decode), the decoded copies
of those only Pillow reads, reading and writing one image, and the pixel scales: 0-255 levels
in files, [-1, 1] in the networks, [0, 1] for display and scores."""
import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import tensorflow as tf
from PIL import Image, ImageOps, UnidentifiedImageError

import config
from fileio import atomic_write

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
# PIL's own decompression-bomb bound (about 89 megapixels): a larger image is skipped.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS
EXIF_ORIENTATION = 0x0112     # the EXIF tag a camera sets when held sideways or upside down
# Copies of images only Pillow decodes (decoded_copy), beside the downloaded datasets.
DECODED_DIR = os.path.join("datasets", ".decoded")
# What the start-up check found of each image folder's files (usable_images), there too.
CHECKED_DIR = os.path.join("datasets", ".checked")


class SkippedImagesWarning(UserWarning):
    """Some image files could not be read, or are too large, and are left out."""


def list_images(folder, extensions=IMAGE_EXTENSIONS):
    """Image files (or files of other `extensions`) in `folder`, sorted, hidden files left out."""
    folder = Path(folder)
    if not folder.is_dir():
        raise config.DataError(f"missing folder {folder}")
    return sorted(str(p) for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in extensions)


class ImageFile(str):
    """A checked image's path; it also carries its EXIF orientation (1 = upright), its upright
    (height, width) where known, and the file the pipeline decodes: the image itself or its
    copy in DECODED_DIR."""

    def __new__(cls, path, orientation=1, size=None, decoded=None):
        self = super().__new__(cls, path)
        self.orientation = orientation
        self.size = size
        self.decoded = str(path) if decoded is None else decoded
        return self


class UnusableImage(Exception):
    """Why one image file is left out."""


def inspect_image(path):
    """The file as an ImageFile, from its header alone; raises UnusableImage.

    The header gives size and orientation; whether the pixels decode is
    for tensorflow_decodes to say.
    """
    too_large = UnusableImage(f"over the {MAX_PIXELS / 1e6:.0f}-megapixel limit")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
        with image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise too_large
            # A PNG's eXIf chunk after the pixels would take a full decode to reach: only one before.
            exif = image.format != "PNG" or "exif" in image.info
            orientation = image.getexif().get(EXIF_ORIENTATION, 1) if exif else 1
    except Image.DecompressionBombError:
        raise too_large from None
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError) as error:
        raise UnusableImage("unreadable") from error
    if not width or not height:
        raise UnusableImage("unreadable")
    orientation = orientation if orientation in range(1, 9) else 1
    # Orientations 5-8 store the picture turned a quarter: upright, width and height swap.
    return ImageFile(path, orientation, (width, height) if orientation >= 5 else (height, width))


def as_image_file(path):
    return path if isinstance(path, ImageFile) else inspect_image(str(path))


def file_name(path):
    """A file's name for messages, printable whatever its bytes."""
    return os.fsencode(os.path.basename(path)).decode("utf-8", "backslashreplace")


def tensorflow_decodes(images):
    """The indices of `images` whose whole file TensorFlow's decoder, the pipeline's, reads.

    In parallel, errors dropped: what is missing failed. A JPEG is decoded
    at 1/8 scale, which still entropy-decodes every block (where damage
    shows) for a fraction of the work.
    """
    if not images:
        return set()

    def check(index, path):
        contents = tf.io.read_file(path)
        shape = tf.cond(tf.io.is_jpeg(contents),
                        lambda: tf.shape(tf.io.decode_jpeg(contents, channels=3, ratio=8)),
                        lambda: tf.shape(tf.io.decode_image(contents, channels=3,
                                                            expand_animations=False)))
        return index, shape  # the shape as an output, so that the decode is not pruned away

    files = tf.data.Dataset.from_tensor_slices((tf.range(len(images)),
                                                [os.fsencode(f.decoded) for f in images]))
    checked = files.map(check, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    return {int(index) for index, _ in checked.ignore_errors().as_numpy_iterator()}


def pillow_pixels(path):
    """An image as Pillow reads it, upright, uint8 RGB; raises UnusableImage."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError,
            Image.DecompressionBombError) as error:
        raise UnusableImage("unreadable") from error


def decoded_copy(image):
    """`image` (which TensorFlow cannot decode) with a PNG copy in DECODED_DIR; raises UnusableImage.

    A file Pillow reads and TensorFlow does not (an AVIF or TIFF under an
    image extension, a 1-bit BMP) is decoded once, upright, into a folder of
    our own: never into the user's. The copy is named after the file's path,
    size and time, so a changed file gets a new one.
    """
    copy = Path(DECODED_DIR) / f"{file_key(image)}.png"
    if not copy.is_file():
        pixels = pillow_pixels(image)
        try:
            copy.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(copy) as tmp:
                write_png(tmp, pixels)
        except (OSError, tf.errors.OpError) as error:
            if not copy.is_file():  # not written meanwhile by another run
                raise config.DataError(f"cannot write the decoded copy of {image!a} into {copy.parent} "
                                       f"({config.one_line(error)})") from None
    return ImageFile(image, 1, decoded=str(copy))


def file_key(path):
    """A name for the file at `path` as it is now: of its absolute path, size and modification
    time, so a changed file gets another. Raises UnusableImage for a file that is gone."""
    try:
        info = os.stat(path)
    except OSError as error:  # gone since its header was read
        raise UnusableImage("unreadable") from error
    key = hashlib.sha256(b"\0".join([os.fsencode(os.path.abspath(path)),
                                     str(info.st_size).encode(), str(info.st_mtime_ns).encode()]))
    return key.hexdigest()[:32]


def checks_file(folder):
    """Where the decode checks of the image folder `folder` are remembered, by its absolute path."""
    name = hashlib.sha256(os.fsencode(os.path.abspath(folder))).hexdigest()[:32]
    return Path(CHECKED_DIR) / f"{name}.json"


def known_decodes(folder):
    """{file_key: whether TensorFlow decodes that file} of an earlier check of `folder`; a
    missing or damaged record is none."""
    try:
        known = json.loads(checks_file(folder).read_text(encoding="utf-8"))
        return {key: value for key, value in known.items() if isinstance(value, bool)}
    except (OSError, ValueError, AttributeError):  # AttributeError: JSON, but not an object
        return {}


def remember_decodes(folder, decodes):
    """Record the checks of `folder` for the next start; where that fails, it checks again."""
    path = checks_file(folder)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps(decodes), encoding="utf-8")
    except (OSError, config.UserError):
        pass


def usable_images(files, folder, remember=True):
    """The files the pipeline can decode, as ImageFiles; one SkippedImagesWarning names the rest.

    The pipeline's own decoder (TensorFlow) reads each file whole here, so
    what passes is exactly what trains and the count printed is the count
    used; Pillow, the other decoder, reads headers, and the files TensorFlow
    cannot decode (decoded_copy). What TensorFlow's decoder found of a file
    is remembered (in CHECKED_DIR) until the file changes: a second start
    of the same dataset decodes none of it again (unless not `remember`:
    a worker other than the chief writes nothing).
    """
    headers, skipped = [], {}  # headers: (ImageFile, file_key)

    def skip(path, why):
        skipped.setdefault(str(why), []).append(file_name(path))

    for path in files:
        try:
            image = inspect_image(path)
            headers.append((image, file_key(image)))
        except UnusableImage as why:
            skip(path, why)
    known = known_decodes(folder)
    unchecked = [(image, key) for image, key in headers if key not in known]
    found = tensorflow_decodes([image for image, _ in unchecked])
    decodes = {key: known[key] for _, key in headers if key in known}
    decodes.update((key, index in found) for index, (_, key) in enumerate(unchecked))
    if remember and decodes != known:
        remember_decodes(folder, decodes)
    usable = []
    for image, key in headers:
        try:
            usable.append(image if decodes[key] else decoded_copy(image))
        except UnusableImage as why:
            skip(image, why)
    if skipped:
        unreadable = skipped.pop("unreadable", [])
        parts = [f"{len(unreadable)} unreadable image(s) in {folder}: " + ", ".join(unreadable)] \
            if unreadable else []
        parts += [f"{name} ({why})" for why, names in skipped.items() for name in names]
        warnings.warn("skipping " + "; ".join(parts), SkippedImagesWarning)
    return usable


def upright(image, orientation):
    """Turn a decoded image as its EXIF orientation (1-8) says the camera was held.

    Every orientation is a transpose or not, then flips; tf.cond keeps the
    graph stateless, which a checkpoint of the input pipeline requires.
    """
    orientation = tf.cast(orientation, tf.int32)
    flip = lambda x, axis, wanted: tf.cond(wanted, lambda: tf.reverse(x, [axis]), lambda: x)
    image = tf.cond(orientation >= 5, lambda: tf.transpose(image, [1, 0, 2]), lambda: image)
    image = flip(image, 1, tf.reduce_any(orientation == [2, 3, 6, 7]))
    return flip(image, 0, tf.reduce_any(orientation == [3, 4, 7, 8]))


def decode(path, orientation):
    """A file's pixels as uint8 RGB, upright; `path` as bytes, so any file name works."""
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    return upright(image, orientation)


def read_pixels(path):
    """One image file, upright, as uint8 HxWx3; raises UnusableImage.

    Decoded as the pipeline decodes it; a file TensorFlow cannot decode (see
    decoded_copy) is read by Pillow, in memory: one image needs no copy.
    """
    image = as_image_file(path)
    try:
        return decode(os.fsencode(image.decoded), image.orientation).numpy()
    except tf.errors.OpError:
        return pillow_pixels(image.decoded)


def write_png(path, image):
    tf.io.write_file(str(path), tf.io.encode_png(image))


def read_image(path):
    """One usable image file, upright at its own size, as HxWx3 float32 in [-1, 1].

    Raises UnusableImage for a file that cannot be read or is too large.
    """
    return np.asarray(to_network(read_pixels(path)))


def write_image(path, image):
    """Write a [-1, 1] image; the file name's extension picks the format."""
    image_format = Image.registered_extensions().get(Path(path).suffix.lower(), "PNG")
    with atomic_write(path) as tmp:
        Image.fromarray(np.asarray(to_uint8(image))).save(tmp, format=image_format)


def to_unit(images):
    """[-1, 1] network pixels back to [0, 1] for display and scoring."""
    return np.clip((np.asarray(images) + 1.0) / 2.0, 0.0, 1.0)


def to_network(levels):
    """0-255 levels (uint8 or float, NumPy or TensorFlow) as float32 network pixels in [-1, 1]."""
    return tf.cast(levels, tf.float32) / 127.5 - 1.0


def to_uint8(images):
    """[-1, 1] network pixels as uint8 levels (a tensor; np.asarray it for NumPy)."""
    return tf.cast(tf.round((tf.clip_by_value(images, -1.0, 1.0) + 1.0) * 127.5), tf.uint8)
