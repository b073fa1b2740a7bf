"""A training run: set-up, resume, the loop over epochs and what each epoch writes.

`python main.py` turns the flags into a Config and calls `train`; the
model being trained (its step, pools, schedule, state) is cyclegan.py's,
the loop's pieces are in train_utils.py, the run's folders in
run_folder.py, what it shows in report.py.
"""
import contextlib
import dataclasses
import shlex
from collections import defaultdict
from pathlib import Path

import config
import cut
import data
import machine
import metrics
import report
import train_utils
from config import UserError
from run_folder import RunCheckpoint, RunFolder

SAMPLE_COUNT = 3
# A checkpoint holds the input position, which waits for the images being read.
SAVING = "the checkpoint to be written"


def resumed_config(given):
    """The Config of the run given["name"] to resume, with the flags in `given` applied.

    Flags may change only what neither shapes the networks nor the data
    (config.RESUME_FIXED); where the run is comes from `given` (the flags),
    never from its config.json.
    """
    defaults = config.Config()
    run = RunFolder(given.get("results_dir", defaults.results_dir),
                    given.get("log_dir", defaults.log_dir), given["name"])
    if not run.config.is_file():
        raise UserError(f"--resume: no run {given['name']!r} in {run.root.parent}")
    saved = run.saved_settings()
    for field in config.RESUME_FIXED:
        if field in given and given[field] != saved[field]:
            raise UserError(f"--resume: run {given['name']!r} was trained with "
                            f"{config.flag(field)} {saved[field]}, not {given[field]}")
    return config.make_config(**{**saved, **given})


def config_from_args(args):
    """The Config of a train command: preset, then demo defaults, then flags.

    With --resume, the run's saved config replaces preset and defaults;
    flags may change only what shapes neither the networks nor the data
    (resumed_config).
    """
    given = config.given_flags(args)
    data = given.get("data", "demo")
    # The dataset folder's own name, also for paths such as `..` or `photos/`.
    name = given.get("name", Path(data).resolve().name or "run")
    config.check_run_name(name)
    if args.resume:
        return resumed_config({**given, "name": name})
    return config.from_flags(args, name=name, **(config.DEMO_DEFAULTS if data == "demo" else {}))


def command(args):
    """`main.py [train]`: a new run, or with --resume the run NAME, from the parsed flags."""
    train(config_from_args(args), resume=args.resume, overwrite=args.overwrite)


def sample_files(root, domain, train_files, count, remember):
    """A few fixed test images (the run's train images when there is no test split)."""
    try:
        return data.domain_files(root, "test", domain, remember=remember)[:count]
    except config.DataError:
        return train_files[:count]


def fixed_images(root, cfg, files_a, files_b, remember):
    """The sample batches and the probe set (metrics.probe_set) every epoch draws and scores."""
    fixed_a, fixed_b = (sample_files(root, d, files, max(SAMPLE_COUNT, metrics.PROBE_IMAGES),
                                     remember)
                        for d, files in (("A", files_a), ("B", files_b)))
    samples = tuple(data.load_batch(f[:SAMPLE_COUNT], cfg.image_size) for f in (fixed_a, fixed_b))
    return samples, metrics.probe_set(fixed_a, fixed_b, cfg.image_size)


