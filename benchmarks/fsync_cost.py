"""Cost of making each block durable (fsync of its chunks, then of its marker) on prediction throughput.

Prints one JSON line per run: chunk side, ``durable`` on or off, blocks, MPix/s;
then one line per chunk side with the median slowdown.  Runs alternate on/off
so that a busy machine affects both alike.

Usage::

    python benchmarks/fsync_cost.py                   # 4 x 512^2 frames, chunks 64 and 256, 3 repeats
    python benchmarks/fsync_cost.py --quick           # a smoke run
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--frame", type=int, default=512)
    ap.add_argument("--chunks", default="64,256", help="comma-separated chunk sides")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.frames, args.frame, args.chunks, args.repeats = 1, 128, "64", 1

    import xarray as xr

    from helpers import make_model_dir, noisy
    from n2v_chunked import prediction as P
    from n2v_chunked.prediction import writer
    from n2v_chunked.io.ome import write_ome_zarr

    with tempfile.TemporaryDirectory(dir=REPO) as tmp:
        tmp = Path(tmp)
        model = make_model_dir(tmp / "m", features=8)
        src = tmp / "in.ome.zarr"
        data = noisy((args.frames, args.frame, args.frame))
        write_ome_zarr(src, xr.DataArray(data, dims=("t", "y", "x")), chunks=(1, 256, 256), progress=False)
        # warm-up (model load, thread pools), not counted
        P.predict(str(src), str(tmp / "warm.zarr"), model, chunks=(1, 64, 64), scheduler="threads", progress=False,
                  pyramid=False)
        for side in (int(c) for c in args.chunks.split(",")):
            rates: dict[bool, list[float]] = {True: [], False: []}
            for rep in range(args.repeats):
                for durable in (True, False):
                    writer.DURABLE = durable
                    out = tmp / "out.zarr"
                    shutil.rmtree(out, ignore_errors=True)
                    res = P.predict(str(src), str(out), model, chunks=(1, side, side), scheduler="threads",
                                    progress=False, pyramid=False)
                    st = res.attrs["predict_stats"]
                    rates[durable].append(st["mpix_per_s"])
                    print(json.dumps({"chunk": side, "durable": durable, "blocks": st["blocks_computed"],
                                      "mpix_per_s": st["mpix_per_s"]}), flush=True)
            on, off = statistics.median(rates[True]), statistics.median(rates[False])
            print(json.dumps({"chunk": side, "median_mpix_per_s_durable": on, "median_mpix_per_s_not_durable": off,
                              "slowdown": round(1 - on / off, 4)}), flush=True)
        writer.DURABLE = True


if __name__ == "__main__":
    main()
