"""Datasets: finding or downloading them, the demo data, the tf.data pipeline.

A dataset is a folder in the layout of the official CycleGAN zips:
trainA/, trainB/, testA/, testB/ (and, where the truth is known,
testA_truth/ with G_AB's ideal output under the same file names).
"""
import contextlib
import os
import shutil
import socket
import warnings
from pathlib import Path

import numpy as np
import tensorflow as tf

from config import UserError

OFFICIAL_DATASETS = (
    "apple2orange", "summer2winter_yosemite", "horse2zebra", "monet2photo",
    "cezanne2photo", "ukiyoe2photo", "vangogh2photo", "maps", "cityscapes",
    "facades", "iphone2dslr_flower", "ae_photos",
)
OFFICIAL_URL = "https://people.eecs.berkeley.edu/~taesung_park/CycleGAN/datasets/{}.zip"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
DOWNLOAD_TIMEOUT_S = 15


class DataError(UserError):
    """A dataset problem the user must fix; its message is one line."""


class SkippedImagesWarning(UserWarning):
    """Some image files could not be read and are left out."""


def resolve_dataset(data, datasets_dir="datasets"):
    """Path of the dataset folder for `--data`: a path, `demo`, or an official name."""
    if data == "demo":
        return make_demo_dataset(Path(datasets_dir) / "demo")
    if data == "photos":
        return make_photo_dataset(Path(datasets_dir) / "photos")
    if data in OFFICIAL_DATASETS:
        folder = Path(datasets_dir) / data
        return folder if folder.is_dir() else download_official(data, datasets_dir)
    folder = Path(data)
    if not folder.is_dir():
        raise DataError(f"--data {data!r} is neither a folder nor one of: demo, photos, "
                        + ", ".join(OFFICIAL_DATASETS))
    return folder


