"""Running the console entry point in-process, as a user's shell would see it."""

from __future__ import annotations

import pytest


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``greensweep <argv>`` through :func:`orchestrator.cli.main`: (exit code, stdout,
    stderr). Returning without ``sys.exit`` is exit 0; a non-integer exit value is 1."""
    from orchestrator.cli import main

    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err
