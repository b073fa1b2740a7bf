"""What users look at: progress lines, TensorBoard, loss curves, sample grids, the results page."""
import io
import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import cyclegan
import report
from config import make_config
from conftest import page_links, read_tensorboard
from run_folder import RunFolder


@pytest.fixture(scope="module")
def small_gan():
    keras.utils.set_random_seed(0)
    return cyclegan.CycleGAN(make_config(image_size=32, precision="float32"))


def test_sample_grid_is_written(small_gan, tmp_path):
    batch = np.zeros((2, 32, 32, 3), np.float32)
    path = tmp_path / "epoch_0001.png"
    report.save_sample_grid(small_gan, batch, batch, path, "test")
    assert Image.open(path).size[0] > 100
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_sample_grid_takes_domains_with_different_sample_counts(small_gan, tmp_path):
    rng = np.random.default_rng(0)
    three, two = (rng.uniform(-1, 1, (n, 32, 32, 3)).astype(np.float32) for n in (3, 2))
    report.save_sample_grid(small_gan, three, two, tmp_path / "grid.png", "3 A, 2 B")
    report.save_sample_grid(small_gan, two, three, tmp_path / "grid2.png", "2 A, 3 B")
    for name in ("grid.png", "grid2.png"):
        Image.open(tmp_path / name).verify()


def test_loss_curves_show_the_generator_terms_on_a_panel_of_their_own(tmp_path):
    history = RunFolder(tmp_path, tmp_path, "run").losses_history(cyclegan.LOSS_NAMES)
    history.path.parent.mkdir(parents=True)
    for epoch in (1, 2, 3):
        history.append(epoch, {k: (30.0 if k == cyclegan.G_TOTAL else 0.1) * epoch
                               for k in cyclegan.LOSS_NAMES})
    drawn = {}
    original = report.save_figure
    report.save_figure = lambda fig, path: drawn.update(fig=fig) or original(fig, path)
    try:
        report.save_loss_curves(history, tmp_path / "loss_curves.png", cyclegan.CycleGAN.LOSS_PANELS)
    finally:
        report.save_figure = original
    panels = {ax.get_title(): {line.get_label() for line in ax.get_lines()} for ax in drawn["fig"].axes}
    terms = next(labels for title, labels in panels.items() if "each term" in title)
    assert terms == set(cyclegan.OUTPUT_NAMES)  # readable: not beside G_total's scale
    assert all(cyclegan.G_TOTAL not in labels for title, labels in panels.items() if "each term" in title)
    assert (tmp_path / "loss_curves.png").stat().st_size > 1000


def test_one_training_is_one_tensorboard_run_with_grouped_tags_and_its_graph(small_gan, tmp_path):
    logger = report.TensorBoardLogger(tmp_path / "run")
    logger.losses({"D_A": 0.5, "G_total": 3.0}, 2e-4, step=1)
    logger.losses({"D_A": 0.25, "G_total": 2.0}, 1e-4, step=2)
    logger.metrics({"truth_PSNR": 20.0}, step=2)
    grid = tmp_path / "grid.png"
    report.save_sample_grid(small_gan, np.zeros((1, 32, 32, 3), np.float32),
                            np.zeros((1, 32, 32, 3), np.float32), grid, "t")
    logger.image_file(report.SAMPLES_TAG, grid, step=2)
    logger.graph(small_gan.g_ab, small_gan.d_a)
    logger.flush()
    assert [p for p in (tmp_path / "run").iterdir() if p.is_dir()] == []  # no companion runs
    events = read_tensorboard(tmp_path / "run")
    d_a = events.Tensors("loss/D_A")
    assert [e.step for e in d_a] == [1, 2]
    assert [float(tf.make_ndarray(e.tensor_proto)) for e in d_a] == [0.5, 0.25]
    tags = set(events.Tags()["tensors"])
    assert tags == {"loss/D_A", "loss/G_total", "train/learning_rate", "metrics/truth_PSNR", "samples"}
    assert events.Graph().node  # both networks in the run's one graph
    names = {node.name.split("/")[0] for node in events.Graph().node}
    assert any("generator_AtoB" in n for n in names) and any("discriminator_A" in n for n in names)


