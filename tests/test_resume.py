"""Never lose a run: killed, interrupted and diverging runs, as real processes."""
import re
import subprocess
import sys

from PIL import Image

from conftest import ENV, ROOT, read_tensorboard, run_cli, tiny_data


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
