"""The emulator's clock: real time plus an offset that tests advance."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta, timezone


class Clock:
    """``now()`` is wall-clock time plus ``offset``; ``advance`` moves it forward instantly."""

    def __init__(self, offset: float = 0.0, tz_offset: str = "+00:00") -> None:
        self.offset = offset
        sign = -1 if tz_offset.startswith("-") else 1
        hours, minutes = tz_offset.lstrip("+-").split(":")
        self.tz = timezone(sign * timedelta(hours=int(hours), minutes=int(minutes)))
        self._iso_second = -1
        self._iso_text = ""

    def now(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError("the emulator clock only moves forward")
        self.offset += seconds
        return self.now()

    def iso(self, ts: float | None = None) -> str:
        """``yyyy-MM-ddTHH:mm:ss±HH:MM`` in the configured zone (Zoho's record time format)."""
        t = self.now() if ts is None else ts
        second = int(t)
        if second != self._iso_second:
            self._iso_text = datetime.fromtimestamp(second, tz=UTC).astimezone(self.tz).isoformat()
            self._iso_second = second
        return self._iso_text
