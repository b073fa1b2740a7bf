"""The study: which settings let a short run beat doing nothing.

Each variant is the book preset with one setting changed (or a whole
preset), trained for the same number of steps with the same seed on a
dataset with a paired truth, then scored as `evaluate` scores a run:
the PSNR gain of G_AB(A) over A itself against the truth, its PSNR
over the best global colour map fitted to that truth, cycle L1, and
seconds per training step.
"""
import time

import keras
import numpy as np
import tensorflow as tf

import config
import cut
import data
import metrics
import report
import train_utils
from fileio import checked_output

# name -> (preset, overrides); a name says what differs from the book preset.
VARIANTS = {
    "book": ("book", {}),
    "res-norm=instance": ("book", {"res_norm": "instance"}),
    "disc-activation=linear": ("book", {"disc_activation": "linear"}),
    "lambda-identity=0": ("book", {"lambda_identity": 0.0}),
    "lambda-identity=5": ("book", {"lambda_identity": 5.0}),
    "upsample=resize": ("book", {"upsample": "resize"}),
    "global-skip": ("book", {"global_skip": True}),
    "pool-size=50": ("book", {"pool_size": 50}),
    "d-update=joint": ("book", {"d_update": "joint"}),
    "lr=1e-3": ("book", {"lr": 1e-3}),
    "paper": ("paper", {}),
    "fast": ("fast", {}),
    # Park et al. (2020) on the paper's networks, as the official CUT code, and on the fast preset's.
    "cut": ("paper", {"model": "cut"}),
    "fastcut": ("paper", {"model": "fastcut"}),
    "fast,model=cut": ("fast", {"model": "cut"}),
    "fast,model=fastcut": ("fast", {"model": "fastcut"}),
}
# What a plain `study` runs: the CycleGAN variants, within its half-hour budget on 2 cores;
# the CUT ones are named with --variants.
DEFAULT_VARIANTS = tuple(name for name, (_, settings) in VARIANTS.items() if "model" not in settings)
# A global colour change and a local, painterly one (generated.photo_grading, generated.painterly).
DATASETS = ("photos", "painterly")
DEFAULT_STEPS = 160
SAMPLE_IMAGES = 3  # test images of each dataset in --samples' grid


def variant_config(name, image_size, seed, precision="auto"):
    """The Config of one variant at the study's image size, seed and precision."""
    if name not in VARIANTS:
        raise config.UserError(f"unknown study variant {name!r}; choose from {', '.join(VARIANTS)}")
    preset, overrides = VARIANTS[name]
    return config.make_config(preset, image_size=image_size, seed=seed, precision=precision,
                              **overrides)


def train_steps(gan, batches, steps):
    """Train `steps` steps; returns seconds per step after the first (which traces).

    The learning rate stays cfg.lr: a study run is far shorter than any decay schedule.
    """
    train_utils.check_finite(gan.train_step(*next(batches)), 1)
    start = time.perf_counter()
    for step in range(2, steps + 1):
        train_utils.check_finite(gan.train_step(*next(batches)), step)
    return (time.perf_counter() - start) / max(1, steps - 1)


def traced(model, training):
    """`model` as one traced call (eager Keras calls cost about 0.2 s an image here).

    training=True runs BatchNorm on each image's own statistics, as it saw them
    in training at batch size 1; Keras then also updates BatchNorm's moving
    statistics, so score in this mode last.
    """
    call = tf.function(lambda x: model(x, training=training), reduce_retracing=True)
    if not training:
        return lambda x, training=False: call(x)
    return lambda x, training=False: tf.concat([call(x[i:i + 1]) for i in range(len(x))], 0)


