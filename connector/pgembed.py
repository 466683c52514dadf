"""An embedded PostgreSQL 16 cluster from the ``pgserver`` wheel's binaries.

Used by ``connector demo``, the tests and the benchmarks: no system PostgreSQL, no Docker. The
cluster listens on 127.0.0.1 on a free port (and a private Unix socket), with
``wal_level=logical`` so that both capture modes work. When run as root (CI containers), the
server runs as an unprivileged system user, because PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from connector.errors import ConnectorError

DEFAULT_SETTINGS: dict[str, str] = {
    "wal_level": "logical",
    "max_replication_slots": "20",
    "max_wal_senders": "20",
    "max_connections": "200",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "256MB",
    "max_wal_size": "2GB",
    "log_min_messages": "warning",
    "logical_decoding_work_mem": "64MB",
    # a legacy application may use two-phase commit; the tests check that capture keeps it
    # working (DESIGN.md invariant 9)
    "max_prepared_transactions": "10",
}

_SYSTEM_USER = "pgserver"


EMBEDDED_MISSING = (
    "the embedded PostgreSQL is not installed (it is an extra, not part of the production "
    "package): pip install 'zoho-cdc-connector[embedded]'"
)


def bin_dir() -> Path:
    try:
        from pgserver import _commands
    except ImportError:
        raise ConnectorError(EMBEDDED_MISSING) from None

    return Path(_commands.POSTGRES_BIN_PATH)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class EmbeddedPostgres:
    """Own a throwaway (or persistent) cluster: ``start``, ``stop``, ``restart``, ``kill``."""

    def __init__(
        self,
        datadir: Path,
        *,
        port: int | None = None,
        settings: dict[str, str] | None = None,
        superuser: str = "postgres",
    ) -> None:
        self.datadir = Path(datadir).absolute()
        self.port = port or free_port()
        self.settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self.superuser = superuser
        self._run_as: str | None = _SYSTEM_USER if os.geteuid() == 0 else None
        self.last_error = ""

    # -- helpers ---------------------------------------------------------------------------
    @property
    def socket_dir(self) -> Path:
        return self.datadir / "sock"

    def dsn(self, dbname: str = "postgres", user: str | None = None) -> str:
        return f"postgresql://{user or self.superuser}@127.0.0.1:{self.port}/{dbname}"

    def _cmd(self, exe: str, *args: str, check: bool = True, timeout: float = 60) -> str:
        argv = [str(bin_dir() / exe), *args]
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, check=False, user=self._run_as
        )
        if proc.returncode != 0:
            # what the last failing command said (``stop`` returns False and keeps it here)
            self.last_error = f"{exe} exited {proc.returncode}: {proc.stderr.strip()}"
        if check and proc.returncode != 0:
            log = self.datadir / "postgres.log"
            tail = log.read_text()[-3000:] if log.exists() else ""
            raise RuntimeError(
                f"{exe} failed ({proc.returncode}): {proc.stderr.strip()}\n{tail}".strip()
            )
        return str(proc.stdout)

    def _prepare_permissions(self) -> None:
        if self._run_as is None:
            return
        from pgserver.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

        entry = ensure_user_exists(self._run_as)
        assert entry is not None
        ensure_prefix_permissions(self.datadir)
        ensure_prefix_permissions(bin_dir())
        import stat

        ensure_folder_permissions(
            bin_dir(), stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH
        )
        ensure_folder_permissions(bin_dir().parent / "lib", stat.S_IRGRP | stat.S_IROTH)
        for path in [self.datadir, *self.datadir.rglob("*")]:
            with contextlib.suppress(FileNotFoundError):
                os.chown(path, entry.pw_uid, entry.pw_gid)

    # -- lifecycle -------------------------------------------------------------------------
    def init(self) -> None:
        if (self.datadir / "PG_VERSION").exists():
            return
        self.datadir.mkdir(parents=True, exist_ok=True)
        self._prepare_permissions()
        self._cmd(
            "initdb",
            "-D",
            str(self.datadir),
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "-U",
            self.superuser,
        )
        self.socket_dir.mkdir(exist_ok=True)
        self._prepare_permissions()

    def _write_conf(self) -> None:
        lines = [f"{k} = '{v}'" for k, v in self.settings.items()]
        lines += [
            f"port = {self.port}",
            "listen_addresses = '127.0.0.1'",
            f"unix_socket_directories = '{self.socket_dir}'",
        ]
        (self.datadir / "postgresql.auto.conf").write_text("\n".join(lines) + "\n")
        hba = (
            "local all all trust\n"
            "host all all 127.0.0.1/32 trust\n"
            "local replication all trust\n"
            "host replication all 127.0.0.1/32 trust\n"
        )
        (self.datadir / "pg_hba.conf").write_text(hba)
        self._prepare_permissions()

    def start(self) -> None:
        self.init()
        self._write_conf()
        self._cmd(
            "pg_ctl",
            "-D",
            str(self.datadir),
            "-l",
            str(self.datadir / "postgres.log"),
            "-w",
            "-t",
            "60",
            "start",
        )

    def stop(self, mode: str = "fast", wait: int = 60) -> bool:
        """Stop the server; True when it is stopped. pg_ctl gives up after ``wait`` seconds
        (and returns non-zero, the server still stopping); its own limit comes first, so a
        slow stop is a False here, never a ``TimeoutExpired`` (which pre-empted callers'
        fall-back to ``immediate``)."""
        if not (self.datadir / "postmaster.pid").exists():
            return True
        self._cmd(
            "pg_ctl",
            "-D",
            str(self.datadir),
            "-m",
            mode,
            "-w",
            "-t",
            str(wait),
            "stop",
            check=False,
            timeout=wait + 30,
        )
        return not (self.datadir / "postmaster.pid").exists()

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def kill(self) -> None:
        """SIGKILL the postmaster (crash); ``start`` afterwards runs crash recovery."""
        pid = self.pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)

    def pid(self) -> int | None:
        pidfile = self.datadir / "postmaster.pid"
        try:
            return int(pidfile.read_text().splitlines()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return None

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.datadir, ignore_errors=True)

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
