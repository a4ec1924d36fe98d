"""Where the files greensweep ships with its code are: the Alembic migrations, the
node-type catalog and simulated cluster, the carbon data.

In git they have one copy each, the repository's top-level ``alembic/`` and ``clusters/``
folders. ``pyproject.toml`` maps those folders onto the packages ``greensweep_data.alembic``
and ``greensweep_data.clusters`` (``[tool.setuptools.package-dir]``), so a wheel installs
them under site-packages next to ``orchestrator``, and an editable install
(``pip install -e .``) resolves the same package names to the checkout's folders. They are
found through the import system, never relative to this file, so every install finds them
from any working directory -- which is what each node of a cluster needs.

The folders are namespace packages (no ``__init__.py``: a top-level ``alembic/`` package
would shadow the Alembic library in a checkout), located with
``importlib.util.find_spec(...).submodule_search_locations``. ``importlib.resources.files``
is not used: on Python 3.10/3.11 it fails on an editable install's namespace package,
whose search path holds setuptools' placeholder entry. Alembic and the CSV readers need a
real directory anyway, which a wheel installed by pip always is.

A checkout that runs without being installed (``PYTHONPATH=.``) has no ``greensweep_data``
package; there the folder is taken from the checkout itself, recognised by a file it must
hold, so an unrelated folder (site-packages' own ``alembic/`` library) is never picked.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from orchestrator.errors import GreensweepError

DATA_PACKAGE = "greensweep_data"

# Each shipped folder and a file it must contain (what tells it apart from a stray folder).
SHIPPED: dict[str, str] = {
    "alembic": "env.py",
    "clusters": "catalog.yaml",
}


def shipped_dir(name: str) -> Path:
    """The absolute directory of the shipped folder *name* (a key of :data:`SHIPPED`).

    Raises :class:`GreensweepError` naming the reinstall command when neither the
    installed package data nor a source checkout has it (a broken installation).
    """
    marker = SHIPPED.get(name)
    if marker is None:
        raise ValueError(f"unknown shipped folder {name!r}; known: {', '.join(SHIPPED)}")
    for candidate in (*_installed(name), _checkout(name)):
        if (candidate / marker).is_file():
            return candidate.resolve()
    raise GreensweepError(
        f"greensweep's shipped {name}/ folder is missing (no package {DATA_PACKAGE}.{name} holding "
        f"{marker}); the installation is broken -- reinstall it: pip install --force-reinstall greensweep, "
        "or pip install -e . in a checkout"
    )


def _installed(name: str) -> list[Path]:
    """The directories of package ``greensweep_data.<name>``; empty when it is not installed."""
    try:
        spec = importlib.util.find_spec(f"{DATA_PACKAGE}.{name}")
    except ImportError:  # the parent package greensweep_data is not installed
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(location) for location in spec.submodule_search_locations]


def _checkout(name: str) -> Path:
    """Where *name* sits in a source checkout: beside the ``orchestrator`` package."""
    return Path(__file__).resolve().parents[1] / name
