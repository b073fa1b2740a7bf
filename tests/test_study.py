import re

import pytest

import config
import study
from test_cli import one_line_error, run_cli


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


def test_study_command_prints_a_row_per_variant_with_its_numbers(tmp_path):
    result = run_cli("study", "--datasets", "demo", "--variants", "fast", "--steps", 2,
                     cwd=tmp_path)
    number = r"\s+[+-]?\d+\.\d+"
    rows = [line for line in result.stdout.splitlines()
            if re.match(rf"demo\s+fast{number * 4}$", line)]
    assert len(rows) == 2  # as it goes, then in the table
    assert "demo: doing nothing scores" in result.stdout
    assert re.search(r"^1 run\(s\) in \d+\.\d minutes$", result.stdout, re.M)
    assert (tmp_path / "datasets" / "demo" / "testA_truth").is_dir()


def test_study_steps_below_two_is_a_one_line_error(capsys):
    assert "--steps must be at least 2" in one_line_error(["study", "--steps", 1], capsys)
