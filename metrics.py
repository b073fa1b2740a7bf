"""How good is a run: cycle, identity and paired-truth scores, FID/KID, `main.py evaluate`.

Every image score is computed on [0, 1] pixels, per image, then averaged.
Names end in the domain of the images scored: cycle_L1_A is A->B->A.
"""
import hashlib
import json
from collections import defaultdict
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from keras.applications.inception_v3 import preprocess_input

import config
import data
import download
import image_files
import models
import report
from config import UserError
from fileio import atomic_write
from run_folder import RunFolder

EVAL_BATCH = 8          # images per generator call: memory stays flat on any test set
PROBE_IMAGES = 8        # per domain, scored at every sample epoch of a training run
PSNR_CAP_DB = 100.0     # identical images would give infinity, which JSON cannot hold
KID_SUBSET = 1000       # as Binkowski et al.
KID_SUBSETS = 100
INCEPTION_PX = 299
# Keras's InceptionV3 ImageNet weights without the top (its address and MD5), fetched
# through download.download, which bounds size and time as keras.applications does not.
INCEPTION_URL = ("https://storage.googleapis.com/tensorflow/keras-applications/inception_v3/"
                 "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5")
INCEPTION_MD5 = "bcbd6486424b2319ff4ef7d526e38f63"
INCEPTION_MAX_BYTES = 128 * 2 ** 20  # the file is 88 MB
INCEPTION_FILE = Path("datasets") / ".models" / "inception_v3_notop.weights.h5"

class FeaturesUnavailable(Exception):
    """No Inception features (no weights, too few images): FID/KID are skipped."""


# --- Image scores ----------------------------------------------------------

def l1(x, y):
    return np.mean(np.abs(x - y), axis=(1, 2, 3))


def psnr(x, y):
    mse = np.mean((x - y) ** 2, axis=(1, 2, 3))
    return 10 * np.log10(1.0 / np.maximum(mse, 10 ** (-PSNR_CAP_DB / 10)))


def ssim(x, y):
    return tf.image.ssim(tf.constant(x), tf.constant(y), max_val=1.0).numpy()


def batch_scores(x, forward, backward, domain, truth=None):
    """Per-image scores of a [-1, 1] batch x of `domain`; paired-truth ones given `truth`.

    forward maps x to the other domain, backward (None for a model without one: CUT) maps
    back into `domain`.
    """
    fake = forward(x, training=False)
    x01 = image_files.to_unit(x)
    scores = {}
    if backward is not None:
        rec = image_files.to_unit(backward(fake, training=False))
        same = image_files.to_unit(backward(x, training=False))
        scores = {f"cycle_L1_{domain}": l1(rec, x01), f"cycle_PSNR_{domain}": psnr(rec, x01),
                  f"identity_L1_{domain}": l1(same, x01)}
    if truth is not None:
        fake01, truth01 = image_files.to_unit(fake), image_files.to_unit(truth)
        scores.update(truth_PSNR=psnr(fake01, truth01), baseline_PSNR=psnr(x01, truth01),
                      truth_SSIM=ssim(fake01, truth01), baseline_SSIM=ssim(x01, truth01))
    return scores


def image_scores(g_ab, g_ba, batches_a, batches_b):
    """Mean of every batch score over all images; batches yield (images, truth or None).

    With g_ba None (CUT: no B -> A), only A -> B's scores: the paired truth's.
    """
    per_image = defaultdict(list)
    for domain, forward, backward, batches in (("A", g_ab, g_ba, batches_a),
                                               ("B", g_ba, g_ab, batches_b)):
        if forward is None:
            continue
        for x, truth in batches:
            for name, values in batch_scores(x, forward, backward, domain, truth).items():
                per_image[name].append(values)
    return {name: float(np.mean(np.concatenate(v))) for name, v in per_image.items()}


def colour_map_psnr(batches):
    """Mean PSNR against the truth of the best global colour map of A: the 3x3 matrix and
    offset that least squares fits to the truth of all `batches` ((images, truth)) at once.

    An oracle (it sees the truth) for what a purely colour-level translation can reach.
    """
    images, truths = (image_files.to_unit(np.concatenate(part)) for part in zip(*batches))
    pixels = images.reshape(-1, 3)
    affine = np.concatenate([pixels, np.ones((len(pixels), 1), pixels.dtype)], 1)
    fit, *_ = np.linalg.lstsq(affine, truths.reshape(-1, 3), rcond=None)
    mapped = np.clip(affine @ fit, 0.0, 1.0).reshape(images.shape)
    return float(np.mean(psnr(mapped, truths)))


