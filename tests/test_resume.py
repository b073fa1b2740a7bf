"""Never lose a run: killed, interrupted and diverging runs, as real processes."""
import re
import subprocess
import sys

import pytest
from PIL import Image

from conftest import ENV, ROOT, read_tensorboard, run_cli, tiny_data

pytestmark = pytest.mark.slow  # every test trains in real processes


def start_cli(*args, cwd):
    return subprocess.Popen([sys.executable, str(ROOT / "main.py"), *map(str, args)], cwd=cwd,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path, process, seconds=300):
    """Poll until `path` exists (the run reached that point) or the process ends."""
    import time
    deadline = time.time() + seconds
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.2)


def latest_checkpoint_step(run):
    import tensorflow as tf
    latest = tf.train.latest_checkpoint(str(run / "checkpoints"))
    return int(latest.rsplit("-", 1)[1])


def test_killed_run_leaves_loadable_files_resumes_where_it_stopped_and_nan_keeps_them(tmp_path):
    import hashlib
    import keras
    import tensorflow as tf
    tiny_data(tmp_path / "data")
    common = ("--data", "data", "--name", "k")
    process = start_cli(*common, "--image-size", 32, "--epochs", 3, "--checkpoint-every", 2,
                        "--sample-every", 1, "--save-every", 1, cwd=tmp_path)
    run = tmp_path / "results" / "k"
    wait_for(run / "checkpoints" / "ckpt-6.index", process)  # mid epoch 2 of 3 (4 steps each)
    process.kill()
    process.wait()

    for model in (run / "models").glob("*.h5"):
        keras.models.load_model(model, compile=False)
    for png in (run / "samples").glob("*.png"):
        Image.open(png).verify()
    saved_step = latest_checkpoint_step(run)
    assert saved_step >= 6
    tf.train.load_checkpoint(tf.train.latest_checkpoint(str(run / "checkpoints")))

    result = run_cli(*common, "--resume", cwd=tmp_path)
    assert f"Resuming run k at step {saved_step}." in result.stdout
    assert latest_checkpoint_step(run) == 12
    assert sorted(p.name for p in (run / "samples").iterdir()) == [
        "epoch_0001.png", "epoch_0002.png", "epoch_0003.png"]
    assert len(history_epochs(run)) == 3
    steps = [e.step for e in read_tensorboard(tmp_path / "logs" / "k").Tensors("loss/D_A")]
    assert max(steps) == 12 and min(steps) == 1  # continues, no restart at 0

    again = run_cli(*common, "--resume", cwd=tmp_path)
    assert "already finished" in again.stdout

    # Diverging: an absurd learning rate makes a loss NaN; nothing good is overwritten.
    digest = lambda: {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in (run / "models").iterdir()}
    before = digest()
    nan = run_cli(*common, "--resume", "--epochs", 4, "--lr", "1e30", cwd=tmp_path, check=False)
    assert nan.returncode == 3
    assert "became nan at step" in nan.stderr and nan.stderr.strip().count("\n") == 0
    assert digest() == before
    assert latest_checkpoint_step(run) == 12


def history_epochs(run):
    import cyclegan
    from run_folder import RunFolder
    history = RunFolder(run.parent, run.parent, run.name).losses_history(cyclegan.LOSS_NAMES)
    return history.read()["epoch"]


def test_sigint_saves_a_checkpoint_exits_zero_and_locks_out_a_second_process(tmp_path):
    import signal
    tiny_data(tmp_path / "data")
    process = start_cli("--data", "data", "--name", "s", "--image-size", 32, "--epochs", 50,
                        "--checkpoint-every", 3, cwd=tmp_path)
    run = tmp_path / "results" / "s"
    wait_for(run / "checkpoints" / "ckpt-3.index", process)
    # While it runs, a second process on the same name is refused, whatever it asks.
    for extra in (["--resume"], ["--overwrite"]):
        second = run_cli("--data", "data", "--name", "s", "--image-size", 32, *extra, cwd=tmp_path,
                         check=False)
        assert second.returncode == 2 and "in use by another process" in second.stderr, second.stderr
        assert second.stderr.strip().count("\n") == 0
    assert (run / "config.json").is_file() and list((run / "checkpoints").glob("*.index"))
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert "SIGINT: checkpoint saved at step" in out
    stopped = int(out.split("checkpoint saved at step ")[1].split(";")[0])
    assert latest_checkpoint_step(run) == stopped >= 3


def test_a_stop_at_an_epochs_last_step_still_writes_that_epoch(tmp_path, monkeypatch):
    """SIGINT during the last step of epoch 1, then of the last epoch: rows, samples, models."""
    import signal
    import main
    import cyclegan
    real_step = cyclegan.CycleGAN.train_step
    calls = {"n": 0, "stop_at": 4}

    def step_then_signal(*args):
        losses = real_step(*args)
        calls["n"] += 1
        if calls["n"] == calls["stop_at"]:
            signal.raise_signal(signal.SIGINT)
        return losses
    monkeypatch.setattr(cyclegan.CycleGAN, "train_step", step_then_signal)
    tiny_data(tmp_path / "data")  # 4 A images: 4 steps per epoch
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "results" / "e"
    common = ["--data", "data", "--name", "e"]
    assert main.main(common + ["--image-size", "32", "--epochs", "2", "--sample-every", "1",
                              "--save-every", "5"]) == 0
    assert latest_checkpoint_step(run) == 4
    assert list(history_epochs(run)) == [1]
    assert (run / "samples" / "epoch_0001.png").is_file()

    calls.update(n=0, stop_at=4)  # the resumed run's 4th step is the last of the last epoch
    assert main.main(common + ["--resume"]) == 0
    assert list(history_epochs(run)) == [1, 2]
    assert sorted(p.name for p in (run / "models").iterdir()) == [
        "discriminatorA.h5", "discriminatorB.h5", "generatorAToB.h5", "generatorBToA.h5"]
    assert latest_checkpoint_step(run) == 8


