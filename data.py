"""Datasets: finding or downloading them, the demo data, the tf.data pipeline.

A dataset is a folder in the layout of the official CycleGAN zips:
trainA/, trainB/, testA/, testB/ (and, where the truth is known,
testA_truth/ with G_AB's ideal output under the same file names).
"""
import contextlib
import os
import shutil
import socket
import stat
import warnings
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
import tensorflow as tf
from PIL import Image, UnidentifiedImageError

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
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
DOWNLOAD_TIMEOUT_S = 15
# Photos barely compress, so an archive that would grow 20-fold is not a dataset.
MAX_EXPANSION = 20
MAX_UNPACKED_BYTES = 16 * 2 ** 30
# PIL's own decompression-bomb bound (about 89 megapixels): a larger image is skipped.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS
EXIF_ORIENTATION = 0x0112     # the EXIF tag a camera sets when held sideways or upside down


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
    return [template.format(name=name) for template in templates]


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
            download(urls, archive, check=lambda path: check_archive(path, name))
        except DataError as error:
            raise DataError(f"could not download {name}.zip ({error}); fetch it by hand from "
                            f"{' or '.join(urls)} and unzip it so that {root / name}/trainA "
                            "and trainB exist") from None
    unpack_archive(archive, root, name)
    archive.unlink()
    return root / name


def download(urls, target, check=None):
    """Fetch the first of `urls` that gives a good file into `target`, whole or not at all.

    Each try writes to a hidden sibling and is renamed into place only after
    `check(path)` (which raises DataError for a bad file) passes; raises
    DataError naming every URL tried and why it failed.
    """
    import keras
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(target.parent, os.W_OK):
        raise DataError(f"cannot write to {target.parent}")
    part = target.with_name(f".{target.name}.part")
    reasons = []
    for url in urls:
        try:
            with download_timeout():
                fetched = keras.utils.get_file(part.name, url, cache_dir=str(target.parent),
                                               cache_subdir=".", force_download=True)
            if check:
                check(Path(fetched))
            os.replace(fetched, target)
            return target
        except Exception as error:  # every failure of one URL is a reason to try the next
            reasons.append(f"{url}: {one_line(error)}")
        finally:
            part.unlink(missing_ok=True)
    raise DataError("; ".join(reasons))


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


@contextlib.contextmanager
def download_timeout():
    """Bound every socket operation: keras.utils.get_file itself never times out."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def list_images(folder):
    """Image files in `folder`, sorted, hidden files and other types left out."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"missing folder {folder}")
    return sorted(str(p) for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_EXTENSIONS)


class ImageFile(str):
    """A checked image's path that also carries its EXIF orientation (1 = upright)."""

    def __new__(cls, path, orientation=1):
        self = super().__new__(cls, path)
        self.orientation = orientation
        return self


class UnusableImage(Exception):
    """Why one image file is left out."""


def inspect_image(path):
    """The file as an ImageFile, checked without a full decode; raises UnusableImage.

    The header gives size and orientation; PNG chunk checksums and a JPEG's
    1/8-scale decode catch damaged or truncated files.
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
            if image.format == "PNG":
                # Only an eXIf chunk before the pixels: reading one after them is a full decode.
                orientation = image.getexif().get(EXIF_ORIENTATION, 1) if "exif" in image.info else 1
                image.verify()
            else:
                orientation = image.getexif().get(EXIF_ORIENTATION, 1)
                image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
                image.load()
    except Image.DecompressionBombError:
        raise too_large from None
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError) as error:
        raise UnusableImage("unreadable") from error
    if not width or not height:
        raise UnusableImage("unreadable")
    return ImageFile(path, orientation if orientation in range(1, 9) else 1)


def file_name(path):
    """A file's name for messages, printable whatever its bytes."""
    return os.fsencode(os.path.basename(path)).decode("utf-8", "backslashreplace")


def usable_images(files, folder):
    """The files that inspect_image accepts; one SkippedImagesWarning names the rest."""
    usable, skipped = [], {}
    for path in files:
        try:
            usable.append(inspect_image(path))
        except UnusableImage as why:
            skipped.setdefault(str(why), []).append(file_name(path))
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


def orientation_of(path):
    return path.orientation if isinstance(path, ImageFile) else inspect_image(path).orientation


def decode(path, orientation):
    """A file's pixels as uint8 RGB, upright; `path` as bytes, so any file name works."""
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    return upright(image, orientation)


def load_image(path, size, orientation=None):
    """Decode any supported file to upright RGB, resize to size x size, scale to [-1, 1].

    Without `orientation` (one file, eagerly) a file that cannot be used is a DataError.
    """
    if orientation is None:
        try:
            return load_image(os.fsencode(path), size, orientation_of(path))
        except (UnusableImage, tf.errors.OpError) as why:
            reason = why if isinstance(why, UnusableImage) else "unreadable"
            raise DataError(f"cannot use image {os.fsdecode(path)!a}: {reason}") from None
    image = tf.image.resize(tf.cast(decode(path, orientation), tf.float32), (size, size),
                            antialias=True)
    return image / 127.5 - 1.0


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
    of different sizes never pair A[i] with B[i].
    """
    load_px = cfg.load_px
    ds = tf.data.Dataset.from_tensor_slices(([os.fsencode(f) for f in files],
                                             [orientation_of(f) for f in files]))
    ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True).repeat()
    ds = tf.data.Dataset.zip(ds, tf.data.Dataset.random(seed=seed).batch(2))
    ds = ds.map(lambda file, s: augment(load_image(file[0], load_px, file[1]), cfg.image_size, s),
                num_parallel_calls=tf.data.AUTOTUNE)
    # Files were checked at start without a full decode: one whose body is
    # still damaged is dropped here rather than ending a long run.
    ds = ds.ignore_errors()
    return ds.batch(cfg.batch_size * replicas, drop_remainder=True)


def train_dataset(files_a, files_b, cfg, replicas=1):
    """Endless (batch_A, batch_B) pairs of global batches (--batch-size per replica), prefetched."""
    pairs = tf.data.Dataset.zip((domain_dataset(files_a, cfg, cfg.seed, replicas),
                                 domain_dataset(files_b, cfg, cfg.seed + 1, replicas)))
    return pairs.prefetch(tf.data.AUTOTUNE)


def steps_per_epoch(files_a, files_b, cfg, replicas=1):
    """max(|A|, |B|) / global batch, as the official implementation, unless set."""
    return cfg.steps_per_epoch or max(1, max(len(files_a), len(files_b)) // (cfg.batch_size * replicas))


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
    image = inspect_image(str(path))
    try:
        pixels = decode(os.fsencode(image), image.orientation).numpy()
    except (tf.errors.OpError, ValueError) as error:
        raise UnusableImage("unreadable") from error
    return pixels.astype(np.float32) / 127.5 - 1.0


def to_unit(images):
    """[-1, 1] network pixels back to [0, 1] for display and scoring."""
    return np.clip((np.asarray(images) + 1.0) / 2.0, 0.0, 1.0)


def to_uint8(image):
    """[-1, 1] network pixels as uint8 levels."""
    return np.round((np.clip(image, -1, 1) + 1) * 127.5).astype(np.uint8)


def write_image(path, image):
    """Write a [-1, 1] image; the file name's extension picks the format."""
    image_format = Image.registered_extensions().get(Path(path).suffix.lower(), "PNG")
    with atomic_write(path) as tmp:
        Image.fromarray(to_uint8(image)).save(tmp, format=image_format)
