"""CycleGAN (Keras 3): train, translate images, summarise the models.

    python main.py --data monet2photo          # train (the default command)
    python main.py translate --generator G.h5 --input DIR --output DIR
    python main.py evaluate --name monet2photo  # quality numbers on the test split
    python main.py summary --preset paper --image-size 256
    python main.py benchmark --preset book --image-size 128
    python main.py study                       # which settings beat doing nothing, soonest
"""
import argparse
import dataclasses
import json
import os
import sys
import warnings
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import config  # noqa: E402

COMMANDS = ("train", "translate", "evaluate", "summary", "benchmark", "study")
SAMPLE_COUNT = 3


class CliError(config.UserError):
    """A user mistake reported as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise CliError(message)


def add_config_flags(parser):
    """One flag per Config field, defaulting to None so presets fill the gaps."""
    for field in dataclasses.fields(config.Config):
        flag = "--" + field.name.replace("_", "-")
        if field.type is bool or isinstance(field.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            parser.add_argument(flag, type=type(field.default), default=None,
                                choices=config.CHOICES.get(field.name))


def add_evaluate_flags(parser):
    parser.add_argument("--name", help="the run in RESULTS_DIR/NAME to score")
    parser.add_argument("--generators", nargs=2, metavar=("A2B", "B2A"),
                        help="score these saved generators instead of a run's")
    parser.add_argument("--data", help="dataset (default: the run's)")
    parser.add_argument("--image-size", type=int, help="pixels (default: the run's)")
    parser.add_argument("--results-dir", default="results")
    parser.add_argument("--no-fid", action="store_true", help="skip FID and KID")
    parser.add_argument("--inception-weights", help="a local InceptionV3 (no top) weights file")


def add_study_flags(parser):
    # Defaults live in study.py, imported only once TensorFlow is (quietly).
    parser.add_argument("--datasets", nargs="+",
                        help="datasets with a paired truth (default: demo photos)")
    parser.add_argument("--variants", nargs="+", help="variants to train (default: all; see README)")
    parser.add_argument("--steps", type=int, help="training steps per variant (default: 160)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)


def build_parser():
    parser = Parser(prog="main.py", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command")
    train = commands.add_parser("train", help="train a CycleGAN (default)")
    add_config_flags(train)
    train.add_argument("--overwrite", action="store_true",
                       help="start the run NAME again, replacing its results")
    train.add_argument("--resume", action="store_true",
                       help="continue the run NAME from its latest checkpoint")
    bench = commands.add_parser("benchmark", help="time the training step and input pipeline")
    add_config_flags(bench)
    bench.add_argument("--steps", type=int, default=10, help="timed training steps")
    bench.add_argument("--pipeline-images", type=int, default=200, help="image files per domain")
    bench.add_argument("--json", action="store_true", help="print the figures as JSON")
    bench.add_argument("--compare", action="store_true",
                       help="time float32 and --precision auto's choice, steps interleaved, "
                            "and print their ratio")
    translate = commands.add_parser("translate", help="translate images with a saved generator")
    translate.add_argument("--generator", required=True, help="a saved generator .h5")
    translate.add_argument("--input", required=True, help="an image file or a folder of images")
    translate.add_argument("--output", required=True, help="folder for the translated images")
    add_evaluate_flags(commands.add_parser("evaluate", help="score a trained run on the test split"))
    summary = commands.add_parser("summary", help="print the models' sizes and outputs")
    summary.add_argument("--preset", default="book", choices=tuple(config.PRESETS))
    summary.add_argument("--image-size", type=int, default=None)
    add_study_flags(commands.add_parser(
        "study", help="compare settings by how much a short run beats doing nothing"))
    for sub in commands.choices.values():
        sub.error = parser.error
    return parser


def import_tensorflow_quietly():
    """Import TensorFlow and find its devices with C++ start-up logging muted.

    Its native code writes CUDA probing notes straight to file descriptor 2,
    past TF_CPP_MIN_LOG_LEVEL; they would bury our one-line messages.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            import tensorflow as tf
            tf.config.list_physical_devices()
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def parse_args(argv):
    if not argv or argv[0] not in COMMANDS + ("-h", "--help"):
        argv = ["train"] + list(argv)
    return build_parser().parse_args(argv)


