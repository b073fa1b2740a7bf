"""Help texts: every flag explains itself, and docs/flags.md's table is made from them."""
import argparse
import dataclasses
import re

import pytest

import config
import flags
import main
from conftest import ROOT


def train_parser():
    commands = next(a for a in main.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices["train"]


def test_every_train_flag_has_help_text_with_its_defaults():
    helps = {a.dest: a.help for a in train_parser()._actions if a.dest != "help"}
    assert set(helps) == {f.name for f in dataclasses.fields(config.Config)} | set(flags.RUN_FLAGS)
    assert all(helps.values())
    assert helps["lambda_identity"].endswith("(relative to --lambda_A) is 5 here (default 1; paper 5)")
    assert helps["image_size"].endswith("(default 128; paper 256; demo data 32)")
    assert helps["global_skip"].endswith("(default off; fast on)")


def test_train_help_shows_the_help_texts(capsys):
    with pytest.raises(SystemExit):
        main.parse_args(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--resume continue the run NAME from its latest checkpoint" in out
    assert "--lambda_identity 0.5 (relative to --lambda_A) is 5 here (default 1; paper 5)" in out


def test_flag_table_is_the_generated_one():
    page = (ROOT / "docs" / "flags.md").read_text()
    table = re.search(r"<!-- flags: .*? -->\n(.*?)\n<!-- end of flags -->", page, re.S)
    assert table, "docs/flags.md lacks the generated flag table"
    assert table.group(1) == flags.flags_markdown(), "regenerate it with: python flags.py"


def test_a_run_name_fits_a_file_name_with_what_the_program_adds_to_it():
    config.check_run_name("é" * 125)  # 250 bytes: NAME-eval has 255
    for name in ("x" * 251, "é" * 126):
        with pytest.raises(config.UserError, match="at most 250 bytes"):
            config.check_run_name(name)