def truth_files(files):
    """The paired truth of images in FOLDER: FOLDER_truth/ with the same names, or None."""
    folder = Path(files[0]).parent
    truth_dir = folder.with_name(folder.name + "_truth")
    if not truth_dir.is_dir():
        return None
    truth = [truth_dir / Path(f).name for f in files]
    missing = [p.name for p in truth if not p.is_file()]
    if missing:
        raise config.DataError(f"{truth_dir} lacks {len(missing)} of the images in {folder} "
                               f"(e.g. {missing[0]}); add them or remove the folder")
    return [str(p) for p in truth]


def file_batches(files, size, truth=None):
    """(images, truth images or None) batches of EVAL_BATCH, loaded as they are needed."""
    for i in range(0, len(files), EVAL_BATCH):
        yield (data.load_batch(files[i:i + EVAL_BATCH], size),
               None if truth is None else data.load_batch(truth[i:i + EVAL_BATCH], size))


def probe_set(files_a, files_b, size):
    """A fixed, preloaded evaluation set for training: ([(A, truth)], [(B, None)])."""
    files_a, files_b = files_a[:PROBE_IMAGES], files_b[:PROBE_IMAGES]
    return (list(file_batches(files_a, size, truth_files(files_a))),
            list(file_batches(files_b, size)))


# --- FID and KID -----------------------------------------------------------

def psd_sqrt(c):
    """Square root of a symmetric positive semi-definite matrix."""
    w, v = np.linalg.eigh(c)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, c1, mu2, c2):
    """||mu1 - mu2||^2 + Tr(c1 + c2 - 2 (c1 c2)^1/2) between two Gaussians.

    Tr (c1 c2)^1/2 is taken from the symmetric sqrt(c1) c2 sqrt(c1), which has
    the same eigenvalues, so no general matrix square root (scipy) is needed.
    """
    s1 = psd_sqrt(c1)
    eigenvalues = np.linalg.eigvalsh(s1 @ c2 @ s1)
    trace_sqrt = np.sum(np.sqrt(np.clip(eigenvalues, 0, None)))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * trace_sqrt)


def fid(x, y):
    """Fréchet distance between Gaussians fitted to two feature sets (rows)."""
    return frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))


def polynomial_kernel(x, y):
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x, y):
    """Unbiased squared MMD: kernel means without the diagonal of k(x, x) and k(y, y)."""
    kxx, kyy = polynomial_kernel(x, x), polynomial_kernel(y, y)
    m, n = len(x), len(y)
    return ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
            - 2 * polynomial_kernel(x, y).mean())


def kid(x, y, subset=KID_SUBSET, subsets=KID_SUBSETS, seed=0):
    """Kernel Inception Distance: mean unbiased MMD^2 over random subsets of the features."""
    if len(x) <= subset and len(y) <= subset:
        return float(mmd2_unbiased(x, y))
    rng = np.random.default_rng(seed)
    size = min(subset, len(x), len(y))
    return float(np.mean([mmd2_unbiased(x[rng.choice(len(x), size, replace=False)],
                                        y[rng.choice(len(y), size, replace=False)])
                          for _ in range(subsets)]))


def load_inception(weights=None):
    """InceptionV3 average-pooled features, ImageNet weights from `weights` or a download.

    Raises FeaturesUnavailable when the download fails and UserError for a bad local file.
    """
    if weights is not None and not Path(weights).is_file():
        raise UserError(f"--inception-weights {weights} is not a file")
    try:
        weights = weights or inception_weights()
    except config.DataError as error:
        raise FeaturesUnavailable(f"no InceptionV3 weights ({error}); "
                                  "pass --inception-weights PATH to use a local file") from None
    model = keras.applications.InceptionV3(include_top=False, pooling="avg", weights=None,
                                           input_shape=(INCEPTION_PX, INCEPTION_PX, 3))
    try:
        model.load_weights(weights)
    except Exception as error:  # what a file of other weights raises varies with the file
        raise UserError(f"{weights} does not fit InceptionV3 without its top "
                        f"({config.one_line(error)})") from None
    return model


def inception_weights():
    """INCEPTION_FILE, downloaded the first time it is asked for."""
    def check(path):
        if hashlib.md5(path.read_bytes()).hexdigest() != INCEPTION_MD5:
            raise config.DataError("not the expected file (its MD5 differs)")
    if not INCEPTION_FILE.is_file():
        download.download([INCEPTION_URL], INCEPTION_FILE, INCEPTION_MAX_BYTES, check)
    return str(INCEPTION_FILE)


def features(model, batches):
    """Feature rows of [-1, 1] image batches, resized to the model's input."""
    rows = []
    for x in batches:
        x = tf.image.resize(x, model.input_shape[1:3])
        rows.append(np.asarray(model(preprocess_input(image_files.to_unit(x) * 255.0), training=False)))
    return np.concatenate(rows).astype(np.float64)


