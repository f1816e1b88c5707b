"""The notebooks in ``notebooks/`` run from top to bottom (headless, with nbclient).

Each notebook has one cell tagged ``parameters``; the tests append tiny values
to it (every overridden name must already be assigned there, so a renamed
parameter fails loudly) and execute the notebook in a temporary directory
with a kernel that runs this interpreter (the project's venv).  Each notebook
writes ``<WORKDIR>/summary.json``, which the tests check.

The committed notebooks must carry no outputs: :func:`test_notebooks_are_stripped`.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import bsd68_data

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
CELL_TIMEOUT = 300  # seconds per cell; generous for a loaded 2-core machine


def _kernel_manager(tmp: Path) -> Any:
    """A kernel manager whose only kernel runs ``sys.executable -m ipykernel_launcher``.

    Independent of whatever kernelspecs the user has installed elsewhere.
    """
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    kdir = tmp / "kernels" / "n2v-test"
    kdir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "n2v_chunked tests", "language": "python"}
    (kdir / "kernel.json").write_text(json.dumps(spec))
    ksm = KernelSpecManager(kernel_dirs=[str(kdir.parent)], ensure_native_kernel=False)
    return KernelManager(kernel_name="n2v-test", kernel_spec_manager=ksm)


def _inject(nb: Any, params: dict[str, Any]) -> None:
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, "a notebook needs exactly one cell tagged 'parameters'"
    cell = cells[0]
    assigned = set(re.findall(r"^([A-Z_][A-Z0-9_]*)\s*=", cell.source, flags=re.M))
    unknown = sorted(set(params) - assigned)
    assert not unknown, f"parameters {unknown} are not assigned in the parameters cell"
    lines = [f"{k} = {v!r}" for k, v in params.items()]
    cell.source = cell.source.rstrip() + "\n\n# injected by tests/test_notebooks.py\n" + "\n".join(lines) + "\n"


def _text(nb: Any) -> str:
    """All stream and text/plain output of an executed notebook."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                parts.append(out.get("text", ""))
            elif "data" in out:
                parts.append(out["data"].get("text/plain", ""))
    return "".join(parts)


def _images(nb: Any) -> int:
    return sum("image/png" in out.get("data", {}) for c in nb.cells for out in c.get("outputs", []))