def config_from_args(args):
    """The Config for a train command: preset, then demo defaults, then flags.

    With --resume, the run's saved config replaces preset and defaults;
    flags may change only what does not shape the networks.
    """
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(config.Config)}
    given = {k: v for k, v in given.items() if v is not None}
    data = given.get("data", "demo")
    given.setdefault("name", Path(data).name or "run")
    if args.resume:
        return resumed_config(given)
    preset = given.pop("preset", "book")
    if data == "demo":
        given = {**config.DEMO_DEFAULTS, **given}
    return config.make_config(preset, **given)


def resumed_config(given):
    path = Path(given.get("results_dir", config.Config.results_dir)) / given["name"] / "config.json"
    if not path.is_file():
        raise CliError(f"--resume: no run {given['name']!r} in {path.parent.parent}")
    saved = json.loads(path.read_text())
    if "mixed_precision" in saved:  # a run from before --precision
        saved["precision"] = "float16" if saved.pop("mixed_precision") else "float32"
    for field in config.ARCHITECTURE_FIELDS + ("preset", "data"):
        if field in given and given[field] != saved[field]:
            raise CliError(f"--resume: run {given['name']!r} was trained with "
                           f"--{field.replace('_', '-')} {saved[field]}, not {given[field]}")
    return config.make_config(saved.pop("preset"), **{**saved, **given})


# --- train -----------------------------------------------------------------

def run_paths(cfg):
    root = Path(cfg.results_dir) / cfg.name
    return {"root": root, "samples": root / "samples", "models": root / "models",
            "checkpoints": root / "checkpoints", "history": root / "losses.csv",
            "curves": root / "loss_curves.png", "config": root / "config.json"}


def prepare_run_folder(cfg, paths, resume, overwrite):
    """Refuse to clobber an earlier run by accident; record this run's settings."""
    if not resume and paths["root"].exists() and any(paths["root"].iterdir()):
        if not overwrite:
            raise CliError(f"{paths['root']} already holds a run; pass --resume to continue it, "
                           "--overwrite to replace it or --name to start another")
        import shutil
        shutil.rmtree(paths["root"])
        shutil.rmtree(Path(cfg.log_dir) / cfg.name, ignore_errors=True)
    paths["samples"].mkdir(parents=True, exist_ok=True)
    import data
    tmp = data.atomic_path(paths["config"])
    tmp.write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    os.replace(tmp, paths["config"])


def sample_files(root, domain, cfg, count):
    """A few fixed test images (train images when there is no test split)."""
    import data
    try:
        return data.domain_files(root, "test", domain)[:count]
    except data.DataError:
        return data.domain_files(root, "train", domain, cfg.limit)[:count]


