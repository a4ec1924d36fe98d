"""The ``greensweep`` command line: one module per command group, each parses, calls a
service (:mod:`orchestrator.runner`, the store, the report builders) and prints.

Exit codes: 0 success; 1 some stages failed; 2 bad input (spec, arguments); 3 store
unreachable or failing; 4 store schema mismatch; 5 Ray/cluster problem; 6 artifact
integrity; 130 interrupted. Every error is one line on stderr, never a traceback.
Heavy modules (torch, ray, alembic) are imported only by the commands that need them.
"""

from __future__ import annotations

import os
import sys

import click

from orchestrator.cli import carbon as _carbon
from orchestrator.cli import db as _db
from orchestrator.cli import nodes as _nodes
from orchestrator.cli import results as _results
from orchestrator.cli import run as _run
from orchestrator.errors import GreensweepError, mask_url


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="greensweep")
def cli() -> None:
    """greensweep: model-compression sweeps across hardware, with measured time, energy and carbon.

    \b
    Typical use:
      greensweep plan examples/quickstart.yaml     # what would run, nothing written
      greensweep run examples/quickstart.yaml      # run it, print the results table
      greensweep results --format json             # the latest sweep's results
    """


for _command in (_run.plan, _run.run, _run.resume, _run.cancel, _results.status, _results.results,
                 _results.compare, _results.pareto, _results.report, _nodes.nodes, _db.db, _carbon.carbon):
    cli.add_command(_command)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one-line errors and meaningful exit codes, never a traceback."""
    try:
        cli.main(args=argv, prog_name="greensweep", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.UsageError as e:
        hint = f" -- see: {e.ctx.command_path} --help" if e.ctx is not None else ""
        click.echo(f"error: {e.format_message()}{hint}", err=True)
        sys.exit(2)
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except GreensweepError as e:
        click.echo(f"error: {mask_url(str(e))}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - a bug must still not dump a traceback on users
        if os.environ.get("GREENSWEEP_DEBUG"):
            raise
        first = " ".join(str(e).split())[:300]
        click.echo(f"error: internal error {e.__class__.__name__}: {mask_url(first)} -- "
                   "rerun with GREENSWEEP_DEBUG=1 for the traceback and report it", err=True)
        sys.exit(70)

