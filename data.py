"""Datasets: finding or downloading them, the demo data, the tf.data pipeline.

A dataset is a folder in the layout of the official CycleGAN zips:
trainA/, trainB/, testA/, testB/ (and, where the truth is known,
testA_truth/ with G_AB's ideal output under the same file names).
"""
import hashlib
import json
import os
import re
import shutil
import stat
import string
import time
import urllib.request
import warnings
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
import tensorflow as tf
from PIL import Image, ImageOps, UnidentifiedImageError

from config import UserError, one_line
from fileio import atomic_write, remove, waiting_lock

OFFICIAL_DATASETS = (
    "apple2orange", "summer2winter_yosemite", "horse2zebra", "monet2photo",
    "cezanne2photo", "ukiyoe2photo", "vangogh2photo", "maps", "cityscapes",
    "facades", "iphone2dslr_flower", "ae_photos",
)
# Tried in order: the official script's current host, then the one it used until 2023.
DATASET_URLS = (
    "http://efrosgans.eecs.berkeley.edu/cyclegan/datasets/{name}.zip",
    "https://people.eecs.berkeley.edu/~taesung_park/CycleGAN/datasets/{name}.zip",
)
# Space-separated URL templates ({name}) used instead, e.g. a mirror or a test server.
DATASET_URL_VARIABLE = "CYCLEGAN_DATASET_URL"
# Each official archive's size in MiB, as its host lists it; a download may be half as large again.
DATASET_MIB = {
    "apple2orange": 75, "summer2winter_yosemite": 127, "horse2zebra": 112, "monet2photo": 292,
    "cezanne2photo": 267, "ukiyoe2photo": 280, "vangogh2photo": 293, "maps": 1409,
    "cityscapes": 267, "facades": 34, "iphone2dslr_flower": 325, "ae_photos": 10,
}
SIZE_MARGIN = 1.5
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
DOWNLOAD_TIMEOUT_S = 15       # to connect, and for each read
# A download that brings less than MIN_RATE bytes a second over RATE_WINDOW_S is given up.
MIN_RATE = 10_000
RATE_WINDOW_S = 60
# Photos barely compress, so an archive that would grow 20-fold is not a dataset.
MAX_EXPANSION = 20
MAX_UNPACKED_BYTES = 16 * 2 ** 30
# PIL's own decompression-bomb bound (about 89 megapixels): a larger image is skipped.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS
EXIF_ORIENTATION = 0x0112     # the EXIF tag a camera sets when held sideways or upside down
# Copies of images only Pillow decodes (decoded_copy), beside the downloaded datasets.
DECODED_DIR = os.path.join("datasets", ".decoded")
# What the start-up check found of each image folder's files (usable_images), there too.
CHECKED_DIR = os.path.join("datasets", ".checked")


class DataError(UserError):
    """A dataset problem the user must fix; its message is one line."""


class SkippedImagesWarning(UserWarning):
    """Some image files could not be read, or are too large, and are left out."""


def resolve_dataset(data, datasets_dir="datasets"):
    """Path of the dataset folder for `--data`: a path, `demo`, or an official name."""
    if data in GENERATED_DATASETS:
        return GENERATED_DATASETS[data](Path(datasets_dir) / data)
    if data in OFFICIAL_DATASETS:
        folder = Path(datasets_dir) / data
        return folder if folder.is_dir() else download_official(data, datasets_dir)
    folder = Path(data)
    if not folder.is_dir():
        raise DataError(f"--data {data!r} is neither a folder nor one of: "
                        + ", ".join((*GENERATED_DATASETS, *OFFICIAL_DATASETS)))
    return folder


def dataset_urls(name):
    templates = os.environ.get(DATASET_URL_VARIABLE, "").split() or DATASET_URLS
    return [url_from_template(template, name, DATASET_URL_VARIABLE) for template in templates]


