"""A training run: its folder, set-up, resume, the loop over epochs and what each epoch writes.

`python main.py` turns the flags into a Config and calls `train`; the
pieces the loop uses (the step, pools, checkpoints, logging, samples) are
in train_utils.py.
"""
import contextlib
import dataclasses
import json
import shutil
from collections import defaultdict
from pathlib import Path

import keras

import config
import data
import metrics
import machine
import models
import train_utils as tu
from config import UserError
from fileio import atomic_write

SAMPLE_COUNT = 3
# A checkpoint holds the input position, which waits for the images being read.
SAVING = "the checkpoint to be written"


def saved_config(given):
    """The Config of the run given["name"] to resume, with the flags in `given` applied.

    Flags may change only what neither shapes the networks nor the data
    (config.RESUME_FIXED); a run saved before a setting existed keeps what
    it was trained with (config.BEFORE_IT_WAS_SAVED).
    """
    path = Path(given.get("results_dir", config.Config.results_dir)) / given["name"] / "config.json"
    if not path.is_file():
        raise UserError(f"--resume: no run {given['name']!r} in {path.parent.parent}")
    saved = {**config.BEFORE_IT_WAS_SAVED, **json.loads(path.read_text())}
    if "mixed_precision" in saved:  # a run from before --precision
        saved["precision"] = "float16" if saved.pop("mixed_precision") else "float32"
    for field in config.RESUME_FIXED:
        if field in given and given[field] != saved[field]:
            raise UserError(f"--resume: run {given['name']!r} was trained with "
                            f"{config.flag(field)} {saved[field]}, not {given[field]}")
    given = {k: v for k, v in given.items() if k != "preset"}  # equal to the saved one here
    return config.make_config(saved.pop("preset"), **{**saved, **given})


def run_paths(cfg):
    root = Path(cfg.results_dir) / cfg.name
    return {"root": root, "samples": root / "samples", "models": root / "models",
            "checkpoints": root / "checkpoints", "history": root / "losses.csv",
            "curves": root / "loss_curves.png", "config": root / "config.json"}


def open_run_folder(cfg, paths, resume, overwrite):
    """Lock results/NAME for this process; refuse to clobber an earlier run by accident."""
    lock = tu.RunLock(paths["root"])
    try:
        earlier = [p for p in paths["root"].iterdir() if p.name != tu.RunLock.FILE]
        if earlier and not resume:
            if not overwrite:
                raise UserError(f"{paths['root']} already holds a run; pass --resume to continue "
                                "it, --overwrite to replace it or --name to start another")
            clear_run(cfg, earlier)
        paths["samples"].mkdir(parents=True, exist_ok=True)
    except BaseException:
        lock.release()
        raise
    return lock


def clear_run(cfg, entries):
    """--overwrite: remove `entries` of results/NAME and the folder logs/NAME, nothing else."""
    for parent in (cfg.results_dir, cfg.log_dir):
        folder = Path(parent) / cfg.name
        if folder.is_symlink() or folder.resolve().parent != Path(parent).resolve():
            raise UserError(f"--overwrite: {folder} is not a folder inside {parent}; remove it by hand")
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    shutil.rmtree(Path(cfg.log_dir) / cfg.name, ignore_errors=True)


def save_config(cfg, paths):
    with atomic_write(paths["config"]) as tmp:
        tmp.write_text(json.dumps(dataclasses.asdict(cfg), indent=2))


def sample_files(root, domain, cfg, count):
    """A few fixed test images (train images when there is no test split)."""
    try:
        return data.domain_files(root, "test", domain)[:count]
    except data.DataError:
        return data.domain_files(root, "train", domain, cfg.limit)[:count]


def train(cfg, resume=False, overwrite=False):
    """Train the run cfg.name: a new one, or with `resume` the one results/NAME holds.

    Of several workers (--strategy multiworker) only the chief writes files.
    """
    # Before any TensorFlow op runs: --strategy multiworker sets up collective
    # ops, which TensorFlow accepts only at program start-up.
    strategy = machine.make_strategy(cfg.strategy)
    precision, why = machine.choose_precision(cfg.precision)
    cfg = dataclasses.replace(cfg, precision=precision)  # config.json records the choice
    print(f"Precision: {precision} ({why})")
    if cfg.data == "demo":
        print("Training on the built-in demo data (pass --data NAME or --data PATH for your own).")
    root = data.resolve_dataset(cfg.data)
    files_a = data.domain_files(root, "train", "A", cfg.limit)
    files_b = data.domain_files(root, "train", "B", cfg.limit)
    paths = run_paths(cfg)
    chief = strategy.extended.should_checkpoint  # only the chief holds the run folder
    with open_run_folder(cfg, paths, resume, overwrite) if chief else contextlib.nullcontext(), \
            machine.lost_workers_as_user_error():
        run_training(cfg, strategy, root, files_a, files_b, paths, resume)


@dataclasses.dataclass
class Run:
    """What the loop works with: the networks and their data, and where each output goes."""
    cfg: config.Config
    paths: dict
    strategy: object
    gan: object
    pools: tuple
    batches: object
    checkpoint: tu.RunCheckpoint
    steps: int                # per epoch
    samples: tuple            # fixed (A, B) batches drawn in each sample grid
    probe: tuple              # fixed images scored at each sample epoch
    logger: tu.TensorBoardLogger = None
    history: tu.LossHistory = None

    @property
    def chief(self):
        """Of several workers, the one that writes; the only one otherwise."""
        return self.strategy.extended.should_checkpoint


