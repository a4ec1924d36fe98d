"""The project's exception hierarchy.

Foreign exceptions (pydantic, SQLAlchemy, Ray, YAML, torch) are translated into these at
the border where they occur. The CLI prints ``error: <message>`` -- one line that names
the problem and the fix -- and exits with the class's ``exit_code``. Messages never
contain secrets (passwords in store URLs are masked with :func:`mask_url`).
"""

from __future__ import annotations

import re

from workers.util import first_line  # noqa: F401  (re-exported: the one rule lives there)


class GreensweepError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class SpecError(GreensweepError):
    """The sweep spec (or a CLI argument) is invalid. Nothing was written."""

    exit_code = 2


class UsageError(GreensweepError):
    """A CLI argument names something that does not exist (e.g. an unknown sweep id)."""

    exit_code = 2


class StoreError(GreensweepError):
    """The store cannot be reached or a database operation failed."""

    exit_code = 3


class SchemaMismatchError(StoreError):
    """The store's schema is older or newer than this greensweep."""

    exit_code = 4


class ClusterError(GreensweepError):
    """Ray cannot be reached, or the cluster cannot run what the sweep needs."""

    exit_code = 5


class ArtifactError(GreensweepError):
    """An artifact is missing, unreadable or fails its checksum."""

    exit_code = 6


class CapabilityError(SpecError, ClusterError):
    """The spec asks for what no live node can run (e.g. bf16 training where no CPU has
    AVX512-BF16 or AMX and no GPU has bf16): bad input for this cluster, found before
    anything ran or was written. A spec error (exit 2, the fix is in the spec or the
    nodes) that is also a cluster one for code catching those."""

    exit_code = 2


class StageFailedError(GreensweepError):
    """Raised inside a worker; carried back as a failed StageResult."""

    exit_code = 1




# The password runs to the *last* '@' of the URL: an unencoded '@' or '/' in a password
# ("u:p@ss/word@host") must not leave a piece of it showing. Over-masking a URL that has
# no password but an '@' later on (rare) costs readability, never a secret.
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^:/@\s'\"]*):(?P<pw>[^\s'\"]*)@")
# libpq (and SQLAlchemy) also take a password as a query parameter: ...?password=...
_QUERY_SECRET = re.compile(r"(?P<key>[?&;](?:password|passwd|pwd|sslpassword|token|api_?key|secret)=)[^&;\s'\"]*",
                           re.IGNORECASE)


def mask_url(text: str) -> str:
    """Replace the password of every ``scheme://user:password@host`` in *text*, and the
    value of every ``password=`` (or token/secret) URL query parameter, with ``***``."""
    text = _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    return _QUERY_SECRET.sub(lambda m: f"{m['key']}***", text)
