"""``python -m orchestrator.cli``: the ``greensweep`` command."""

from orchestrator.cli import main

main()
