"""``sparseforge targets``: list the CPU targets (``targets/``) the kernels specialise for.

Registered onto the ``sparseforge`` click group when ``toolchain/cli.py`` imports it.
"""
from __future__ import annotations

import json

import click

from .cli import cli


@cli.command("targets")
@click.option("--json", "as_json", is_flag=True, help="Print the target descriptions as JSON.")
def targets_cmd(as_json: bool) -> None:
    """List the CPU targets for `convert --target`, recipes' `target` key and the emit pass."""
    from sparseforge.targets import TARGETS, host_target

    host = host_target().name
    if as_json:
        click.echo(json.dumps({"host": host, "targets": [t.to_dict() for t in TARGETS.values()]}, indent=1))
        return
    click.echo(f"{'target':<13} {'arch':<8} {'cpu':<15} {'vector':>6} {'int8 dot':<8} {'align':>5}  description")
    for t in TARGETS.values():
        mark = " (host)" if t.name == host else ""
        click.echo(f"{t.name:<13} {t.arch:<8} {t.cpu:<15} {t.vector_bits:>6} {t.int8_dot or '-':<8} "
                   f"{t.bundle_align:>5}  {t.description}{mark}")