def train(cfg, resume=False, overwrite=False):
    import keras
    import data
    import metrics
    import models
    import train_utils as tu

    # Before any TensorFlow op runs: --strategy multiworker sets up collective ops, which
    # TensorFlow accepts only at program start-up.
    strategy = tu.make_strategy(cfg.strategy)
    chief = strategy.extended.should_checkpoint  # only the chief of several workers writes
    precision, why = models.choose_precision(cfg.precision)
    cfg = dataclasses.replace(cfg, precision=precision)  # config.json records the choice
    print(f"Precision: {precision} ({why})")
    if cfg.data == "demo":
        print("Training on the built-in demo data (pass --data NAME or --data PATH for your own).")
    root = data.resolve_dataset(cfg.data)
    files_a = data.domain_files(root, "train", "A", cfg.limit)
    files_b = data.domain_files(root, "train", "B", cfg.limit)
    paths = run_paths(cfg)
    if chief:
        prepare_run_folder(cfg, paths, resume, overwrite)
    fixed_a, fixed_b = (sample_files(root, d, cfg, max(SAMPLE_COUNT, metrics.PROBE_IMAGES))
                        for d in "AB")
    show_a = data.load_batch(fixed_a[:SAMPLE_COUNT], cfg.image_size)
    show_b = data.load_batch(fixed_b[:SAMPLE_COUNT], cfg.image_size)
    probe = metrics.probe_set(fixed_a, fixed_b, cfg.image_size)

    replicas = strategy.num_replicas_in_sync
    gan, pools, batches = tu.start_run(cfg, files_a, files_b, strategy)
    with strategy.scope():
        checkpoint = tu.RunCheckpoint(gan, pools, batches, paths["checkpoints"], cfg.image_size)
    steps = data.steps_per_epoch(files_a, files_b, cfg, replicas)
    total_steps = steps * cfg.total_epochs
    step = checkpoint.restore() if resume else 0
    if resume and step >= total_steps:
        print(f"Run {cfg.name} already finished ({step} steps); nothing to do.")
        return
    if resume:
        print(f"Resuming run {cfg.name} at step {step}.")
    logger = tu.TensorBoardLogger(cfg.log_dir, cfg.name) if chief else tu.NoLogger()
    logger.graph(gan.g_ab)
    logger.graph(gan.d_a)
    history = tu.LossHistory(paths["history"])
    checkpoint_every = cfg.checkpoint_every or steps
    print(f"{len(files_a)} A and {len(files_b)} B images, {steps} steps per epoch, "
          f"{cfg.total_epochs} epochs; TensorBoard: tensorboard --logdir {cfg.log_dir}")
    if replicas > 1:
        print(f"{replicas} replicas: global batch {cfg.batch_size * replicas} per domain")

    with tu.StopOnSignal() as stop:
        for epoch in range(step // steps + 1, cfg.total_epochs + 1):
            lr = tu.learning_rate(epoch - 1, cfg)
            tu.set_learning_rate(gan, lr)
            print(f"Epoch {epoch}/{cfg.total_epochs} (learning rate {lr:.3g})")
            bar = keras.utils.Progbar(steps, stateful_metrics=tu.LOSS_NAMES)
            sums = defaultdict(float)
            first = step % steps
            for i in range(first, steps):
                real_a, real_b = next(batches)
                losses = tu.train_step(gan, real_a, real_b, pools, cfg)
                tu.check_finite(losses, step + 1)
                step += 1
                for key, value in losses.items():
                    sums[key] += value
                if step % cfg.log_every == 0:
                    logger.scalars({**losses, "learning_rate": lr}, step)
                bar.update(i + 1, [(k, losses[k]) for k in ("D_A", "D_B", "G_total")])
                stopping = tu.agreed_stop(strategy, stop.requested)
                if chief and (step % checkpoint_every == 0 or stopping):
                    checkpoint.save(step)
                if stopping:
                    logger.flush()
                    print(f"\n{stopping}: checkpoint saved at step {step}; "
                          f"continue with: python main.py --name {cfg.name} --resume")
                    return
            if not chief:
                continue
            history.append(epoch, {k: v / (steps - first) for k, v in sums.items()})
            last = epoch == cfg.total_epochs
            if epoch % cfg.sample_every == 0 or last:
                grid = paths["samples"] / f"epoch_{epoch:04d}.png"
                tu.save_sample_grid(gan, show_a, show_b, grid, f"{cfg.name}, epoch {epoch}")
                logger.image_file("samples", grid, step)
                tu.save_loss_curves(history, paths["curves"])
                metrics.track(gan, probe, paths["root"], logger, step, epoch)
            if epoch % cfg.save_every == 0 or last:
                tu.save_models(gan, paths["models"])
            logger.flush()
    print(f"Done: samples, loss curves and models in {paths['root']}" if chief else
          "Done: this worker's part is over; the chief wrote the results")


# --- translate -------------------------------------------------------------

def translate(generator_path, input_path, output_dir):
    import data
    import models
    generator = models.load_generator(generator_path)
    files = [input_path] if Path(input_path).is_file() else data.list_images(input_path)
    if not files:
        raise CliError(f"no images found in {input_path}")
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    for path in files:
        image = data.read_image(path)
        out = models.translate_any_size(generator, image)
        data.write_image(Path(output_dir) / Path(path).name, out)
    print(f"Translated {len(files)} image(s) into {output_dir}")


# --- evaluate --------------------------------------------------------------

def evaluation_target(args):
    """(run folder or None, generator paths, dataset, image size, output folder) for evaluate."""
    if args.generators:
        if not args.data:
            raise CliError("--generators needs --data")
        name = args.name or f"{Path(args.data).name}-eval"
        size = args.image_size or (config.DEMO_DEFAULTS["image_size"] if args.data == "demo"
                                   else config.Config.image_size)
        return None, args.generators, args.data, size, Path(args.results_dir) / name
    if not args.name:
        raise CliError("evaluate needs --name NAME (a training run) or --generators A2B B2A --data D")
    run = Path(args.results_dir) / args.name
    if not (run / "config.json").is_file():
        raise CliError(f"no run {args.name!r}: {run / 'config.json'} is missing")
    saved = json.loads((run / "config.json").read_text())
    models_dir = run / "models"
    return (run, [models_dir / "generatorAToB.h5", models_dir / "generatorBToA.h5"],
            args.data or saved["data"], args.image_size or saved["image_size"], run)


def fid_kid_scores(args, g_ab, g_ba, files_a, files_b, size):
    """FID and KID, or none after one line saying why they are skipped."""
    import metrics
    try:
        if args.no_fid:
            raise metrics.FeaturesUnavailable("--no-fid given")
        inception = metrics.load_inception(args.inception_weights)
        return metrics.distribution_scores(inception, g_ab, g_ba, files_a, files_b, size)
    except metrics.FeaturesUnavailable as why:
        print(f"FID/KID skipped: {why}")
        return {}


def evaluate(args):
    import data
    import metrics
    import models
    run, generators, dataset, size, out = evaluation_target(args)
    config.make_config(image_size=size)  # the same size checks as training
    g_ab, g_ba = (models.load_generator(path) for path in generators)
    root = data.resolve_dataset(dataset)
    files_a, files_b = (data.domain_files(root, "test", d) for d in "AB")
    truth = metrics.truth_files(files_a)
    source = f"{len(files_a)} A and {len(files_b)} B test images of {root} at {size} px"
    print(f"Evaluating on {source}" + (", with paired truth" if truth else ""))
    scores = metrics.image_scores(g_ab, g_ba, metrics.file_batches(files_a, size, truth),
                                  metrics.file_batches(files_b, size))
    scores.update(fid_kid_scores(args, g_ab, g_ba, files_a, files_b, size))
    print(metrics.format_table(scores))
    if truth:
        print(metrics.truth_verdict(scores))
    out.mkdir(parents=True, exist_ok=True)
    metrics.save_scores(out / "metrics.json", scores, f"evaluate: {source}")
    if run is not None:
        metrics.write_results_page(run)
    print(f"Metrics in {out / 'metrics.json'}" + (f", page {run / 'index.html'}" if run else ""))


# --- benchmark -------------------------------------------------------------

def benchmark(args):
    import benchmark as bench
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(config.Config)}
    cfg = config.make_config(given.pop("preset") or "book", **given)
    if args.steps < 1 or args.pipeline_images < 1:
        raise CliError("--steps and --pipeline-images must be at least 1")
    if args.compare:
        figures = bench.compare_precisions(cfg, args.steps)
    else:
        figures = bench.run_benchmark(cfg, args.steps, args.pipeline_images)
    print(json.dumps(figures, indent=2) if args.json else bench.format_figures(figures))