def test_results_page_links_resolve_and_a_damaged_json_never_stops_it(small_gan, tmp_path):
    run = RunFolder(tmp_path / "results", tmp_path / "logs", "run")
    run.samples.mkdir(parents=True)
    run.config.write_text(json.dumps({"name": "run", "image_size": 32}))
    run.metrics.write_text(json.dumps({"source": "test", "metrics": {"new_score": 0.125,
                                                                      "cycle_L1_A": 0.25}}))
    for epoch in (1, 2):
        report.save_sample_grid(small_gan, np.zeros((1, 32, 32, 3), np.float32),
                                np.zeros((1, 32, 32, 3), np.float32), run.sample(epoch), "t")
    report.write_results_page(run)
    assert page_links(run.page) == ["config.json", "metrics.json", "samples/epoch_0002.png",
                                    "samples/epoch_0001.png"]
    page = run.page.read_text()
    assert "<th>new_score</th><td>0.125</td>" in page  # a score without a label still shows
    assert "<th>cycle A-&gt;B-&gt;A, L1</th><td>0.25</td>" in page
    run.metrics.write_text("{not json")
    run.config.write_text("[]")
    report.write_results_page(run)
    assert "samples/epoch_0002.png" in run.page.read_text()
    assert not list(run.root.glob(".*tmp*"))


def test_score_table_puts_labelled_scores_first():
    assert report.format_table({"new_score": 0.125, "cycle_L1_A": 0.25}).splitlines() == [
        "cycle A->B->A, L1  0.25", "new_score          0.125"]


def test_progress_off_a_terminal_is_plain_lines_with_the_whole_runs_estimate(monkeypatch):
    out = io.StringIO()  # not a terminal, as a file under nohup or a cluster's log
    clock = iter(range(1000))
    monkeypatch.setattr(report.time, "monotonic", lambda: float(next(clock)))
    progress = report.RunProgress(steps_per_epoch=20, epochs=3, step=0,
                                  names=cyclegan.CycleGAN.PROGRESS_NAMES, out=out)
    step = 0
    for epoch in (1, 2):
        progress.start_epoch(epoch, 2e-4, step)
        for _ in range(20):
            step += 1
            progress.step_done(step, {"D_A": 0.5, "D_B": 0.25, "G_total": 3.0})
        progress.end_epoch(step, {"D_A": 0.5, "D_B": 0.25, "G_total": 3.0})
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text and "\b" not in text
    lines = text.splitlines()
    assert lines[0].startswith("Run: 60 steps in all (3 epochs of 20)")
    estimate = next(line for line in lines if line.startswith("Whole run:"))
    assert lines.index(estimate) == 1  # within the first epoch, long before its end
    assert "s/step" in estimate and "steps left" in estimate
    epochs = [line for line in lines if line.startswith("Epoch ")]
    assert [line.split(":")[0] for line in epochs] == ["Epoch 1/3", "Epoch 2/3"]
    assert "step 40/60" in epochs[1] and "D_A 0.5" in epochs[1] and "20 steps left" in epochs[1]
    assert len(lines) == 4


def test_durations_read_as_people_read_them():
    assert [report.duration(s) for s in (12, 245, 3 * 3600 + 1200, 2 * 86400 + 3 * 3600)] == [
        "12s", "4m 05s", "3h 20m", "2d 3h"]


def test_a_count_off_a_terminal_is_plain_lines_at_most_every_few_seconds_and_at_its_end(monkeypatch):
    import io
    clock = iter([0.0, 1.0, report.PLAIN_EVERY_S + 1.0, report.PLAIN_EVERY_S + 2.0])
    monkeypatch.setattr(report.time, "perf_counter", lambda: next(clock))
    out = io.StringIO()
    progress = report.CountProgress(3, "images", out)
    progress.add(1)   # at 1 s: too soon for a line
    progress.add(1)   # at 11 s
    progress.finish()  # at 12 s, one short of its total
    lines = out.getvalue().splitlines()
    assert lines == ["2/3 images, 0.182 images/s", "2/3 images, 0.167 images/s"]
    assert not any(c in out.getvalue() for c in "\r\x1b\b")
