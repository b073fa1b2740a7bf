import subprocess
import sys

import numpy as np
import pytest

import keras

import train_utils
from conftest import ENV, ROOT


def test_non_finite_loss_stops_training_with_its_name_and_step():
    train_utils.check_finite({"D_A": 0.5, "G_total": 3.0}, step=7)
    with pytest.raises(train_utils.TrainingDiverged, match="loss adv_B became nan at step 7"):
        train_utils.check_finite({"D_A": 0.5, "adv_B": float("nan")}, step=7)
    with pytest.raises(train_utils.TrainingDiverged, match="inf"):
        train_utils.check_finite({"G_total": float("inf")}, step=1)
    with pytest.raises(train_utils.TrainingDiverged, match="training stopped, what is kept "):
        train_utils.check_finite({"G_total": float("inf")}, step=1, kept=lambda: "what is kept")


def test_fit_batch_traces_a_models_train_step_once():
    """What fit_batch's private `_symbolic_build` call buys: one trace of the step, not two."""
    def counted_model():
        inputs = keras.Input((4,))
        model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
        model.compile(optimizer="adam", loss="mse")
        traces, step = [], model.train_step
        model.train_step = lambda batch: (traces.append(1), step(batch))[1]
        return model, traces

    x, y = np.ones((2, 4), np.float32), np.ones((2, 2), np.float32)
    plain, plain_traces = counted_model()
    ours, our_traces = counted_model()
    for _ in range(2):
        plain.train_on_batch(x, y)
        train_utils.fit_batch(ours, x, y)
    assert len(our_traces) == 1
    assert len(plain_traces) == 2, "Keras now traces once by itself: fit_batch's _symbolic_build can go"


BLOCKED = f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
import tensorflow as tf
import train_utils
os.mkfifo("fifo")  # nothing ever writes to it: reading it blocks inside TensorFlow
batches = iter(tf.data.Dataset.from_tensors("fifo").map(tf.io.read_file))
with train_utils.StopOnSignal() as stop, stop.waiting("a file that never comes"):
    print("waiting", flush=True)
    next(batches)
"""


@pytest.mark.parametrize("signals, timeout, code, words", [
    (["SIGTERM"], None, 143, "SIGTERM: still waiting for a file that never comes; stopped"),
    (["SIGINT", "SIGINT"], None, 130, "SIGINT again: stopped at once"),
    ([], "2", 2, "error: waited 2 s for a file that never comes (CYCLEGAN_TIMEOUT sets how long)"),
])
@pytest.mark.slow
def test_a_wait_blocked_inside_tensorflow_still_ends_on_a_signal_or_its_deadline(
        tmp_path, signals, timeout, code, words):
    """A Python signal handler cannot run while the main thread blocks in TensorFlow."""
    import signal
    import time
    env = {**ENV, "CYCLEGAN_TIMEOUT": timeout} if timeout else ENV
    process = subprocess.Popen([sys.executable, "-c", BLOCKED], cwd=tmp_path, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout.readline() == "waiting\n", process.communicate()
    for name in signals:
        time.sleep(0.5)
        process.send_signal(getattr(signal, name))
    _, err = process.communicate(timeout=train_utils.StopOnSignal.GRACE_S + 30)
    last = err.strip().splitlines()[-1]  # after TensorFlow's own start-up notes
    assert process.returncode == code, err
    assert last.startswith(words) and "without a new checkpoint; the last one is kept" in last, err


def test_a_start_without_a_test_split_checks_each_image_once_and_a_second_start_none(
        tmp_path, monkeypatch, capsys, recwarn):
    """The sample images fall back to the run's own train images, checked once; the next start
    finds the checks remembered. A first step that diverges says that nothing was kept."""
    import os
    import cyclegan
    import image_files
    from conftest import one_line_error, write_images
    for i, sub in enumerate(("trainA", "trainB")):
        write_images(tmp_path / "data" / sub, 3, seed=i)
    (tmp_path / "data" / "trainA" / "broken.jpg").write_bytes(b"")
    decoded = []
    real = image_files.tensorflow_decodes
    monkeypatch.setattr(image_files, "tensorflow_decodes", lambda images: decoded.extend(
        os.path.basename(i) for i in images) or real(images))
    monkeypatch.setattr(cyclegan.CycleGAN, "train_step", lambda *args, **kwargs: dict.fromkeys(
        cyclegan.LOSS_NAMES, float("nan")))
    monkeypatch.chdir(tmp_path)
    args = ["--data", "data", "--image-size", 32, "--filters", 4, "--disc-filters", 4,
            "--res-blocks", 1, "--epochs", 1, "--name"]
    err = one_line_error(args + ["first"], capsys, code=3)
    assert "became nan at step 1; training stopped, no checkpoint or models were written" in err
    assert sorted(decoded) == sorted(f"img_00{i}.png" for i in (0, 0, 1, 1, 2, 2))
    skipped = [w for w in recwarn if w.category is image_files.SkippedImagesWarning]
    assert len(skipped) == 1 and "broken.jpg" in str(skipped[0].message)
    decoded.clear()
    one_line_error(args + ["second"], capsys, code=3)
    assert decoded == []


def test_a_full_disk_that_tensorflow_calls_resource_exhausted_is_no_memory_error():
    import tensorflow as tf
    from config import UserError, make_config
    cfg = make_config(image_size=32)
    full = tf.errors.ResourceExhaustedError(None, None, "logs/run/events.out; No space left on device")
    with pytest.raises(UserError, match=r"a write failed \(the disk is full\): logs/run") as error:
        with train_utils.out_of_memory_as_user_error(cfg):
            raise full
    assert "--image-size" not in str(error.value)
    with pytest.raises(UserError, match="out of memory with --image-size 32"):
        with train_utils.out_of_memory_as_user_error(cfg):
            raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")


def test_a_run_too_big_for_free_memory_on_a_cpu_is_refused_before_anything_is_written(
        tmp_path, monkeypatch, capsys):
    """On a CPU, running out of memory is the kernel's kill with no word: estimated first."""
    import functools
    import cyclegan
    import machine
    from config import make_config
    from conftest import one_line_error, tiny_data
    tiny_data(tmp_path / "data")
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:        2097152 kB\nMemFree:          524288 kB\n"
                       "MemAvailable:     1048576 kB\n")  # 1 GiB free
    monkeypatch.setattr(machine, "available_memory",
                        functools.partial(machine.available_memory, meminfo))
    monkeypatch.chdir(tmp_path)
    err = one_line_error(["--data", "data", "--image-size", 256, "--batch-size", 4,
                          "--name", "big"], capsys)
    assert "--image-size 256 and --batch-size 4 needs about" in err and "1.0 GiB of free" in err
    assert not (tmp_path / "results").exists() and not (tmp_path / "logs").exists()
    small = make_config(image_size=32, precision="float32")
    need = cyclegan.CycleGAN.memory_needed
    assert need(small) < 2 ** 30 < need(make_config(image_size=256, batch_size=4, precision="float32"))
    train_utils.check_training_memory(small, need(small))  # fits: no error