# --- summary ---------------------------------------------------------------

def summary(preset, image_size):
    import models
    cfg = config.make_config(preset, image_size=image_size)
    gan = models.build_cyclegan(cfg)
    for model in (gan.g_ab, gan.g_ba, gan.d_a, gan.d_b):
        print(f"{model.name} params={model.count_params()}")
    print(f"discriminator output={'x'.join(map(str, gan.patch_shape))} "
          f"receptive_field={models.receptive_field(gan.d_a)}px at {cfg.image_size}px input")
    for name, loss, weight in zip(models.OUTPUT_NAMES, models.OUTPUT_LOSSES, cfg.loss_weights):
        print(f"adversarial output {name}: loss={loss} weight={weight:g}")


# --- study -----------------------------------------------------------------

def study(args):
    import study as study_module
    steps = study_module.DEFAULT_STEPS if args.steps is None else args.steps
    if steps < 2:
        raise CliError(f"--steps must be at least 2, got {steps}")
    study_module.run_study(args.datasets or study_module.DATASETS,
                           args.variants or tuple(study_module.VARIANTS),
                           args.image_size, steps, args.seed)


def main(argv=None):
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        import_tensorflow_quietly()
        if args.command == "translate":
            translate(args.generator, args.input, args.output)
        elif args.command == "evaluate":
            evaluate(args)
        elif args.command == "benchmark":
            benchmark(args)
        elif args.command == "summary":
            summary(args.preset, args.image_size)
        elif args.command == "study":
            study(args)
        else:
            train(config_from_args(args), resume=args.resume, overwrite=args.overwrite)
    except config.UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    return 0


if __name__ == "__main__":
    warnings.simplefilter("default")
    warnings.formatwarning = lambda message, category, *_, **__: f"warning: {category.__name__}: {message}\n"
    # Raised inside Keras itself under NumPy 2, once per weight: noise for users.
    warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
    sys.exit(main())
