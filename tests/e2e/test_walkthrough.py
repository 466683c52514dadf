"""The new-user walk-through of docs/operations-cli.md, followed verbatim: its sql, toml and sh
blocks are read from the doc and run in order (only the DSN, the two ports and the working
directory are substituted), so the doc and this test cannot drift apart."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import sys
import time
from pathlib import Path

import aiohttp
import psycopg

from connector.pgembed import free_port
from tests.e2e.helpers import ROOT

DOC = ROOT / "docs" / "operations-cli.md"
HEADING = "## New-user walk-through"
DSN_PLACEHOLDER = "postgresql://connector@localhost/legacy"


def blocks() -> list[tuple[str, str]]:
    text = DOC.read_text()
    start = text.index(HEADING)
    end = text.find("\n## ", start + len(HEADING))
    section = text[start : end if end != -1 else len(text)]
    return [(m.group(1), m.group(2)) for m in re.finditer(r"```(\w+)\n(.*?)```", section, re.S)]


async def _http_ok(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            async with aiohttp.ClientSession() as s, s.get(url) as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.2)
    raise AssertionError(f"{url} never answered 200")


async def test_the_walkthrough_works_as_written(database: str, tmp_path: Path) -> None:
    found = blocks()
    assert [k for k, _ in found] == ["sh", "sql", "toml", "sh", "sql", "sh"], found
    emu_port, http_port = free_port(), free_port()

    def subst(text: str) -> str:
        text = text.replace(DSN_PLACEHOLDER, database)
        return text.replace("8799", str(emu_port)).replace("9108", str(http_port))

    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONNECTOR_", "ZOHO_"))}
    env["PYTHONPATH"] = str(ROOT)
    background: list[tuple[asyncio.subprocess.Process, str]] = []
    transcript: list[str] = []
    try:
        for kind, body in found:
            body = subst(body)
            if kind == "sql":
                async with await psycopg.AsyncConnection.connect(database, autocommit=True) as c:
                    await c.execute(body)  # type: ignore[arg-type]
                continue
            if kind == "toml":
                (tmp_path / "connector.toml").write_text(body)
                continue
            for line in body.splitlines():
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                words = shlex.split(line)
                if words[0] == "export":
                    env.update(w.split("=", 1) for w in words[1:])  # type: ignore[misc]
                    continue
                assert words[0] == "connector", line
                bg = words[-1] == "&" or words[1] == "emulator"
                argv = [sys.executable, "-m", "connector", *[w for w in words[1:] if w != "&"]]
                if bg:
                    log = (tmp_path / f"{words[1]}.log").open("wb")
                    proc = await asyncio.create_subprocess_exec(
                        *argv, stdout=log, stderr=log, env=env, cwd=str(tmp_path)
                    )
                    background.append((proc, words[1]))
                    port = emu_port if words[1] == "emulator" else http_port
                    path = "/healthz" if words[1] == "emulator" else "/readyz"
                    if words[1] == "emulator":
                        await _wait_port(port)
                    else:
                        await _http_ok(f"http://127.0.0.1:{port}{path}")
                    continue
                rc, out, err = await _run(argv, env, tmp_path)
                if words[1] == "verify":  # the CRM catches up within max_staleness
                    deadline = time.monotonic() + 90
                    while rc != 0 and time.monotonic() < deadline:
                        await asyncio.sleep(1)
                        rc, out, err = await _run(argv, env, tmp_path)
                transcript.append(f"$ {line}\n{out}{err}")
                assert rc == 0, f"{line}: rc {rc}\n{out}\n{err}"
                assert "Traceback" not in out + err, err
        text = "\n".join(transcript)
        assert "missing 0, extra 0, different 0" in text
        assert "pipeline invoices: capture removed (trigger and its function)" in text
        assert "NOT INSTALLED" in text  # status after uninstall
        # the running connector notices the removed capture within a gauge refresh (5 s)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if "capture is gone (trigger missing)" in (tmp_path / "run.log").read_text():
                break
            await asyncio.sleep(0.5)
    finally:
        for proc, name in reversed(background):
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    rc = await asyncio.wait_for(proc.wait(), 60)
                except TimeoutError:
                    proc.kill()
                    rc = await proc.wait()
                if name == "run":
                    log = (tmp_path / "run.log").read_text(errors="replace")
                    assert rc == 0, log[-3000:]
                    assert "capture is gone (trigger missing)" in log


async def _wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.2)
    raise AssertionError(f"nothing listens on {port}")


async def _run(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=str(cwd),
    )
    out, err = await asyncio.wait_for(proc.communicate(), 180)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
