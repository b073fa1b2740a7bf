"""Each flag declared once: every Config field is a flag of each command that takes it, with
its help beside the field (config.setting), its defaults shown, its check in config.validate;
the train command's own flags; and docs/flags.md's table, made from the same texts.

    python flags.py    # the table of docs/flags.md
"""
import argparse
import dataclasses

from config import CHOICES, DEMO_DEFAULTS, PRESETS, Config, flag


def add_config_flags(parser, names=None):
    """A flag per Config field (or per field in `names`): each flag declared once, with its
    help beside the field, its check in config.validate, and a default of None so the
    preset, the command (config.from_flags) or a saved run fills the gaps."""
    for field in dataclasses.fields(Config):
        if names is not None and field.name not in names:
            continue
        name = flag(field.name)
        text = flag_help(field).replace("%", "%%")
        if field.type is bool or isinstance(field.default, bool):
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            parser.add_argument(name, type=type(field.default), default=None,
                                choices=CHOICES.get(field.name), help=text)


# Flags of the train command that are not settings of the run.
RUN_FLAGS = {
    "resume": "continue the run NAME from its latest checkpoint (official --continue_train)",
    "overwrite": "start the run NAME again, deleting what it wrote in its results and logs",
}


def show(value):
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def shown_defaults(field):
    """{"book": ..., "paper": ..., "fast": ..., "demo": ...}: the book default as shown, and
    the other presets' and the demo data's values only where they differ from it."""
    shown = {"book": field.metadata["shown"] or show(field.default)}
    for preset, cfg in PRESETS.items():
        if field.name != "preset" and getattr(cfg, field.name) != field.default:
            shown[preset] = show(getattr(cfg, field.name))
    if field.name in DEMO_DEFAULTS:
        shown["demo"] = show(DEMO_DEFAULTS[field.name])
    return shown


def flag_help(field):
    """The --help line of a Config field: its meaning, then its defaults."""
    defaults = shown_defaults(field)
    values = "; ".join(f"{where} {value}" for where, value in defaults.items() if where != "book")
    extra = f"; {values.replace('demo ', 'demo data ')}" if values else ""
    return f"{field.metadata['help']} (default {defaults['book']}{extra})"


def flag_name(name, value):
    if isinstance(value, bool):
        return f"--[no-]{flag(name)[2:]}"
    return f"{flag(name)} {{{','.join(CHOICES[name])}}}" if name in CHOICES else flag(name)


def flags_markdown():
    """docs/flags.md's table of the train command's flags, made from Config's help texts."""
    def cell(text):
        return text.replace("|", "\\|")
    rows = ["| flag | book (default) | paper | fast | meaning |", "|---|---|---|---|---|"]
    for field in dataclasses.fields(Config):
        defaults = shown_defaults(field)
        book = defaults["book"] + (f" (demo: {defaults['demo']})" if "demo" in defaults else "")
        rows.append(f"| `{flag_name(field.name, field.default)}` | {cell(book)} | "
                    f"{defaults.get('paper', '')} | {defaults.get('fast', '')} | "
                    f"{cell(field.metadata['help'])} |")
    rows += [f"| `--{name}` | off |  |  | {cell(text)} |" for name, text in RUN_FLAGS.items()]
    return "\n".join(rows)


if __name__ == "__main__":
    print(flags_markdown())  # into docs/flags.md; tests/test_flags.py checks that it matches