def train(cfg, resume=False, overwrite=False):
    """Train the run cfg.name: a new one, or with `resume` the one results/NAME holds.

    Of several workers (--strategy multiworker) only the chief writes files.
    Everything the run depends on is checked before its folder is made.
    """
    machine.wait_timeout()  # the loop's, read only then: a bad value is refused here first
    # Before any TensorFlow op runs: --strategy multiworker sets up collective
    # ops, which TensorFlow accepts only at program start-up.
    strategy = machine.make_strategy(cfg.strategy)
    precision, why = machine.choose_precision(cfg.precision)
    cfg = dataclasses.replace(cfg, precision=precision)  # config.json records the choice
    print(f"Precision: {precision} ({why})")
    gradients, why = machine.choose_conv_gradients(cfg.conv_gradients)
    print(f"Convolution gradients: {gradients} ({why})")
    # Before anything is written or fetched.
    train_utils.check_training_memory(cfg, cut.model_class(cfg).memory_needed(cfg))
    if cfg.data == "demo":
        print("Training on the built-in demo data (pass --data NAME or --data PATH for your own).")
    root = data.resolve_dataset(cfg.data)
    folder = RunFolder.of(cfg)
    folder.check_apart_from([root])  # before reading a file: a clear line comes first
    chief = strategy.extended.should_checkpoint  # only the chief writes: its run folder, caches
    files_a = data.domain_files(root, "train", "A", cfg.limit, remember=chief)
    files_b = data.domain_files(root, "train", "B", cfg.limit, remember=chief)
    fixed = fixed_images(root, cfg, files_a, files_b, chief)
    with folder.open([root], resume, overwrite) if chief else contextlib.nullcontext(), \
            machine.lost_workers_as_user_error():
        run_training(cfg, strategy, files_a, files_b, fixed, folder, resume)


@dataclasses.dataclass
class Run:
    """What the loop works with: the networks and their data, and where each output goes."""
    cfg: config.Config
    folder: RunFolder
    strategy: object
    gan: object             # cyclegan.CycleGAN or cut.CUT (cut.model_class)
    batches: object
    checkpoint: RunCheckpoint
    steps: int                # per epoch
    samples: tuple            # fixed (A, B) batches drawn in each sample grid
    probe: tuple              # fixed images scored at each sample epoch
    logger: report.TensorBoardLogger = None
    history: object = None

    @property
    def chief(self):
        """Of several workers, the one that writes; the only one otherwise."""
        return self.strategy.extended.should_checkpoint


def run_training(cfg, strategy, files_a, files_b, fixed, folder, resume):
    """Set up, restore, and run the epochs of a run whose folder this process holds."""
    run, step = set_up(cfg, strategy, files_a, files_b, fixed, folder, resume)
    if resume and step >= run.steps * cfg.total_epochs:
        if run.chief and not folder.has_models(run.gan.NETWORKS):
            folder.save_models(run.gan)
        print(f"Run {cfg.name} already finished ({step} steps); nothing to do.")
        return
    if resume:
        print(f"Resuming run {cfg.name} at step {step}.")
    run.logger = report.TensorBoardLogger(folder.logs) if run.chief else report.NoLogger()
    run.logger.graph(run.gan.generators()[0], run.gan.discriminators()[0])
    run.history = folder.losses_history(run.gan.LOSS_NAMES)
    print(f"{len(files_a)} A and {len(files_b)} B images, {run.steps} steps per epoch, "
          f"{cfg.total_epochs} epochs; TensorBoard: tensorboard --logdir {cfg.log_dir}")
    replicas = strategy.num_replicas_in_sync
    if replicas > 1:
        print(f"{replicas} replicas: global batch {cfg.batch_size * replicas} per domain")
    run_epochs(run, step)


def set_up(cfg, strategy, files_a, files_b, fixed, folder, resume):
    """The Run, fresh or restored from its newest good checkpoint, and its step.

    `fixed`: (samples, probe) of fixed_images.
    """
    with train_utils.out_of_memory_as_user_error(cfg):
        gan = cut.model_class(cfg).fresh(cfg, strategy)
    replicas = strategy.num_replicas_in_sync
    batches = iter(data.train_dataset(files_a, files_b, cfg, replicas))
    with strategy.scope():
        checkpoint = RunCheckpoint(gan, batches, folder.checkpoints)
    steps = data.steps_per_epoch(files_a, files_b, cfg, replicas)
    step = checkpoint.restore() if resume else 0
    run = Run(cfg, folder, strategy, gan, batches, checkpoint, steps, *fixed)
    if run.chief:
        folder.write_config(cfg)  # only now: a failed resume leaves the run's settings as they were
    return run, step