def study_data(root, image_size):
    """(train files A, train files B), (test batches A with truth, test batches B) and the
    PSNR of the colour-map oracle (metrics.colour_map_psnr) of one dataset.

    Read once for the whole study: every variant trains and scores on the same files.
    """
    files_a, files_b = (data.domain_files(root, "test", d) for d in "AB")
    truth = metrics.truth_files(files_a)
    if truth is None:
        raise config.DataError(f"the study needs a dataset with a paired truth; "
                               f"{root} has no testA_truth/")
    test = (list(metrics.file_batches(files_a, image_size, truth)),
            list(metrics.file_batches(files_b, image_size)))
    return (tuple(data.domain_files(root, "train", d) for d in "AB"), test,
            metrics.colour_map_psnr(test[0]))


def score(generators, test, colour_map_psnr):
    """Gain over doing nothing (inference and training mode), over the colour-map oracle,
    and cycle L1 on the test batches.

    generators: {training: (G_AB, G_BA)} as `traced` calls, G_BA None for CUT, whose
    cycle L1 is NaN: it has no cycle.
    """
    batches_a, batches_b = test
    scores = metrics.image_scores(*generators[False], batches_a, batches_b)
    train_mode = metrics.image_scores(*generators[True], batches_a, [])
    cycle = [scores[name] for name in ("cycle_L1_A", "cycle_L1_B") if name in scores]
    return {"gain_dB": scores["truth_PSNR"] - scores["baseline_PSNR"],
            "over_colour_map_dB": scores["truth_PSNR"] - colour_map_psnr,
            "train_mode_gain_dB": train_mode["truth_PSNR"] - train_mode["baseline_PSNR"],
            "cycle_L1": float(np.mean(cycle)) if cycle else float("nan"),
            "baseline_PSNR": scores["baseline_PSNR"], "colour_map_PSNR": colour_map_psnr}


class StartingPoint:
    """A model's state (gan.state()) as it is now, in memory, to train again from there.

    Restoring it keeps the networks' traced train functions, where building
    the same networks again would trace them again.
    """

    def __init__(self, gan):
        self.gan = gan
        self.variables = [v for part in gan.state().values() for v in variables_of(part)]
        self.values = [v.numpy() for v in self.variables]

    def restore(self):
        """The state as it was, with empty image pools."""
        for variable, value in zip(self.variables, self.values):
            variable.assign(value)
        self.gan.empty_pools()


def variables_of(part):
    """The variables of one entry of a model's state: a network, an optimizer or variables."""
    if isinstance(part, keras.Model):
        return part.weights
    if isinstance(part, keras.optimizers.Optimizer):
        return part.variables
    return part if isinstance(part, list) else [part]


def run_variant(name, datasets, image_size, steps, seed, precision="auto"):
    """Train one variant from scratch on each dataset and score it on that dataset's test split.

    `datasets` maps names to `study_data`. Yields (dataset, row) as each
    finishes. Every dataset starts from the same freshly seeded networks,
    restored rather than rebuilt, and is scored through the same traced calls.
    """
    cfg = variant_config(name, image_size, seed, precision)
    gan = start = generators = None
    for dataset, (train_files, test, colour_map_psnr) in datasets.items():
        if gan is None:
            gan = cut.model_class(cfg).fresh(cfg)
            start = StartingPoint(gan)
            generators = {training: tuple(None if g is None else traced(g, training)
                                            for g in gan.generators())
                          for training in (False, True)}
        else:
            start.restore()
        batches = iter(data.train_dataset(*train_files, cfg))
        seconds = train_steps(gan, batches, steps)
        (first_images, _), *_ = test[0]
        yield dataset, {**score(generators, test, colour_map_psnr), "s_per_step": seconds,
                        "samples": np.asarray(generators[False][0](first_images[:SAMPLE_IMAGES]))}


def format_row(dataset, name, row):
    return (f"{dataset:<9} {name:<24} {row['gain_dB']:>+8.2f} {row['train_mode_gain_dB']:>+10.2f} "
            f"{row['over_colour_map_dB']:>+10.2f} {row['cycle_L1']:>8.3f} {row['s_per_step']:>7.3f}")


