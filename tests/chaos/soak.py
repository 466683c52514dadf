"""`make soak`: the chaos scenario for as long as asked, with a new seed each time.

    python -m tests.chaos.soak --minutes 60 [--seed S] [--capture triggers|logical]
        [--workdir DIR] [--keep] [--json result.json]

Prints the seed first and again when the run fails (rerun with ``--seed``); exit 0 only when
every check passed (end state, dead letters, history, every change of the fault-free run in
the CRM within ``max_staleness`` + 5 s of its commit, credits within 15 % of the fault-free
run of the same seed, no secret in any output).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import secrets
import sys
import tempfile
from pathlib import Path

from tests.chaos.scenario import Params, run_pair


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.chaos.soak", description=__doc__)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--capture", choices=("triggers", "logical"), default=None)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true", help="keep the PostgreSQL data directories")
    ap.add_argument("--json", default=None, help="write the result here")
    ns = ap.parse_args(argv)
    seed = ns.seed if ns.seed is not None else secrets.randbelow(2**31)
    capture = ns.capture or ("logical" if seed % 2 else "triggers")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    workdir = Path(ns.workdir or tempfile.mkdtemp(prefix=f"chaos-{seed}-"))
    params = Params(seed=seed, minutes=ns.minutes, capture=capture)
    print(
        f"chaos soak: seed {seed}, {ns.minutes:g} min, capture {capture}, work dir {workdir}",
        flush=True,
    )
    result = asyncio.run(run_pair(params, workdir, keep=ns.keep))
    doc = result.to_json()
    if ns.json:
        Path(ns.json).write_text(json.dumps(doc, indent=2, default=str))
    print(json.dumps(doc, indent=2, default=str))
    if result.ok:
        print(f"chaos soak PASSED: seed {seed}, credit ratio {doc['credit_ratio']}", flush=True)
        return 0
    print(result.failure_text(), file=sys.stderr)
    print(f"chaos soak FAILED: seed {seed}", flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