def run_notebook(name: str, params: dict[str, Any], tmp: Path) -> tuple[Any, dict[str, Any]]:
    """Execute ``notebooks/<name>`` in ``tmp`` with ``params``; return it and its summary.json."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    workdir = tmp / "out"
    _inject(nb, {**params, "WORKDIR": str(workdir)})
    km = _kernel_manager(tmp)
    client = nbclient.NotebookClient(
        nb, km=km, timeout=CELL_TIMEOUT, startup_timeout=120, resources={"metadata": {"path": str(tmp)}},
    )
    t0 = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as exc:
        pytest.fail(f"{name} failed:\n{str(exc)[-4000:]}")
    finally:
        if km.has_kernel:  # a kernel manager passed in is not shut down by nbclient
            km.shutdown_kernel()  # politely: the kernel's atexit handlers close its dask cluster
        keep = os.environ.get("N2V_KEEP_NOTEBOOKS")
        if keep:  # look at the executed notebooks, e.g. N2V_KEEP_NOTEBOOKS=/tmp/nb
            Path(keep).mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, Path(keep) / name)
    print(f"{name}: {time.perf_counter() - t0:.1f} s")
    summary = json.loads((workdir / "summary.json").read_text())
    return nb, summary


@pytest.fixture
def nb_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")  # inline figures, no display


def test_notebooks_are_stripped() -> None:
    """Committed notebooks carry no outputs or execution counts and have a parameters cell."""
    names = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb") if not p.stem.endswith("_run"))  # _run: executed copies
    assert {"01_quickstart.ipynb", "02_large_volume.ipynb", "03_bsd68_reproduction.ipynb"} <= set(names)
    for name in names:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [], f"{name}: a cell has outputs"
                assert cell.execution_count is None, f"{name}: a cell has an execution count"
        tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, f"{name}: needs exactly one cell tagged 'parameters'"


def test_quickstart(tmp_path: Path, nb_env: None) -> None:
    from n2v_chunked.io.ome import is_complete

    nb, s = run_notebook("01_quickstart.ipynb", {
        "STEPS": 3, "MINUTES": 1.0, "BATCH_SIZE": 16, "VAL_PATCHES": 16, "N_WORKERS": 1, "THREADS_PER_WORKER": 1,
    }, tmp_path)
    assert s["steps"] == 3
    assert s["complete"] and is_complete(s["output"])
    assert s["predict_stats"]["blocks_computed"] == 8  # one block per frame
    assert re.match(r"https?://[^/]+/status", s["dashboard_link"])
    text = _text(nb)
    assert "Dask dashboard: http" in text
    assert "correlation of consecutive frames" in text
    assert all(math.isfinite(s[k]) for k in ("frame_correlation_noisy", "frame_correlation_denoised"))
    assert _images(nb) >= 2  # the raw frame and the side-by-side comparison


def test_large_volume(tmp_path: Path, nb_env: None) -> None:
    from n2v_chunked.io.ome import is_complete

    nb, s = run_notebook("02_large_volume.ipynb", {
        # a 2D model with few features and a high learning rate: 60 steps beat the noisy input by ~4 dB in fp32
        # (30 steps did only where training ran in bf16: on the AMD EPYC without it, 21.24 -> 20.96 dB)
        "SHAPE": (32, 128, 128), "CHUNKS": (16, 64, 64), "DIMS": 2, "PATCH": [32, 32], "FEATURES": 16, "STEPS": 60,
        "MINUTES": 3.0, "BATCH_SIZE": 16, "LR": 4e-3, "VAL_PATCHES": 16, "BUFFER_MB": 8, "N_WORKERS": 1,
        "THREADS_PER_WORKER": 1, "GEN_THREADS": 1, "PREDICT_CHUNKS": {"z": 16}, "CHECK_CROP": (32, 128, 128),
    }, tmp_path)
    assert s["volume_shape"] == [32, 128, 128]
    assert s["steps"] == 60
    assert s["complete"] and is_complete(s["output"])
    assert s["predict_stats"]["blocks_computed"] == 2  # PREDICT_CHUNKS: two blocks along z
    assert s["tasks"] > 0 and "Dask dashboard: http" in _text(nb)
    assert 0 < s["peak_rss_mib"] < 16 * 1024
    noisy, denoised = s["psnr_noisy"], s["psnr_denoised"]
    assert math.isfinite(noisy) and math.isfinite(denoised)
    assert denoised > noisy, f"N2V made it worse: {noisy:.2f} dB -> {denoised:.2f} dB"


def test_bsd68_reproduction(tmp_path: Path, nb_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    data = bsd68_data()
    if data is None:
        pytest.skip("BSD68 data absent: no Train400/ and BSD68/ under $N2V_DATA or a shared/data above the repo")
    monkeypatch.setenv("N2V_DATA", str(data))
    nb, s = run_notebook("03_bsd68_reproduction.ipynb", {
        "STEPS": 3, "BATCH_SIZE": 16, "PATCH": 32, "VAL_PATCHES": 16, "N_TRAIN": 12, "N_TEST": 2,
    }, tmp_path)
    assert s["steps"] == 3 and s["n_test"] == 2 and s["n_train"] == 12
    assert math.isfinite(s["psnr"]) and 0 < s["psnr"] < 60
    assert math.isfinite(s["psnr_blend"]) and 0 < s["psnr_blend"] < 60
    assert 19 < s["psnr_noisy_input"] < 22  # sigma 25 noise: about 20.2 dB
    text = _text(nb)
    for figure in ("20.18", "28.59", "27.71", "29.06", "27.37"):
        assert figure in text
