"""What the operator verbs share: exit codes, choosing the pipeline(s) a verb works on, and
writing to stdout (text, or JSON with wide integers kept exact)."""

from __future__ import annotations

import sys
from typing import Any

import orjson

from connector.config import PipelineConfig, Settings
from connector.crm_values import wide_ints
from connector.errors import ConfigError

EXIT_OK = 0
EXIT_MISMATCH = 1


def pipelines(settings: Settings, names: list[str] | str | None) -> list[PipelineConfig]:
    if not names:
        return list(settings.pipelines)
    if isinstance(names, str):
        names = [names]
    return [settings.pipeline(n) for n in names]


def only_pipeline(settings: Settings, name: list[str] | str | None, verb: str) -> PipelineConfig:
    """The pipeline a single-pipeline verb works on: the one named, or the only one."""
    if isinstance(name, list):
        if len(name) > 1:
            raise ConfigError("--pipeline", f"{verb} works on one pipeline; name one")
        name = name[0] if name else None
    if name:
        return settings.pipeline(name)
    if len(settings.pipelines) == 1:
        return settings.pipelines[0]
    raise ConfigError(
        "--pipeline",
        f"{verb} works on one pipeline; name one of {[p.name for p in settings.pipelines]}",
    )


def out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def dump(doc: Any) -> None:
    # wide_ints: a dead letter's payload may hold integers beyond 64 bits (issue 14 §4)
    sys.stdout.write(
        orjson.dumps(wide_ints(doc), default=str, option=orjson.OPT_INDENT_2).decode() + "\n"
    )
