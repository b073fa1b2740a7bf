import re

import numpy as np
import pytest
from PIL import Image

import config
import data
import generated
import study
import cyclegan
from conftest import one_line_error, run_cli


def test_fast_preset_changes_only_what_the_study_found_and_book_stays_the_default():
    fast, book = config.make_config("fast"), config.make_config()
    assert book == config.BOOK and book.preset == "book"
    changed = {f for f in config.Config.__dataclass_fields__ if getattr(fast, f) != getattr(book, f)}
    assert changed == {"preset", "res_norm", "disc_activation", "upsample", "global_skip"}
    assert (fast.res_norm, fast.disc_activation, fast.upsample) == ("instance", "linear", "resize")
    assert fast.global_skip


def test_every_variant_is_a_valid_config_and_one_change_from_book():
    for name, (preset, overrides) in study.VARIANTS.items():
        cfg = study.variant_config(name, 32, 0)
        assert cfg.preset == preset and cfg.image_size == 32
        assert len(overrides) <= 1


def test_unknown_variant_or_a_dataset_without_truth_fails_before_training(tiny_dataset):
    with pytest.raises(config.UserError, match="unknown study variant 'nope'"):
        study.run_study(["demo"], ["nope"])
    with pytest.raises(config.UserError, match="no testA_truth"):
        study.run_study([str(tiny_dataset)], ["book"])


@pytest.mark.slow
def test_study_command_prints_a_row_per_variant_and_dataset_with_its_numbers(tmp_path):
    # The demo twice, by name and by path: the second run restores the first's starting point.
    result = run_cli("study", "--datasets", "demo", "datasets/demo", "--variants", "fast",
                     "--steps", 2, "--samples", "side_by_side.png", cwd=tmp_path)
    number = r"\s+([+-]?\d+\.\d+)"
    rows = [re.match(rf"(demo|datasets/demo)\s+fast{number * 5}$", line)
            for line in result.stdout.splitlines()]
    rows = [row.groups() for row in rows if row]
    assert [row[0] for row in rows] == ["demo", "datasets/demo"] * 2  # as it goes, then the table
    by_name, by_path = rows[:2]
    assert by_name[1:5] == by_path[1:5]  # same data, same start: same scores
    assert "demo: doing nothing scores" in result.stdout
    assert re.search(r"^2 run\(s\) in \d+\.\d minutes$", result.stdout, re.M)
    assert (tmp_path / "datasets" / "demo" / "testA_truth").is_dir()
    # Per dataset its first test images (A, truth, the variant's G_AB(A)): six rows of three.
    assert "Samples side by side: side_by_side.png" in result.stdout
    grid = Image.open(tmp_path / "side_by_side.png")
    assert grid.width < grid.height  # three columns, six rows


def test_study_samples_grid_has_a_row_per_test_image_and_a_column_per_variant():
    images, truth = np.zeros((4, 8, 8, 3)), np.ones((4, 8, 8, 3))
    prepared = {"photos": (None, ([(images, truth)], []), 0.0)}
    rows = [("photos", name, {"samples": np.full((3, 8, 8, 3), k)})
            for k, name in enumerate(("fast", "cut"))]
    grid = study.sample_rows(prepared, rows)
    assert [[label for _, label in row] for row in grid] == [["photos: A", "truth", "fast", "cut"]] * 3
    assert grid[1][3][0].min() == 1  # cut's translation of the second image


def test_study_samples_must_be_a_new_png(tmp_path, capsys):
    (tmp_path / "old.png").write_bytes(b"x")
    for path, words in ((tmp_path / "grid.jpg", "must end in .png"), (tmp_path / "old.png", "already exists")):
        assert words in one_line_error(["study", "--samples", str(path)], capsys)


@pytest.mark.slow
def test_study_runs_on_both_photo_datasets_and_scores_against_the_colour_map_oracle(
        tmp_path, monkeypatch, capsys):
    # Stand-ins for scikit-image's photos: two textured images, one for each split.
    rng = np.random.default_rng(0)
    photos = {name: rng.integers(0, 256, (160, 160, 3), dtype=np.uint8) for name in ("one", "two")}
    monkeypatch.setattr(generated, "skimage_photos", lambda: photos)
    monkeypatch.setattr(generated, "PHOTO_TEST_COUNT", 1)
    monkeypatch.setattr(generated, "PHOTO_PATCHES", {"train": 4, "test": 4})
    rows = study.run_study(study.DATASETS, ["fast"], steps=2, datasets_dir=tmp_path)
    assert [(d, n) for d, n, _ in rows] == [("photos", "fast"), ("painterly", "fast")]
    out = capsys.readouterr().out
    for dataset, _, row in rows:
        assert (tmp_path / dataset / "testA_truth").is_dir()
        oracle_gain = row["colour_map_PSNR"] - row["baseline_PSNR"]
        assert row["gain_dB"] - row["over_colour_map_dB"] == pytest.approx(oracle_gain, abs=1e-4)
        assert (f"{dataset}: doing nothing scores {row['baseline_PSNR']:.2f} dB PSNR against the "
                f"truth; the best global colour map fitted to the truth scores "
                f"{row['colour_map_PSNR']:.2f} dB (gain {oracle_gain:+.2f} dB)\n") in out
        assert study.format_row(dataset, "fast", row) in out.splitlines()


def test_study_steps_below_two_is_a_one_line_error(capsys):
    assert "--steps must be at least 2" in one_line_error(["study", "--steps", 1], capsys)


@pytest.mark.slow
def test_a_restored_starting_point_trains_again_exactly_as_from_the_build(tiny_dataset):
    cfg = config.make_config(image_size=32, filters=8)
    files = [data.domain_files(tiny_dataset, "train", d) for d in "AB"]
    gan = cyclegan.CycleGAN.fresh(cfg)
    batches = iter(data.train_dataset(*files, cfg))
    start = study.StartingPoint(gan)
    weights = lambda: [v.numpy() for v in start.variables]
    gan.train_step(*next(batches))
    after_one_step = weights()
    assert gan.adversarial.optimizer.iterations.numpy() == 1
    assert not all(np.array_equal(a, b) for a, b in zip(after_one_step, start.values))

    start.restore()
    for now, then in zip(weights(), start.values):  # networks and optimizer states
        np.testing.assert_array_equal(now, then)
    batches = iter(data.train_dataset(*files, cfg))
    gan.train_step(*next(batches))
    for again, first in zip(weights(), after_one_step):
        np.testing.assert_allclose(again, first, atol=1e-6)