def distribution_scores(model, g_ab, g_ba, files_a, files_b, size):
    """FID and KID between translated and real images of each target domain (of B only where
    g_ba is None)."""
    if min(len(files_a), len(files_b)) < 2:
        raise FeaturesUnavailable("FID/KID need at least 2 test images per domain")
    scores = {}
    for domain, real_files, generator, source_files in (("B", files_b, g_ab, files_a),
                                                        ("A", files_a, g_ba, files_b)):
        if generator is None:
            continue
        real = features(model, (x for x, _ in file_batches(real_files, size)))
        fake = features(model, (generator(x, training=False) for x, _ in file_batches(source_files, size)))
        scores[f"FID_{domain}"] = fid(fake, real)
        scores[f"KID_{domain}"] = kid(fake, real)
    return scores


# --- metrics.json and the evaluate command ----------------------------------

def save_scores(path, scores, source):
    """metrics.json: the scores and what they were measured on, written whole."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps({"source": source, "metrics": scores}, indent=2))


def truth_verdict(scores):
    """One line: did G_AB beat doing nothing on the paired truth?"""
    better = scores["truth_PSNR"] > scores["baseline_PSNR"]
    return (f"G_AB(A) is {'closer to' if better else 'no closer to'} the truth than A itself: "
            f"PSNR {scores['truth_PSNR']:.2f} dB vs {scores['baseline_PSNR']:.2f} dB")


def evaluation_target(args):
    """(run folder, generator paths (G_AB and G_BA, or G_AB alone for a CUT run), dataset,
    image size, whether the folder is a training run)."""
    if args.generators:
        if not args.data:
            raise UserError("--generators needs --data")
        cfg = config.from_flags(args, name=f"{Path(args.data).resolve().name}{config.EVAL_SUFFIX}",
                                **(config.DEMO_DEFAULTS if args.data == "demo" else {}))
        return RunFolder.of(cfg), args.generators, cfg.data, cfg.image_size, False
    if not args.name:
        raise UserError("evaluate needs --name NAME (a training run) or --generators A2B B2A --data D")
    folder = RunFolder(args.results_dir or config.Config.results_dir, config.Config.log_dir, args.name)
    cfg = config.from_flags(args, **folder.saved_settings())  # the run's, but for the flags given
    generators = [folder.model("g_ab")] + ([folder.model("g_ba")] if cfg.model == "cyclegan" else [])
    missing = [path for path in generators if not path.is_file()]
    if missing:
        raise UserError(f"run {args.name!r} has saved no models yet ({missing[0]} is missing); "
                        "train it further, or score two saved ones with --generators A2B B2A --data D")
    return folder, generators, cfg.data, cfg.image_size, True


def fid_kid_scores(args, g_ab, g_ba, files_a, files_b, size):
    """FID and KID, or none after one line saying why they are skipped."""
    try:
        if args.no_fid:
            raise FeaturesUnavailable("--no-fid given")
        inception = load_inception(args.inception_weights)
        return distribution_scores(inception, g_ab, g_ba, files_a, files_b, size)
    except FeaturesUnavailable as why:
        print(f"FID/KID skipped: {why}")
        return {}


def evaluate(args):
    """`main.py evaluate`: score a run's (or two saved) generators on a test split."""
    folder, generators, dataset, size, is_run = evaluation_target(args)
    g_ab, g_ba = [models.load_generator(path, "--generators" if args.generators else "--generator")
                  for path in generators] + [None] * (2 - len(generators))
    if g_ba is None:
        print("This run has no B -> A generator (CUT translates A -> B only): scores of A -> B only")
    root = data.resolve_dataset(dataset)
    folder.check_apart_from([root])
    files_a, files_b = (data.domain_files(root, "test", d) for d in "AB")
    truth = truth_files(files_a)
    # An unwritable place fails before the scoring, not after; one made for nothing goes again.
    with folder.made_root():
        source = f"{len(files_a)} A and {len(files_b)} B test images of {root} at {size} px"
        print(f"Evaluating on {source}" + (", with paired truth" if truth else ""))
        scores = image_scores(g_ab, g_ba, file_batches(files_a, size, truth),
                              file_batches(files_b, size))
        scores.update(fid_kid_scores(args, g_ab, g_ba, files_a, files_b, size))
        print(report.format_table(scores))
        if truth:
            print(truth_verdict(scores))
        save_scores(folder.metrics, scores, f"evaluate: {source}")
    if is_run:
        report.write_results_page(folder)
    print(f"Metrics in {folder.metrics}" + (f", page {folder.page}" if is_run else ""))