def run_training(cfg, strategy, root, files_a, files_b, paths, resume):
    """Set up, restore, and run the epochs of a run whose folder this process holds."""
    run, step = set_up(cfg, strategy, root, files_a, files_b, paths, resume)
    if resume and step >= run.steps * cfg.total_epochs:
        if run.chief and not all((paths["models"] / f).is_file() for f in tu.MODEL_FILES.values()):
            tu.save_models(run.gan, paths["models"])
        print(f"Run {cfg.name} already finished ({step} steps); nothing to do.")
        return
    if resume:
        print(f"Resuming run {cfg.name} at step {step}.")
    run.logger = tu.TensorBoardLogger(cfg.log_dir, cfg.name) if run.chief else tu.NoLogger()
    run.logger.graph(run.gan.g_ab)
    run.logger.graph(run.gan.d_a)
    run.history = tu.LossHistory(paths["history"])
    print(f"{len(files_a)} A and {len(files_b)} B images, {run.steps} steps per epoch, "
          f"{cfg.total_epochs} epochs; TensorBoard: tensorboard --logdir {cfg.log_dir}")
    replicas = strategy.num_replicas_in_sync
    if replicas > 1:
        print(f"{replicas} replicas: global batch {cfg.batch_size * replicas} per domain")
    run_epochs(run, step)


def set_up(cfg, strategy, root, files_a, files_b, paths, resume):
    """The Run, fresh or restored from its newest good checkpoint, and its step."""
    fixed_a, fixed_b = (sample_files(root, d, cfg, max(SAMPLE_COUNT, metrics.PROBE_IMAGES))
                        for d in "AB")
    samples = tuple(data.load_batch(f[:SAMPLE_COUNT], cfg.image_size) for f in (fixed_a, fixed_b))
    probe = metrics.probe_set(fixed_a, fixed_b, cfg.image_size)
    with tu.out_of_memory_as_user_error(cfg):
        gan, pools, batches = tu.start_run(cfg, files_a, files_b, strategy)
    with strategy.scope():
        checkpoint = tu.RunCheckpoint(gan, pools, batches, paths["checkpoints"], cfg.image_size)
    steps = data.steps_per_epoch(files_a, files_b, cfg, strategy.num_replicas_in_sync)
    step = checkpoint.restore() if resume else 0
    run = Run(cfg, paths, strategy, gan, pools, batches, checkpoint, steps, samples, probe)
    if run.chief:
        save_config(cfg, paths)  # only now: a failed resume leaves the run's settings as they were
    return run, step


def run_epochs(run, step):
    """The loop: steps, logging and checkpoints; each epoch's outputs; a stop on request."""
    cfg, steps = run.cfg, run.steps
    checkpoint_every = cfg.checkpoint_every or steps
    with tu.StopOnSignal() as stop, tu.out_of_memory_as_user_error(cfg):
        for epoch in range(step // steps + 1, cfg.total_epochs + 1):
            lr = tu.learning_rate(epoch - 1, cfg)
            tu.set_learning_rate(run.gan, lr)
            print(f"Epoch {epoch}/{cfg.total_epochs} (learning rate {lr:.3g})")
            bar = keras.utils.Progbar(steps, stateful_metrics=tu.LOSS_NAMES)
            sums = defaultdict(float)
            first = step % steps
            for i in range(first, steps):
                with stop.waiting("the next batch of training images"):
                    real_a, real_b = data.next_batch(run.batches)
                with stop.waiting_for_workers(run.strategy):
                    losses = tu.train_step(run.gan, real_a, real_b, run.pools, cfg)
                tu.check_finite(losses, step + 1)
                step += 1
                for key, value in losses.items():
                    sums[key] += value
                if step % cfg.log_every == 0:
                    run.logger.scalars({**losses, "learning_rate": lr}, step)
                bar.update(i + 1, [(k, losses[k]) for k in tu.PROGRESS_NAMES])
                with stop.waiting_for_workers(run.strategy):
                    stopping = tu.agreed_stop(run.strategy, stop.requested)
                mid_epoch = i + 1 < steps  # at its end, the epoch's outputs come first
                if run.chief and mid_epoch and (step % checkpoint_every == 0 or stopping):
                    with stop.waiting(SAVING):
                        run.checkpoint.save(step)
                if mid_epoch and stopping:
                    return stopped(stopping, run, step)
            if run.chief:
                write_epoch_outputs(run, epoch, step,
                                    {k: v / (steps - first) for k, v in sums.items()})
                if step % checkpoint_every == 0 or stopping:
                    with stop.waiting(SAVING):  # after the epoch's outputs: a resume never skips them
                        run.checkpoint.save(step)
                run.logger.flush()
            if stopping and epoch < cfg.total_epochs:
                return stopped(stopping, run, step)
    print(f"Done: samples, loss curves and models in {run.paths['root']}" if run.chief else
          "Done: this worker's part is over; the chief wrote the results")


def write_epoch_outputs(run, epoch, step, mean_losses):
    """The epoch's loss row; at its cadence, samples, curves, metrics and the .h5 models."""
    cfg, paths = run.cfg, run.paths
    run.history.append(epoch, mean_losses)
    last = epoch == cfg.total_epochs
    if epoch % cfg.sample_every == 0 or last:
        grid = paths["samples"] / f"epoch_{epoch:04d}.png"
        tu.save_sample_grid(run.gan, *run.samples, grid, f"{cfg.name}, epoch {epoch}")
        run.logger.image_file("samples", grid, step)
        tu.save_loss_curves(run.history, paths["curves"])
        metrics.track(run.gan, run.probe, paths["root"], run.logger, step, epoch)
    if epoch % cfg.save_every == 0 or last:
        tu.save_models(run.gan, paths["models"])


def stopped(reason, run, step):
    run.logger.flush()
    writer = "" if run.chief else " (by the chief worker)"
    print(f"\n{reason}: checkpoint saved at step {step};{writer} "
          f"continue with: python main.py --name {run.cfg.name} --resume")