def download_official(name, datasets_dir):
    """Download and unzip an official CycleGAN dataset into datasets_dir/name."""
    url = OFFICIAL_URL.format(name)
    root = Path(datasets_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    try:
        import keras
        with download_timeout():
            archive = keras.utils.get_file(f"{name}.zip", url, cache_dir=str(root), cache_subdir=".")
    except Exception as error:
        raise DataError(f"could not download {name} ({one_line(error)}); fetch {url} by hand and "
                        f"unzip it so that {root / name}/trainA and trainB exist") from None
    shutil.unpack_archive(archive, root)
    os.remove(archive)
    return root / name


@contextlib.contextmanager
def download_timeout():
    """Bound every socket operation: keras.utils.get_file itself never times out."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def one_line(error):
    """The first line of an exception's message, or its type when it has none."""
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def list_images(folder):
    """Image files in `folder`, sorted, hidden files and other types left out."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"missing folder {folder}")
    return sorted(str(p) for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_EXTENSIONS)


def is_readable_image(path):
    """True when TensorFlow can decode the file as a non-empty image."""
    try:
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        return image.shape[0] > 0 and image.shape[1] > 0
    except (tf.errors.OpError, ValueError):
        return False


def domain_files(root, split, domain, limit=0):
    """Readable images of one split/domain (e.g. train, A); warns about the rest."""
    folder = Path(root) / f"{split}{domain}"
    files = list_images(folder)
    if limit:
        files = files[:limit]
    bad = [f for f in files if not is_readable_image(f)]
    if bad:
        warnings.warn(f"skipping {len(bad)} unreadable image(s) in {folder}: "
                      + ", ".join(os.path.basename(f) for f in bad), SkippedImagesWarning)
        files = [f for f in files if f not in bad]
    if not files:
        raise DataError(f"no usable images in {folder}")
    return files


def load_image(path, size):
    """Decode any supported file to RGB, resize to size x size, scale to [-1, 1]."""
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    image = tf.image.resize(tf.cast(image, tf.float32), (size, size), antialias=True)
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
    ds = tf.data.Dataset.from_tensor_slices(files)
    ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True).repeat()
    ds = tf.data.Dataset.zip(ds, tf.data.Dataset.random(seed=seed).batch(2))
    ds = ds.map(lambda p, s: augment(load_image(p, load_px), cfg.image_size, s),
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


def write_paired_dataset(folder, items):
    """Write a generated dataset once, staged and moved into place only when complete.

    `items` yields (split, file name, image A, image B, truth of A or None),
    uint8 images; it is not consumed at all when the dataset already exists.
    """
    folder = Path(folder)
    if (folder / "testA_truth").is_dir():
        return folder
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    for sub in ("trainA", "trainB", "testA", "testB", "testA_truth"):
        (staging / sub).mkdir(parents=True)
    for split, name, image_a, image_b, truth in items:
        write_png(staging / f"{split}A" / name, image_a)
        write_png(staging / f"{split}B" / name, image_b)
        if truth is not None:
            write_png(staging / "testA_truth" / name, truth)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)
    return folder


# --- Real photographs with a known translation --------------------------

# scikit-image's bundled colour photographs (no download); the last two are the test split.
PHOTO_NAMES = ("astronaut", "rocket", "stereo_motorcycle", "hubble_deep_field",
               "immunohistochemistry", "chelsea", "coffee")
PHOTO_TEST_COUNT = 2
PHOTO_PATCH = 64              # pixels of each patch, cut from the photo at half size
PHOTO_PATCHES = {"train": 64, "test": 24}   # per source photo, half to A, half to B


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
        raise DataError("--data photos needs scikit-image (a development-only dependency): "
                        "pip install scikit-image") from None
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


def make_photo_dataset(folder, photos=None):
    """Write (once) patches of real photographs with photo_grading as the A->B truth.

    Train and test come from different photos; within a split, B holds
    the grading of other patches than A (unpaired), and testA_truth/ the
    grading of each testA patch. `photos` ({name: image}) defaults to
    scikit-image's, in PHOTO_NAMES order; the last PHOTO_TEST_COUNT are test.
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
                    truth = photo_grading(patch_a) if split == "test" else None
                    yield split, f"{name}_{i:03d}.png", patch_a, photo_grading(patch_b), truth
    return write_paired_dataset(folder, items())


def write_png(path, image):
    tf.io.write_file(str(path), tf.io.encode_png(image))


def read_image(path):
    """One image file at its own size as HxWx3 float32 in [-1, 1]."""
    try:
        image = tf.io.decode_image(tf.io.read_file(str(path)), channels=3, expand_animations=False)
    except (tf.errors.OpError, ValueError):
        raise DataError(f"cannot read image {path}") from None
    return image.numpy().astype(np.float32) / 127.5 - 1.0


def atomic_path(path):
    """A temporary sibling to write to before `os.replace`, keeping the suffix."""
    path = Path(path)
    return path.with_name(f".{path.stem}.tmp{path.suffix}")


def write_image(path, image):
    """Write a [-1, 1] image; the file name's extension picks the format."""
    from PIL import Image
    pixels = np.round((np.clip(image, -1, 1) + 1) * 127.5).astype(np.uint8)
    tmp = atomic_path(path)
    Image.fromarray(pixels).save(tmp, format=Image.registered_extensions().get(Path(path).suffix.lower(), "PNG"))
    os.replace(tmp, path)


# placeholder until merged
def download(urls, target):
    """Fetch the first of `urls` that answers into `target`, complete or not at all."""
    import urllib.request
    target = Path(target)
    tmp = atomic_path(target)
    tried = []
    for url in urls:
        try:
            with download_timeout(), urllib.request.urlopen(url) as response, open(tmp, "wb") as out:
                shutil.copyfileobj(response, out)
            os.replace(tmp, target)
            return target
        except OSError as error:
            tried.append(f"{url} ({one_line(error)})")
        finally:
            tmp.unlink(missing_ok=True)
    raise DataError("could not download " + "; ".join(tried))
