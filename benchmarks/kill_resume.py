"""Kill/resume repetitions: training and prediction SIGKILLed at random points, then resumed.

Each repetition runs the same checks as the tests (``tests/test_reliability_train.py``
and ``tests/test_reliability_predict.py``, which run two repetitions each in CI):
training resumes from an intact checkpoint with the same step, optimiser and
scheduler state; prediction finishes bit-identical to an uninterrupted run
without recomputing any block written before the kill.  A failed check counts
as a failed repetition; the script goes on and reports them all.

Prints one JSON line per repetition and a summary line: passed / total per kind.

Examples
--------
python benchmarks/kill_resume.py                 # 20 + 20 repetitions
python benchmarks/kill_resume.py --repeats 3 --kinds predict
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--kinds", default="train,predict", help="comma-separated: train, predict")
    p.add_argument("--seed", type=int, default=1000, help="first repetition's seed (kill points)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(TESTS))  # the checks live with the tests; one copy of them
    import test_reliability_predict
    import test_reliability_train

    runs = {"train": test_reliability_train.kill_and_resume, "predict": test_reliability_predict.kill_and_resume}
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(runs))
    if unknown:
        p.error(f"unknown kind(s): {', '.join(unknown)}")
    summary = {}
    with tempfile.TemporaryDirectory(prefix="kill_resume_") as tmp:
        for kind in kinds:
            passed = 0
            shared = Path(tmp) / kind  # the prediction's model, input and reference are built once
            shared.mkdir()
            for i in range(args.repeats):
                seed = args.seed + i
                t0 = time.perf_counter()
                try:
                    own = Path(tmp) / f"{kind}{seed}"
                    own.mkdir()
                    figures = runs[kind](shared if kind == "predict" else own, seed)
                    ok, error = True, None
                except Exception as exc:  # noqa: BLE001 - a failed check is a result here
                    figures, ok = {}, False
                    error = "".join(traceback.format_exception_only(type(exc), exc)).strip().splitlines()[0]
                passed += ok
                row = {"kind": kind, "repetition": i + 1, "seed": seed, "passed": ok,
                       "seconds": round(time.perf_counter() - t0, 1), **figures}
                if error:
                    row["error"] = error
                print(json.dumps(row), flush=True)
            summary[kind] = {"passed": passed, "total": args.repeats}
    print(json.dumps({"benchmark": "kill_resume", **summary}), flush=True)
    return 0 if all(v["passed"] == v["total"] for v in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