def url_from_template(template, name, variable):
    """`template` with {name} filled in; one that holds any other {field} is a UserError."""
    try:
        fields = {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
    except ValueError:  # an unmatched brace
        fields = None
    if fields != {"name"}:
        raise UserError(f"{variable} must hold {{name}} and no other {{...}} field, got {template!r}")
    return template.format(name=name)


def download_official(name, datasets_dir):
    """Download, check and unzip an official CycleGAN dataset into datasets_dir/name.

    The archive is kept only once whole (an earlier partial or damaged one
    is fetched again) and is unpacked beside the target, then renamed into
    place, so a kill at any moment never leaves a half dataset.
    """
    root = Path(datasets_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    # Two runs asking for the same dataset: the second waits, then finds it in place.
    with waiting_lock(root / f".{name}.lock"):
        if (root / name).is_dir():
            return root / name
        return fetch_and_unpack(name, root)


def fetch_and_unpack(name, root):
    """The archive (kept, or downloaded again if damaged) unpacked into root/name."""
    archive = root / f"{name}.zip"
    urls = dataset_urls(name)
    if archive.exists():
        try:
            check_archive(archive, name)
        except DataError:
            archive.unlink()
    if not archive.exists():
        try:
            download(urls, archive, int(DATASET_MIB[name] * SIZE_MARGIN * 2 ** 20),
                     check=lambda path: check_archive(path, name))
        except DataError as error:
            raise DataError(f"could not download {name}.zip ({error}); fetch it by hand from "
                            f"{' or '.join(urls)} and unzip it so that {root / name}/trainA "
                            "and trainB exist") from None
    unpack_archive(archive, root, name)
    archive.unlink()
    return root / name


def download(urls, target, max_bytes, check=None):
    """Fetch the first of `urls` that gives a good file into `target`, whole or not at all.

    Each try writes to a hidden sibling and is renamed into place only after
    `check(path)` (which raises DataError for a bad file) passes; raises
    DataError naming every URL tried and why it failed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(target.parent, os.W_OK):
        raise DataError(f"cannot write to {target.parent}")
    part = target.with_name(f".{target.name}.part")
    reasons = []
    for url in urls:
        try:
            fetch(url, part, max_bytes)
            if check:
                check(part)
            os.replace(part, target)
            return target
        except Exception as error:  # every failure of one URL is a reason to try the next
            reasons.append(f"{url}: {one_line(error)}")
        finally:
            part.unlink(missing_ok=True)
    raise DataError("; ".join(reasons))


def fetch(url, path, max_bytes):
    """Stream `url` into the file `path`, at most `max_bytes`, at least MIN_RATE; raises on failure.

    Our own loop rather than keras.utils.get_file, which has neither bound:
    its socket timeout applies to each read, a server that trickles a byte
    at a time never trips it, and an endless body fills the disk. read1
    returns what each read brings, so the rate is checked as bytes come.
    """
    import keras
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, \
            open(path, "wb") as out:
        announced = int(response.headers.get("Content-Length") or 0)
        if announced > max_bytes:
            raise DataError(f"it announces {announced} bytes, more than the {max_bytes} expected")
        progress = keras.utils.Progbar(announced / 2 ** 20 or None, unit_name="MiB")
        done, window_start, window_done = 0, time.monotonic(), 0
        while chunk := response.read1(2 ** 16):
            done += len(chunk)
            if done > max_bytes:
                raise DataError(f"it sends more than the {max_bytes} bytes expected")
            out.write(chunk)
            progress.update(done / 2 ** 20)
            now = time.monotonic()
            if now - window_start >= RATE_WINDOW_S:
                if done - window_done < MIN_RATE * (now - window_start):
                    raise DataError(f"it sends less than {MIN_RATE} bytes a second")
                window_start, window_done = now, done


def check_archive(path, name):
    """Raise DataError unless `path` is a whole zip that unpacks only files under name/."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            for info in infos:
                check_archive_entry(info, name)
            unpacked = sum(info.file_size for info in infos)
            if unpacked > min(MAX_UNPACKED_BYTES, MAX_EXPANSION * path.stat().st_size):
                raise DataError(f"{path.name} would unpack {path.stat().st_size} bytes into "
                                f"{unpacked} bytes, more than a dataset can; not unpacked")
            damaged = archive.testzip()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as error:
        raise DataError(f"{path.name} is not a complete zip archive ({one_line(error)})") from None
    if damaged:
        raise DataError(f"{path.name} is damaged: {damaged} fails its checksum")


def check_archive_entry(info, name):
    """Only plain files and folders below name/: no absolute path, no '..', no link."""
    parts = PurePosixPath(info.filename).parts
    inside = (len(parts) > 1 or info.is_dir()) and parts[:1] == (name,)
    if not inside or ".." in parts or "\\" in info.filename or info.filename.startswith("/"):
        raise DataError(f"the archive for {name} holds {info.filename!r}, outside {name}/; "
                        "not unpacked")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise DataError(f"the archive for {name} holds a link, {info.filename!r}; not unpacked")


def unpack_archive(archive, root, name):
    """Unzip a checked archive into a staging folder, then rename root/name into place."""
    staging = root / f".{name}.unpacking"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with zipfile.ZipFile(archive) as zipped:
            zipped.extractall(staging)
        os.replace(staging / name, root / name)
    except OSError as error:
        raise DataError(f"could not unpack {archive} into {root} ({one_line(error)})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def op_error_text(error):
    """A TensorFlow error's own words, without the function, node and op it names."""
    text = re.sub(r"\{\{[^}]*\}\}\s*", "", one_line(getattr(error, "message", error)))
    return re.sub(r".*Iterator::\S+: ", "", text).split(" [Op:")[0].strip()


def list_images(folder, extensions=IMAGE_EXTENSIONS):
    """Image files (or files of other `extensions`) in `folder`, sorted, hidden files left out."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"missing folder {folder}")
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
                raise DataError(f"cannot write the decoded copy of {image!a} into {copy.parent} "
                                f"({one_line(error)})") from None
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
    except (OSError, UserError):
        pass


def usable_images(files, folder):
    """The files the pipeline can decode, as ImageFiles; one SkippedImagesWarning names the rest.

    The pipeline's own decoder (TensorFlow) reads each file whole here, so
    what passes is exactly what trains and the count printed is the count
    used; Pillow, the other decoder, reads headers, and the files TensorFlow
    cannot decode (decoded_copy). What TensorFlow's decoder found of a file
    is remembered (in CHECKED_DIR) until the file changes: a second start
    of the same dataset decodes none of it again.
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
    if decodes != known:
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


def domain_files(root, split, domain, limit=0):
    """Usable images of one split/domain (e.g. train, A); warns about the rest."""
    folder = Path(root) / f"{split}{domain}"
    files = list_images(folder)
    if limit:
        files = files[:limit]
    files = usable_images(files, folder)
    if not files:
        raise DataError(f"no usable images in {folder}")
    return files


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


def scaled(image, size):
    """uint8 pixels resized to size x size, in [-1, 1]."""
    return to_network(tf.image.resize(tf.cast(image, tf.float32), (size, size), antialias=True))


def load_image(path, size, orientation=None):
    """Decode any supported file to upright RGB, resize to size x size, scale to [-1, 1].

    Without `orientation` (one file, eagerly) a file that cannot be used is a DataError.
    """
    if orientation is not None:
        return scaled(decode(path, orientation), size)
    try:
        return scaled(read_pixels(path), size)
    except UnusableImage as why:
        raise DataError(f"cannot use image {os.fsdecode(path)!a}: {why}") from None


def augment(image, crop_size, seed):
    """Random crop to crop_size (a no-op when already that size), random flip.

    Stateless ops with a per-image seed: a checkpoint can then save the
    input pipeline's position, which stateful random ops forbid.
    """
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    image = tf.image.stateless_random_crop(image, (crop_size, crop_size, 3), seed=crop_seed)
    return tf.image.stateless_random_flip_left_right(image, seed=flip_seed)


def domain_dataset(files, cfg, seed, replicas=1):
    """Endless shuffled, augmented, batched images of one domain.

    Each domain reshuffles on its own as it runs out, so unpaired domains
    of different sizes never pair A[i] with B[i]. Nothing is dropped:
    usable_images decoded every file as this pipeline does, so an error here
    (next_batch reports it) is a file changed or removed since, and ends the
    run rather than a search for readable images that may never end.
    """
    load_px = cfg.load_px
    images = [as_image_file(f) for f in files]
    ds = tf.data.Dataset.from_tensor_slices(([os.fsencode(f.decoded) for f in images],
                                             [f.orientation for f in images]))
    ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True).repeat()
    ds = tf.data.Dataset.zip(ds, tf.data.Dataset.random(seed=seed).batch(2))
    ds = ds.map(lambda file, s: augment(load_image(file[0], load_px, file[1]), cfg.image_size, s),
                num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(cfg.batch_size * replicas, drop_remainder=True)


def train_dataset(files_a, files_b, cfg, replicas=1):
    """Endless (batch_A, batch_B) pairs of global batches (--batch-size per replica), prefetched."""
    pairs = tf.data.Dataset.zip((domain_dataset(files_a, cfg, cfg.seed, replicas),
                                 domain_dataset(files_b, cfg, cfg.seed + 1, replicas)))
    return pairs.prefetch(tf.data.AUTOTUNE)


def steps_per_epoch(files_a, files_b, cfg, replicas=1):
    """max(|A|, |B|) / global batch, as the official implementation, unless set."""
    return cfg.steps_per_epoch or max(1, max(len(files_a), len(files_b)) // (cfg.batch_size * replicas))


def next_batch(batches):
    """The next (A, B) pair of an iterator of train_dataset; a failed read is a DataError."""
    try:
        return next(batches)
    except (tf.errors.NotFoundError, tf.errors.PermissionDeniedError, tf.errors.InvalidArgumentError,
            tf.errors.DataLossError) as error:
        raise DataError(f"a training image can no longer be read ({op_error_text(error)}); was the "
                        "dataset moved, deleted or changed during the run? Training stopped; put "
                        "it back and continue with --resume") from None


def load_batch(files, size):
    """A fixed batch of images (no augmentation) for samples and evaluation."""
    return tf.stack([load_image(f, size) for f in files])


# --- Built-in demo data -------------------------------------------------

DEMO_SIZE = 64
DEMO_COUNTS = {"train": 120, "test": 8}


def demo_translation(image):
    """The demo's known A->B mapping: a colour negative (uint8 in, uint8 out)."""
    return 255 - image


def demo_scene(rng, size=DEMO_SIZE):
    """A pale background with a few saturated warm shapes (uint8 HxWx3)."""
    yy, xx = np.mgrid[0:size, 0:size]
    image = np.empty((size, size, 3), np.float32)
    image[:] = rng.uniform(200, 250, 3)
    for _ in range(rng.integers(2, 5)):
        colour = rng.uniform([150, 20, 0], [255, 160, 60])
        cy, cx = rng.uniform(0, size, 2)
        r = rng.uniform(size / 10, size / 4)
        if rng.random() < 0.5:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
        else:
            mask = (abs(yy - cy) < r) & (abs(xx - cx) < r * rng.uniform(0.4, 1.0))
        image[mask] = colour
    return np.clip(image, 0, 255).astype(np.uint8)


def make_demo_dataset(folder):
    """Write (once) a small two-domain dataset with a known A->B truth.

    Domain B holds the demo translation of other scenes than domain A, so
    the training data is unpaired; testA_truth/ holds the translation of
    each testA image.
    """
    def items():
        rng = np.random.default_rng(1234)
        for split, count in DEMO_COUNTS.items():
            for i in range(count):
                scene_a = demo_scene(rng)
                scene_b = demo_translation(demo_scene(rng))
                truth = demo_translation(scene_a) if split == "test" else None
                yield split, f"{i:04d}.png", scene_a, scene_b, truth
    return write_paired_dataset(folder, items())


# Inside every dataset this program generates: a datasets/NAME without it is the user's own.
GENERATED_MARK = ".generated-by-cyclegan-keras"


def write_paired_dataset(folder, items):
    """Write a generated dataset once: one process at a time, staged in a hidden folder and
    renamed into place only when complete, then marked as generated.

    `items` yields (split, file name, image A, image B, truth of A or None),
    uint8 images; it is not consumed at all when the dataset already exists.
    A folder of that name without the mark is never replaced.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with waiting_lock(folder.with_name(f".{folder.name}.lock")):
        if (folder / GENERATED_MARK).is_file():
            return folder
        if os.path.lexists(folder):
            raise DataError(f"{folder} exists and was not generated by this program; it is never "
                            f"replaced: train on it with --data {folder}/ or move it away")
        staging = folder.with_name(f".{folder.name}.partial")
        remove(staging)  # a killed writer's leftovers; never the dataset itself
        for sub in ("trainA", "trainB", "testA", "testB", "testA_truth"):
            (staging / sub).mkdir(parents=True)
        for split, name, image_a, image_b, truth in items:
            write_png(staging / f"{split}A" / name, image_a)
            write_png(staging / f"{split}B" / name, image_b)
            if truth is not None:
                write_png(staging / "testA_truth" / name, truth)
        (staging / GENERATED_MARK).write_text("Generated by cyclegan-keras; safe to delete.\n")
        os.replace(staging, folder)
    return folder


# --- Real photographs with a known translation --------------------------

# scikit-image's bundled colour photographs (no download); the last two are the test split.
PHOTO_NAMES = ("astronaut", "rocket", "stereo_motorcycle", "hubble_deep_field",
               "immunohistochemistry", "chelsea", "coffee")
PHOTO_TEST_COUNT = 2
PHOTO_PATCH = 64              # pixels of each patch, cut from the photo at half size
PHOTO_PATCHES = {"train": 64, "test": 24}   # per source photo, half to A, half to B
# The painterly look: quadrants of PAINT_RADIUS + 1 pixels (at 64 px: strokes that survive
# training at 32 px), and saturation times PAINT_SATURATION.
PAINT_RADIUS = 3
PAINT_SATURATION = 1.3


def photo_grading(image):
    """The photo dataset's known A->B mapping: a warm, faded film grade (uint8 in, uint8 out).

    A channel mix that warms highlights and tints shadows blue, then lifted
    blacks and a gamma: strong enough that doing nothing scores poorly.
    """
    x = image.astype(np.float32) / 255.0
    mix = np.array([[0.95, 0.30, 0.00], [0.10, 0.80, 0.10], [0.05, 0.15, 0.55]], np.float32)
    x = np.clip(x @ mix.T + np.array([0.02, 0.02, 0.15], np.float32), 0.0, 1.0) ** 0.75
    return np.round(x * 255.0).astype(np.uint8)


def skimage_photos():
    """{name: uint8 HxWx3} of PHOTO_NAMES, read from the installed scikit-image."""
    try:
        import skimage.data
    except ImportError:
        raise DataError("--data photos and --data painterly need scikit-image (a development-only "
                        "dependency): pip install scikit-image") from None
    photos = {}
    for name in PHOTO_NAMES:
        image = getattr(skimage.data, name)()
        photos[name] = image[0] if isinstance(image, tuple) else image  # stereo: left view
    return photos


def photo_patches(image, count, rng):
    """`count` random PHOTO_PATCH-pixel squares of `image` taken at half resolution."""
    half = np.asarray(tf.image.resize(image, (image.shape[0] // 2, image.shape[1] // 2),
                                      antialias=True)).round().astype(np.uint8)
    ys = rng.integers(0, half.shape[0] - PHOTO_PATCH + 1, count)
    xs = rng.integers(0, half.shape[1] - PHOTO_PATCH + 1, count)
    return [half[y:y + PHOTO_PATCH, x:x + PHOTO_PATCH] for y, x in zip(ys, xs)]


def painterly(image):
    """The painterly dataset's known A->B mapping: an oil-paint look (uint8 in, uint8 out).

    A Kuwahara filter (each pixel takes the mean colour of whichever of its
    four overlapping quadrants is most uniform in luminance) flattens
    texture into strokes while keeping edges, then saturation rises by
    PAINT_SATURATION. Local and non-linear: no colour map of A reproduces it.
    """
    x = image.astype(np.float32) / 255.0
    r, k = PAINT_RADIUS, PAINT_RADIUS + 1
    padded = np.pad(x, ((r, r), (r, r), (0, 0)), mode="reflect")
    luma = padded @ np.array([0.299, 0.587, 0.114], np.float32)

    def box_mean(values):  # mean of every k x k window, indexed by its top-left corner
        sums = np.pad(values, ((1, 0), (1, 0)) + ((0, 0),) * (values.ndim - 2)).cumsum(0).cumsum(1)
        return (sums[k:, k:] - sums[:-k, k:] - sums[k:, :-k] + sums[:-k, :-k]) / (k * k)

    means, variances = box_mean(padded), box_mean(luma ** 2) - box_mean(luma) ** 2
    h, w = image.shape[:2]
    corners = [(dy, dx) for dy in (0, r) for dx in (0, r)]  # the four quadrants of each pixel
    variance = np.stack([variances[dy:dy + h, dx:dx + w] for dy, dx in corners])
    colour = np.stack([means[dy:dy + h, dx:dx + w] for dy, dx in corners])
    painted = np.take_along_axis(colour, variance.argmin(0)[None, ..., None], 0)[0]
    grey = (painted @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
    painted = np.clip(grey + PAINT_SATURATION * (painted - grey), 0.0, 1.0)
    return np.round(painted * 255.0).astype(np.uint8)


def make_photo_dataset(folder, photos=None, translation=photo_grading):
    """Write (once) patches of real photographs with `translation` as the A->B truth.

    Train and test come from different photos; within a split, B holds
    the translation of other patches than A (unpaired), and testA_truth/
    the translation of each testA patch. `photos` ({name: image}) defaults
    to scikit-image's, in PHOTO_NAMES order; the last PHOTO_TEST_COUNT are test.
    """
    def items():
        images = skimage_photos() if photos is None else photos
        names = list(images)
        splits = {"train": names[:-PHOTO_TEST_COUNT], "test": names[-PHOTO_TEST_COUNT:]}
        rng = np.random.default_rng(1234)
        for split, split_names in splits.items():
            for name in split_names:
                patches = photo_patches(images[name], PHOTO_PATCHES[split], rng)
                for i, (patch_a, patch_b) in enumerate(zip(patches[::2], patches[1::2])):
                    truth = translation(patch_a) if split == "test" else None
                    yield split, f"{name}_{i:03d}.png", patch_a, translation(patch_b), truth
    return write_paired_dataset(folder, items())


def make_painterly_dataset(folder, photos=None):
    """Write (once) the photo dataset's patches with `painterly` as the A->B truth."""
    return make_photo_dataset(folder, photos, painterly)


# Datasets made on the spot, by --data name: a new source is a function and a line here.
GENERATED_DATASETS = {"demo": make_demo_dataset, "photos": make_photo_dataset,
                      "painterly": make_painterly_dataset}


def write_png(path, image):
    tf.io.write_file(str(path), tf.io.encode_png(image))


def read_image(path):
    """One usable image file, upright at its own size, as HxWx3 float32 in [-1, 1].

    Raises UnusableImage for a file that cannot be read or is too large.
    """
    return np.asarray(to_network(read_pixels(path)))


def to_unit(images):
    """[-1, 1] network pixels back to [0, 1] for display and scoring."""
    return np.clip((np.asarray(images) + 1.0) / 2.0, 0.0, 1.0)


def to_network(levels):
    """0-255 levels (uint8 or float, NumPy or TensorFlow) as float32 network pixels in [-1, 1]."""
    return tf.cast(levels, tf.float32) / 127.5 - 1.0


def to_uint8(images):
    """[-1, 1] network pixels as uint8 levels (a tensor; np.asarray it for NumPy)."""
    return tf.cast(tf.round((tf.clip_by_value(images, -1.0, 1.0) + 1.0) * 127.5), tf.uint8)


def write_image(path, image):
    """Write a [-1, 1] image; the file name's extension picks the format."""
    image_format = Image.registered_extensions().get(Path(path).suffix.lower(), "PNG")
    with atomic_write(path) as tmp:
        Image.fromarray(np.asarray(to_uint8(image))).save(tmp, format=image_format)
