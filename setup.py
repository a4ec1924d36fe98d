"""Which packages greensweep's wheel holds; every other setting is in pyproject.toml.

pyproject.toml alone cannot say this: automatic discovery
(``[tool.setuptools.packages.find]``) only sees folders under the package's own name,
while the shipped data folders are mapped in from elsewhere
(``[tool.setuptools.package-dir]``: the repository's ``alembic/`` and ``clusters/`` become
``greensweep_data.alembic`` and ``greensweep_data.clusters``), and mapped packages must be
listed by name. Discovering the code here means a new subpackage of ``orchestrator`` or
``workers`` is shipped without anyone editing a list.
"""

from setuptools import find_packages, setup

CODE = find_packages(include=["orchestrator", "orchestrator.*", "workers", "workers.*"])
# Namespace packages (no __init__.py): a top-level alembic/ package would shadow the
# Alembic library in a checkout. Their files are listed in [tool.setuptools.package-data].
DATA = [
    "greensweep_data.alembic",
    "greensweep_data.alembic.versions",
    "greensweep_data.clusters",
    "greensweep_data.clusters.carbon",
]

setup(packages=CODE + DATA)