def run_epochs(run, step):
    """The loop: steps, logging and checkpoints; each epoch's outputs; a stop on request."""
    cfg, steps = run.cfg, run.steps
    checkpoint_every = cfg.checkpoint_every or steps
    progress = report.RunProgress(steps, cfg.total_epochs, step, run.gan.PROGRESS_NAMES)
    with train_utils.StopOnSignal() as stop, train_utils.out_of_memory_as_user_error(cfg):
        for epoch in range(step // steps + 1, cfg.total_epochs + 1):
            lr = run.gan.learning_rate(epoch - 1)
            run.gan.set_learning_rate(lr)
            progress.start_epoch(epoch, lr, step)
            sums = defaultdict(float)
            first = step % steps
            for i in range(first, steps):
                with stop.waiting("the next batch of training images"):
                    real_a, real_b = data.next_batch(run.batches)
                with stop.waiting_for_workers(run.strategy):
                    losses = run.gan.train_step(real_a, real_b)
                train_utils.check_finite(losses, step + 1, lambda: kept(run))
                step += 1
                for key, value in losses.items():
                    sums[key] += value
                if step % cfg.log_every == 0:
                    run.logger.losses(losses, lr, step)
                progress.step_done(step, losses)
                with stop.waiting_for_workers(run.strategy):
                    stopping = train_utils.agreed_stop(run.strategy, stop.requested)
                mid_epoch = i + 1 < steps  # at its end, the epoch's outputs come first
                if run.chief and mid_epoch and (step % checkpoint_every == 0 or stopping):
                    with stop.waiting(SAVING):
                        run.checkpoint.save(step)
                if mid_epoch and stopping:
                    return stopped(stopping, run, step)
            mean_losses = {k: v / (steps - first) for k, v in sums.items()}
            if run.chief:
                write_epoch_outputs(run, epoch, step, mean_losses)
                if step % checkpoint_every == 0 or stopping:
                    with stop.waiting(SAVING):  # after the epoch's outputs: a resume never skips them
                        run.checkpoint.save(step)
                run.logger.flush()
            progress.end_epoch(step, mean_losses)
            if stopping and epoch < cfg.total_epochs:
                return stopped(stopping, run, step)
    print(f"Done: samples, loss curves and models in {run.folder.root}" if run.chief else
          "Done: this worker's part is over; the chief wrote the results")


def write_epoch_outputs(run, epoch, step, mean_losses):
    """The epoch's loss row; at its cadence, samples, curves, metrics, the page and the .h5 models."""
    cfg, folder = run.cfg, run.folder
    run.history.append(epoch, mean_losses)
    last = epoch == cfg.total_epochs
    if epoch % cfg.sample_every == 0 or last:
        grid = folder.sample(epoch)
        report.save_sample_grid(run.gan, *run.samples, grid, f"{cfg.name}, epoch {epoch}")
        run.logger.image_file(report.SAMPLES_TAG, grid, step)
        report.save_loss_curves(run.history, folder.curves, run.gan.LOSS_PANELS)
        scores = metrics.image_scores(*run.gan.generators(), *run.probe)
        run.logger.metrics(scores, step)
        counts = [sum(len(x) for x, _ in batches) for batches in run.probe]
        metrics.save_scores(folder.metrics, scores,
                            f"epoch {epoch}, {counts[0]} A and {counts[1]} B images")
        report.write_results_page(folder)
    if epoch % cfg.save_every == 0 or last:
        folder.save_models(run.gan)


def kept(run):
    """What a run stopped by an error keeps to resume from or use, as the end of its last line."""
    checkpoint = run.checkpoint.manager.latest_checkpoint is not None
    models = run.folder.has_models(run.gan.NETWORKS)
    if checkpoint and models:
        return "the last checkpoint and saved models are kept"
    if checkpoint:
        return "the last checkpoint is kept (no models were saved yet)"
    if models:
        return "the saved models are kept (no checkpoint was written yet)"
    return "no checkpoint or models were written yet"


def stopped(reason, run, step):
    run.logger.flush()
    writer = "" if run.chief else " (by the chief worker)"
    defaults = config.Config()
    where = "".join(f" {config.flag(field)} {shlex.quote(getattr(run.cfg, field))}"
                    for field in ("results_dir", "log_dir")
                    if getattr(run.cfg, field) != getattr(defaults, field))
    print(f"\n{reason}: checkpoint saved at step {step};{writer} "
          f"continue with: python main.py --name {shlex.quote(run.cfg.name)}{where} --resume")
