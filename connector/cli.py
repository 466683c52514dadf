"""The `connector` command: argparse verbs that call into the modules; no logic of its own.

Every flag has an environment fallback shown in --help. Errors become one clear stderr line and
an exit code: 2 for configuration mistakes, 1 for anything else.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import psycopg

from connector import __version__
from connector.config_secrets import redact
from connector.errors import ConfigError, ConnectorError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name, default)


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        "-c",
        default=_env("CONNECTOR_CONFIG", "connector.toml"),
        help="configuration file (env CONNECTOR_CONFIG; default connector.toml)",
    )


def _add_pipeline(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--pipeline", "-p", action="append", help="pipeline name (repeatable; default: all)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="connector",
        description="Keep a Zoho CRM module in step with a legacy PostgreSQL table (CDC).",
    )
    parser.add_argument("--version", action="version", version=f"connector {__version__}")
    parser.add_argument(
        "--log-level",
        default=_env("CONNECTOR_LOG_LEVEL"),
        choices=["debug", "info", "warning", "error"],
        help="override logging.level (env CONNECTOR_LOG_LEVEL)",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    p = sub.add_parser("config", help="configuration helpers")
    csub = p.add_subparsers(dest="config_verb", required=True)
    pc = csub.add_parser("check", help="validate a configuration file (exit 2 when invalid)")
    pc.add_argument("file", nargs="?", default=_env("CONNECTOR_CONFIG", "connector.toml"))
    pc.add_argument(
        "--secrets", action="store_true", help="also resolve secrets from the environment/files"
    )

    p = sub.add_parser("init", help="create/migrate the state schema and install capture")
    _add_config(p)
    _add_pipeline(p)
    p.add_argument(
        "--wait-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="logical mode: give up (exit 1) when creating the replication slot waits longer "
        "than this for transactions open in the cluster (default: wait, naming them every 5 s)",
    )

    p = sub.add_parser("uninstall", help="drop triggers, functions, publication and slot")
    _add_config(p)
    _add_pipeline(p)
    p.add_argument("--drop-state", action="store_true", help="also drop the state schema")
    p.add_argument(
        "--force",
        action="store_true",
        help="remove the capture even while a running connector owns the pipeline",
    )

    p = sub.add_parser("run", help="run capture, sync and the HTTP server")
    _add_config(p)
    _add_pipeline(p)
    port = _env("CONNECTOR_PORT")
    p.add_argument(
        "--port",
        type=int,
        default=int(port) if port else None,
        help="HTTP port instead of server.port, e.g. for a second process (hot standby) on the"
        " same host (env CONNECTOR_PORT; default: server.port)",
    )

    p = sub.add_parser("snapshot", help="run (or resume) the initial sync now")
    _add_config(p)
    _add_pipeline(p)
    p.add_argument("--restart", action="store_true", help="start a new snapshot from the beginning")

    p = sub.add_parser("status", help="per-pipeline lag, pending, credits, bulk jobs, dead letters")
    _add_config(p)
    _add_pipeline(p)
    p.add_argument("--json", action="store_true", help="one JSON document instead of text")

    p = sub.add_parser("replay", help="re-emit a range of the outbox")
    _add_config(p)
    p.add_argument("--pipeline", "-p", help="pipeline name (default: the only one configured)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument(
        "--from-offset",
        type=int,
        metavar="N",
        help="first outbox offset to replay (`connector status` shows the checkpoint offset)",
    )
    g.add_argument("--since", help="ISO timestamp, e.g. 2026-11-26T10:00:00Z")
    p.add_argument(
        "--to", help="last offset or end timestamp, inclusive (default: the end of the outbox)"
    )
    p.add_argument(
        "--key", help="only this key (a value of the pipeline's key_column, e.g. 42 or a uuid)"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the plan and its credits; send nothing"
    )

    p = sub.add_parser("dead-letters", help="list / show / retry / discard dead letters")
    _add_config(p)
    p.add_argument("--pipeline", "-p", help="pipeline name (default: all)")
    dsub = p.add_subparsers(dest="dl_verb", required=True)
    # --config / -c / --pipeline also after the sub-verb (`dead-letters list -c F`)
    cfg = argparse.ArgumentParser(add_help=False)
    cfg.add_argument("--config", "-c", default=argparse.SUPPRESS, help="configuration file")
    cfg.add_argument(
        "--pipeline", "-p", default=argparse.SUPPRESS, help="pipeline name (default: all)"
    )
    d = dsub.add_parser("list", help="open dead letters (--all: every one)", parents=[cfg])
    d.add_argument("--all", action="store_true", help="include retried/discarded/resolved")
    d.add_argument("--json", action="store_true", help="one JSON document instead of a table")
    d = dsub.add_parser("show", help="one letter with the CRM's error and details", parents=[cfg])
    d.add_argument("id", type=int, help="the letter's ID (from list)")
    d = dsub.add_parser("retry", help="re-send the keys' current source rows", parents=[cfg])
    d.add_argument("ids", type=int, nargs="*", help="letter IDs")
    d.add_argument("--all", action="store_true", help="every open letter")
    d = dsub.add_parser("discard", help="give up on letters (kept for the record)", parents=[cfg])
    d.add_argument("ids", type=int, nargs="+", help="letter IDs")

    p = sub.add_parser("verify", help="compare the source table with the CRM")
    _add_config(p)
    p.add_argument("--pipeline", "-p", help="pipeline name (default: the only one configured)")
    p.add_argument("--repair", action="store_true", help="re-emit missing/different records")
    p.add_argument("--json", action="store_true", help="one JSON document instead of text")

    p = sub.add_parser(
        "doctor",
        help="check the database, the CRM and a probe record's round trip (exit 0/1/2)",
        description="Checks everything a first installation can get wrong: the database "
        "(read-only), the CRM (token, hosts, scopes, org, module, mapping, credits) and a "
        "probe record written, read back and deleted. Exit 0 when nothing failed, 1 when a "
        "check failed, 2 for a configuration error.",
    )
    _add_config(p)
    _add_pipeline(p)
    p.add_argument(
        "--bulk",
        action="store_true",
        help="also round-trip the probe through Bulk Write (one bulk job: 500 credits)",
    )
    p.add_argument(
        "--probe-key",
        default=_env("CONNECTOR_PROBE_KEY", "__connector_probe__"),
        help="key of the probe record (env CONNECTOR_PROBE_KEY; default __connector_probe__)",
    )
    p.add_argument(
        "--no-roundtrip",
        action="store_true",
        help="skip the probe record (no CRM write at all)",
    )
    p.add_argument("--json", action="store_true", help="print the report as one JSON document")

    p = sub.add_parser("emulator", help="run the local Zoho CRM emulator")
    p.add_argument(
        "--host",
        default=_env("CONNECTOR_EMULATOR_HOST", "127.0.0.1"),
        help="address to listen on (env CONNECTOR_EMULATOR_HOST; default %(default)s)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=int(_env("CONNECTOR_EMULATOR_PORT", "8799") or 8799),
        help="port to listen on (env CONNECTOR_EMULATOR_PORT; default %(default)s)",
    )
    p.add_argument(
        "--config",
        default=_env("CONNECTOR_EMULATOR_CONFIG"),
        help="emulator TOML (env CONNECTOR_EMULATOR_CONFIG; default: the built-in one)",
    )

    p = sub.add_parser("demo", help="embedded PostgreSQL + emulator + workload, end to end")
    p.add_argument(
        "--rows",
        type=int,
        # 20,000 orders: with their ~60,000 lines (written one update per order, 100 orders a
        # call) the demo takes about two minutes, as the one-table demo of 50,000 rows did
        default=int(_env("CONNECTOR_DEMO_ROWS", "20000") or 20000),
        help="rows of the demo's orders table, each with 1-5 lines and one customer per 5"
        " (env CONNECTOR_DEMO_ROWS; default %(default)s)",
    )
    p.add_argument(
        "--duration", type=float, default=60.0, help="live workload seconds (default %(default)s)"
    )
    p.add_argument(
        "--rate", type=float, default=50.0, help="live changes per second (default %(default)s)"
    )
    p.add_argument("--report", help="write a JSON report to this file (default: none)")
    p.add_argument("--keep", action="store_true", help="keep the demo's data directory")
    return parser


def _run(coro: Coroutine[Any, Any, int]) -> int:
    return asyncio.run(coro)


# verbs that only touch the database: they do not need the Zoho client secret / refresh token
DB_ONLY = frozenset({"init", "uninstall", "status", "dead-letters"})


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from connector.config import load_settings, resolve_secrets
    from connector.logs import add_secrets, setup_logging

    settings = load_settings(args.config)
    setup_logging(args.log_level or settings.logging.level, settings.logging.format)
    secrets = resolve_secrets(settings, crm_secrets=args.verb not in DB_ONLY)
    add_secrets(secrets.values())
    return settings, secrets


def cmd_config(args: argparse.Namespace) -> int:
    from connector.config import load_settings, resolve_secrets

    settings = load_settings(args.file)
    if args.secrets:
        resolve_secrets(settings)
    names = ", ".join(f"{p.name} ({p.capture})" for p in settings.pipelines)
    print(f"{args.file}: OK — {len(settings.pipelines)} pipeline(s): {names}")
    return EXIT_OK


def cmd_init(args: argparse.Namespace) -> int:
    from connector import admin

    settings, secrets = _load(args)
    report = _run_report(
        admin.init(settings, secrets, args.pipeline, wait_timeout=args.wait_timeout)
    )
    applied = ", ".join(str(v) for v in report.migrations_applied) or "none (up to date)"
    print(
        f"state schema {settings.database.state_schema!r} at version {report.schema_version}; "
        f"migrations applied: {applied}"
    )
    for name, mode in report.pipelines.items():
        print(f"pipeline {name}: capture ({mode}) installed")
    return EXIT_OK


def cmd_uninstall(args: argparse.Namespace) -> int:
    from connector import admin

    settings, secrets = _load(args)
    done = _run_report(
        admin.uninstall(
            settings, secrets, args.pipeline, drop_state=args.drop_state, force=args.force
        )
    )
    modes = {p.name: p.capture for p in settings.pipelines}
    for name in done:
        what = (
            "trigger and its function"
            if modes.get(name) == "triggers"
            else "replication slot and publication"
        )
        print(f"pipeline {name}: capture removed ({what})")
    if args.drop_state:
        print(f"state schema {settings.database.state_schema!r} dropped")
    return EXIT_OK


def _run_report(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


def cmd_doctor(args: argparse.Namespace) -> int:
    import json

    from connector import doctor

    settings, secrets = _load(args)
    report = _run_report(
        doctor.doctor(
            settings,
            secrets,
            pipelines=args.pipeline,
            bulk=args.bulk,
            probe_key=args.probe_key,
            roundtrip=not args.no_roundtrip,
        )
    )
    if args.json:
        print(json.dumps(report.to_json(), indent=2, default=str))
    else:
        print(report.text())
    return int(report.exit_code)


def cmd_emulator(args: argparse.Namespace) -> int:
    from connector.emulator.main import run_emulator_cli
    from connector.logs import setup_logging

    setup_logging(args.log_level or "info")
    return int(run_emulator_cli(args.host, args.port, args.config))


def _operate(name: str, module: str = "operate") -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        from connector import operate, operate_replay

        settings, secrets = _load(args)
        verbs = {"operate": operate, "operate_replay": operate_replay}[module]
        fn: Callable[..., Coroutine[Any, Any, int]] = getattr(verbs, name)
        return _run(fn(settings, secrets, args))

    return handler


def cmd_run(args: argparse.Namespace) -> int:
    """`connector run`: the start-up imports, then the collector tuned (connector/gcsetup.py:
    start-up objects frozen, higher thresholds; issue 19), then the long-running process."""
    from connector import operate, runtime  # noqa: F401 (imported before the freeze)
    from connector.gcsetup import tune_gc

    settings, secrets = _load(args)
    tune_gc()
    return _run(operate.run(settings, secrets, args))


def cmd_demo(args: argparse.Namespace) -> int:
    from connector import demo
    from connector.logs import setup_logging

    setup_logging(args.log_level or "warning")
    return int(demo.main(args))


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "config": cmd_config,
    "init": cmd_init,
    "uninstall": cmd_uninstall,
    "emulator": cmd_emulator,
    "doctor": cmd_doctor,
    "demo": cmd_demo,
    "run": cmd_run,
    "snapshot": _operate("snapshot"),
    "status": _operate("status"),
    "replay": _operate("replay", "operate_replay"),
    "dead-letters": _operate("dead_letters"),
    "verify": _operate("verify"),
}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return HANDLERS[args.verb](args)
    except ConfigError as exc:
        print(f"connector: configuration error: {redact(str(exc))}", file=sys.stderr)
        return EXIT_CONFIG
    except ConnectorError as exc:
        print(f"connector: {redact(str(exc))}", file=sys.stderr)
        return EXIT_FAILURE
    except psycopg.errors.InsufficientPrivilege as exc:
        print(
            f"connector: permission denied in the database: {exc.diag.message_primary}"
            " (see docs/security.md for the GRANTs each verb needs)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    except psycopg.errors.UndefinedTable as exc:
        print(
            f"connector: the state schema is not installed ({exc.diag.message_primary});"
            " run `connector init` first",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    except psycopg.OperationalError as exc:
        print(f"connector: cannot reach the database: {redact(_first_line(exc))}", file=sys.stderr)
        return EXIT_FAILURE
    except psycopg.ProgrammingError as exc:  # e.g. a DSN libpq cannot parse
        print(f"connector: database error: {redact(_first_line(exc))}", file=sys.stderr)
        return EXIT_CONFIG if "dsn" in str(exc).lower() else EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