SMALL = ("--image-size", 32, "--filters", 4, "--res-blocks", 1, "--disc-filters", 4,
         "--epochs", 50, "--checkpoint-every", 2)


def test_a_dataset_moved_away_mid_run_ends_it_in_one_line_keeping_the_checkpoint(tmp_path):
    tiny_data(tmp_path / "data")
    process = start_cli("--data", "data", "--name", "v", *SMALL, cwd=tmp_path)
    run = tmp_path / "results" / "v"
    wait_for(run / "checkpoints" / "ckpt-2.index", process)
    (tmp_path / "data").rename(tmp_path / "data_moved")
    _, err = process.communicate(timeout=120)
    assert process.returncode == 2, err
    assert err.startswith("error: a training image can no longer be read (") and "data/train" in err
    assert "moved, deleted or changed" in err and err.strip().count("\n") == 0, err
    saved = latest_checkpoint_step(run)
    assert saved >= 2
    import tensorflow as tf
    tf.train.load_checkpoint(tf.train.latest_checkpoint(str(run / "checkpoints")))


def test_sigterm_while_the_input_is_stuck_ends_the_run_within_seconds(tmp_path):
    """An image that became a pipe nobody writes to: reading it blocks inside TensorFlow."""
    import os
    import signal
    import time
    tiny_data(tmp_path / "data")
    process = start_cli("--data", "data", "--name", "f", *SMALL, cwd=tmp_path)
    run = tmp_path / "results" / "f"
    wait_for(run / "checkpoints" / "ckpt-2.index", process)
    for image in (tmp_path / "data" / "trainA").iterdir():
        image.unlink()
        os.mkfifo(image)
    time.sleep(5)  # the batches read ahead are used up: the loop waits
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=tu_grace() + 60)
    assert process.returncode == 128 + signal.SIGTERM, err
    # Stuck where the images are read: for a batch, or for a checkpoint of the input position.
    assert re.fullmatch(r"SIGTERM: still waiting for (the next batch of training images|the "
                        r"checkpoint to be written); stopped without a new checkpoint; the last "
                        r"one is kept \(--resume continues from it\)", err.strip()), err
    assert latest_checkpoint_step(run) >= 2


def tu_grace():
    import train_utils
    return train_utils.StopOnSignal.GRACE_S


def test_a_run_holds_its_log_folder_against_another_results_dir_and_sighup_saves(tmp_path):
    """Run B (--results-dir r2, same --name) may not empty the logs run A writes; closing A's
    terminal (SIGHUP) saves a checkpoint as SIGTERM does."""
    import signal
    from run_folder import RUN_MARK
    tiny_data(tmp_path / "data")
    process = start_cli("--data", "data", "--results-dir", "r1", "--name", "shared", *SMALL,
                        cwd=tmp_path)
    wait_for(tmp_path / "r1" / "shared" / "checkpoints" / "ckpt-2.index", process)
    older = tmp_path / "r2" / "shared"  # an older run of that name in other results
    older.mkdir(parents=True)
    (older / RUN_MARK).write_text("")
    (older / "config.json").write_text("{}")
    (events,) = (tmp_path / "logs" / "shared").glob("events.out.tfevents.*")
    second = run_cli("--data", "data", "--results-dir", "r2", "--name", "shared", "--overwrite",
                     *SMALL, cwd=tmp_path, check=False)
    assert second.returncode == 2 and second.stderr.strip().count("\n") == 0, second.stderr
    assert "logs/shared is in use by another run (pid" in second.stderr
    assert events.is_file() and (older / "config.json").read_text() == "{}"
    process.send_signal(signal.SIGHUP)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert re.search(r"SIGHUP: checkpoint saved at step (\d+); continue with: python main.py "
                     r"--name shared --results-dir r1 --resume", out), out
    stopped = int(out.split("checkpoint saved at step ")[1].split(";")[0])
    assert latest_checkpoint_step(tmp_path / "r1" / "shared") == stopped >= 2
    steps = [e.step for e in read_tensorboard(tmp_path / "logs" / "shared").Tensors("loss/D_A")]
    assert min(steps) == 1 and max(steps) == stopped


def test_closing_the_terminal_a_run_started_in_saves_a_checkpoint(tmp_path):
    """A real hang-up: the run's terminal (a pseudo-terminal here) goes away; writing to it
    fails from then on, yet the run saves and ends as on SIGTERM."""
    import fcntl
    import os
    import pty
    import termios
    import threading
    tiny_data(tmp_path / "data")
    master, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "main.py"), "--data", "data", "--name", "h",
         *map(str, SMALL), "--checkpoint-every", "1000"], cwd=tmp_path, env=ENV, stdin=terminal, stdout=terminal,
        stderr=terminal, start_new_session=True,
        preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))  # its controlling terminal
    os.close(terminal)
    shown, started = [], threading.Event()

    def read():  # as a terminal shows what it is sent, until it is closed
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                return
            if not chunk:
                return
            shown.append(chunk)
            if b"Whole run:" in b"".join(shown):  # steps are being trained
                started.set()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert started.wait(300), b"".join(shown).decode(errors="replace")
    os.close(master)  # the terminal closes: the kernel sends SIGHUP
    assert process.wait(timeout=120) == 0
    assert latest_checkpoint_step(tmp_path / "results" / "h") >= 1
