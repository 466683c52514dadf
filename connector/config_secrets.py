"""Secrets and connection strings (split from ``connector.config``): secret values resolved
from an environment variable or a file, the ``Secrets`` holder whose ``repr`` never shows
them, and the DSN helpers every message that may quote a connection string goes through
(``redact``, ``check_dsn``, ``dsn_password``). ``connector.config.resolve_secrets`` builds a
``Secrets`` from the validated settings.
"""

from __future__ import annotations

import re
import stat
import warnings
from pathlib import Path

from pydantic import SecretStr

from connector.errors import ConfigError


def _read_secret_file(path: str, key: str) -> str:
    p = Path(path)
    try:
        st = p.stat()
    except OSError as exc:
        raise ConfigError(key, f"cannot read secret file {path!r}: {exc.strerror}") from None
    if st.st_mode & stat.S_IROTH:
        warnings.warn(
            f"{key}: secret file {path!r} is world-readable; chmod 600 it",
            UserWarning,
            stacklevel=2,
        )
    return p.read_text().strip()


_URL_PASSWORD = re.compile(r"(?P<pre>://[^:/?#@\s]*:)[^@/?#\s]*(?=@)")
_KV_PASSWORD = re.compile(r"(?P<pre>\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with any DSN password replaced by ``***`` (URI ``user:PASSWORD@`` and
    ``password=…`` forms): for messages that may quote a connection string."""
    text = _URL_PASSWORD.sub(lambda m: m.group("pre") + "***", text)
    return _KV_PASSWORD.sub(lambda m: m.group("pre") + "***", text)


def check_dsn(dsn: str) -> None:
    """Raise ``ValueError`` (never quoting the DSN) unless libpq can parse it."""
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    try:
        conninfo_to_dict(dsn)
    except ProgrammingError:
        raise ValueError(
            "not a valid PostgreSQL connection string: use a URI"
            " (postgresql://user@host:5432/dbname) or key=value pairs"
            " (host=… dbname=… user=…)"
        ) from None


def dsn_password(dsn: str) -> str | None:
    """The password inside a DSN, if any (so that logs can redact it)."""
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    try:
        value = conninfo_to_dict(dsn).get("password")
    except ProgrammingError:
        return None
    return str(value) if value else None


def resolve_secret(
    env: str | None, file: str | None, key: str, environ: dict[str, str]
) -> SecretStr:
    if env:
        value = environ.get(env)
        if not value:
            raise ConfigError(f"{key}_env", f"environment variable {env} is not set or empty")
        return SecretStr(value)
    if file:
        return SecretStr(_read_secret_file(file, f"{key}_file"))
    raise ConfigError(key, f"set {key}_env (an environment variable) or {key}_file (a file)")


class Secrets:
    """Secrets resolved from the environment or files. ``repr`` never shows them."""

    def __init__(
        self, client_secret: SecretStr, refresh_token: SecretStr, dsn: str, state_dsn: str
    ) -> None:
        self.client_secret = client_secret
        self.refresh_token = refresh_token
        self._dsn = SecretStr(dsn)
        self._state_dsn = SecretStr(state_dsn)

    @property
    def dsn(self) -> str:
        return self._dsn.get_secret_value()

    @property
    def state_dsn(self) -> str:
        return self._state_dsn.get_secret_value()

    def values(self) -> list[str]:
        """Every secret value, for the logs' last-line redaction (the DSNs' passwords too)."""
        out = [
            self.client_secret.get_secret_value(),
            self.refresh_token.get_secret_value(),
        ]
        for dsn in (self.dsn, self.state_dsn):
            password = dsn_password(dsn)
            if password:
                out.append(password)
        return [v for v in out if v]

    def __repr__(self) -> str:
        return "Secrets(***)"
