"""The report of `connector doctor` (:mod:`connector.doctor`): one :class:`Check` per line, with
its status and, when it fails, the fix. Split out of ``connector.doctor``, which re-exports it."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

Status = Literal["ok", "warn", "fail", "skip"]


@dataclasses.dataclass
class Check:
    area: str  # "database" | "crm" | "roundtrip"
    name: str
    status: Status
    detail: str
    fix: str = ""
    pipeline: str | None = None

    def line(self) -> str:
        mark = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL", "skip": "skip"}[self.status]
        where = f"[{self.pipeline}] " if self.pipeline else ""
        text = f"{mark} {self.area}.{self.name}: {where}{self.detail}"
        if self.fix and self.status in ("fail", "warn"):
            text += f"\n       fix: {self.fix}"
        return text


@dataclasses.dataclass
class DoctorReport:
    checks: list[Check] = dataclasses.field(default_factory=list)
    credits_spent: int = 0

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def add(self, *checks: Check) -> None:
        self.checks.extend(checks)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": not self.failed,
            "failed": len(self.failed),
            "credits_spent": self.credits_spent,
            "checks": [dataclasses.asdict(c) for c in self.checks],
        }

    def text(self) -> str:
        lines = [c.line() for c in self.checks]
        n_fail = len(self.failed)
        n_warn = sum(1 for c in self.checks if c.status == "warn")
        lines.append(
            f"{len(self.checks)} checks: {len(self.checks) - n_fail - n_warn} ok, "
            f"{n_warn} warning{'s' if n_warn != 1 else ''}, {n_fail} failed; "
            f"{self.credits_spent} CRM credit{'s' if self.credits_spent != 1 else ''} spent"
        )
        return "\n".join(lines)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
