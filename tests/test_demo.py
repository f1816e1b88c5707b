"""``n2v-chunked demo``: the README's first command, on both bundled samples, briefly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from n2v_chunked.cli import main
from n2v_chunked.io.ome import is_complete
from n2v_chunked.io.sources import open_image


@pytest.mark.parametrize("sample, steps", [
    ("nuclei", 30),
    ("paxillin", 2),  # the real-noise path end to end; whether it denoises: the slow case below
    pytest.param("paxillin", 30, marks=pytest.mark.slow),  # 200 s on 2 AMD cores in fp32
])
def test_demo_trains_denoises_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str], sample: str,
                                          steps: int) -> None:
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--sample", sample, "--steps", str(steps), "--minutes", "30"])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == steps and is_complete(s["output"])  # the step cap ends training, not the time budget
    denoised = open_image(s["output"])
    assert denoised.dtype == np.float32 and np.isfinite(denoised.values).all()
    png = Image.open(s["png"])
    panels = 3 if sample == "nuclei" else 2  # noisy | denoised (| ground truth)
    assert png.width > panels * denoised.sizes["x"]
    printed = capsys.readouterr().out
    if sample == "nuclei":  # ground truth known: denoising must beat the noisy input
        assert s["psnr_denoised"] > s["psnr_noisy"] + 3 and "PSNR against ground truth" in printed
        assert np.isfinite(s["psnr_blended"])
    elif steps >= 30:  # real noise: independent noise removed -> consecutive frames correlate more
        assert s["frame_correlation_denoised"] > s["frame_correlation_noisy"]
    else:
        assert 0 < s["frame_correlation_noisy"] < 1 and np.isfinite(s["frame_correlation_denoised"])
        assert "frame" in printed
    # a second run refuses to overwrite the results without --overwrite
    assert main(["demo", "--out", str(out), "--sample", sample, "--steps", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err
