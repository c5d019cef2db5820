"""``docs/cli.md``: every command's options and every pass's options, generated from the
click commands and the pass registry so that the reference cannot drift from them.

``python -m sparseforge.toolchain.cli_docs docs/cli.md`` rewrites the file;
``tests/test_cli.py`` checks that it matches :func:`render`.
"""
from __future__ import annotations

import dataclasses
import inspect
import sys
from pathlib import Path

import click

HEADER = """# Command and pass reference

Generated from the commands and the pass registry by
`python -m sparseforge.toolchain.cli_docs docs/cli.md` (the test suite checks that it is
current). `sparseforge COMMAND --help` prints the same text for one command; the README
explains what the commands and passes are for.
"""


def _cell(text: str) -> str:
    """Text for one Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def _command(title: str, cmd: click.Command, ctx: click.Context) -> list[str]:
    """Usage, help text and options table of ``cmd`` (``ctx``: its context)."""
    lines = [f"## {title}", "", "```", cmd.get_usage(ctx), "```", "",
             inspect.cleandoc(cmd.help or ""), "", "| option | meaning |", "|---|---|"]
    for param in cmd.get_params(ctx):
        record = param.get_help_record(ctx) if isinstance(param, click.Option) else None
        if record is not None and "--help" not in record[0]:
            lines.append(f"| `{_cell(record[0])}` | {_cell(record[1])} |")
    return lines + [""]


def toml_value(value) -> str:
    """``value`` as a recipe writes it (TOML); None (unset) as an empty string."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _passes() -> list[str]:
    from .pass_base import pass_registry

    lines = ["# Passes", "",
             "A recipe's `[passes.NAME]` table and `--set NAME.OPTION=VALUE` set these options "
             "(`sparseforge passes` lists them).", ""]
    for name, cls in pass_registry().items():
        if not cls.__module__.startswith("sparseforge.passes."):  # e.g. passes tests register
            continue
        defaults = cls.Options()
        lines += [f"## {name}", "", f"{cls.summary}.", "", inspect.cleandoc(cls.Options.__doc__ or ""), "",
                  "| option | default |", "|---|---|"]
        for f in dataclasses.fields(cls.Options):
            default = toml_value(getattr(defaults, f.name))
            lines.append(f"| `{f.name}` | {f'`{_cell(default)}`' if default else 'unset'} |")
        lines.append("")
    return lines


def render() -> str:
    """The whole reference (Markdown)."""
    from .cli import cli

    root = click.Context(cli, info_name="sparseforge")
    lines = [HEADER, "# Commands", ""] + _command("`sparseforge`", cli, root)
    for name in cli.list_commands(root):
        cmd = cli.get_command(root, name)
        lines += _command(f"`sparseforge {name}`", cmd, click.Context(cmd, info_name=name, parent=root))
    lines += _passes()
    return "\n".join(lines).rstrip("\n") + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m sparseforge.toolchain.cli_docs PATH")
    Path(sys.argv[1]).write_text(render())