HEADER = (f"{'dataset':<9} {'variant':<24} {'gain dB':>8} {'train-mode':>10} "
          f"{'colour-map':>10} {'cycle L1':>8} {'s/step':>7}")


def run_study(datasets=DATASETS, variants=DEFAULT_VARIANTS, image_size=32, steps=DEFAULT_STEPS, seed=0,
              datasets_dir="datasets", precision="auto", samples=None):
    """Every variant on every dataset, a row printed as each finishes; returns the rows.

    With `samples` (a .png path, checked by the caller), also the grid of each dataset's first
    test images: A, its truth, and every variant's G_AB(A) side by side.
    """
    for name in variants:
        variant_config(name, image_size, seed, precision)  # a typo fails before any training
    # A dataset without a truth fails here, before any training.
    prepared = {d: study_data(data.resolve_dataset(d, datasets_dir), image_size) for d in datasets}
    print(f"Study: {len(variants)} variant(s) x {len(datasets)} dataset(s), {steps} steps each at "
          f"{image_size} px, seed {seed}, precision {precision}. gain = PSNR of G_AB(A) minus PSNR "
          "of A itself against the truth (positive: better than doing nothing); train-mode = the "
          "same with BatchNorm in training mode; colour-map = PSNR of G_AB(A) minus that of the "
          "best global colour map fitted to the truth (positive: more than a colour change).",
          flush=True)
    print(HEADER, flush=True)
    rows = []
    start = time.perf_counter()
    # Variant by variant, so a study stopped early still compares both datasets.
    for name in variants:
        for dataset, row in run_variant(name, prepared, image_size, steps, seed, precision):
            rows.append((dataset, name, row))
            print(format_row(dataset, name, row), flush=True)
    print_summary(rows)
    print(f"{len(rows)} run(s) in {(time.perf_counter() - start) / 60:.1f} minutes")
    if samples:
        report.save_image_grid(sample_rows(prepared, rows), samples,
                               f"{steps} steps at {image_size} px, seed {seed}")
        print(f"Samples side by side: {samples}")
    return rows


def sample_rows(prepared, rows):
    """The grid's rows: per dataset and test image, A, its truth and each variant's G_AB(A)."""
    grid = []
    for dataset, (_, (batches_a, _), _) in prepared.items():
        images, truth = batches_a[0]
        for i in range(min(SAMPLE_IMAGES, len(images))):
            grid.append([(images[i], f"{dataset}: A"), (truth[i], "truth")]
                        + [(row["samples"][i], name) for d, name, row in rows if d == dataset])
    return grid


def print_summary(rows):
    """The whole table again, dataset by dataset, with each dataset's do-nothing PSNR and
    its colour-map oracle's."""
    datasets = list(dict.fromkeys(d for d, _, _ in rows))
    print("\n" + HEADER)
    for dataset in datasets:
        for name, row in ((n, r) for d, n, r in rows if d == dataset):
            print(format_row(dataset, name, row))
    for dataset in datasets:
        row = next(r for d, _, r in rows if d == dataset)
        baseline, oracle = row["baseline_PSNR"], row["colour_map_PSNR"]
        print(f"{dataset}: doing nothing scores {baseline:.2f} dB PSNR against the truth; the best "
              f"global colour map fitted to the truth scores {oracle:.2f} dB (gain "
              f"{oracle - baseline:+.2f} dB)")


def command(args):
    """`main.py study`: the variants on the datasets, a row printed as each finishes."""
    steps = DEFAULT_STEPS if args.steps is None else args.steps
    if steps < 2:
        raise config.UserError(f"--steps must be at least 2, got {steps}")
    # The study's runs are as small as the demo data's.
    base = config.from_flags(args, image_size=config.DEMO_DEFAULTS["image_size"])
    samples = args.samples and checked_output(args.samples, (".png",), flag="--samples")
    run_study(args.datasets or DATASETS, args.variants or DEFAULT_VARIANTS, base.image_size, steps,
              base.seed, precision=base.precision, samples=samples)
