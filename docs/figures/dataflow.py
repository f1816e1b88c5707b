"""Draw docs/dataflow.png, the README's picture of the two data flows.

Run from the repository root: ``python docs/figures/dataflow.py``.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

TRAIN = [("source", "OME-Zarr, Zarr, TIFF,\ns3://, any bioio format"),
         ("sampler", "chunk-aligned blocks\nin a bounded buffer"),
         ("masking", "blind spots, 1 pixel\nin 64 (N2V2 median)"),
         ("model", "U-Net 2D/3D\n(N2V or N2V2)"),
         ("loss", "MSE at the masked\npixels only")]
PREDICT = [("source", "read lazily,\nany size"),
           ("halo plan", "blocks on the U-Net's\ngrid + receptive field"),
           ("per-block predict", "dask map_overlap on\nlocal, SLURM or a cluster"),
           ("writer", "OME-Zarr chunks, resume\nmarkers, pyramid")]
BOX_W, BOX_H, GAP = 2.4, 1.15, 0.5


def row(ax, y: float, boxes: list[tuple[str, str]], colour: str, title: str) -> None:
    """Draw one flow: a title, then boxes joined by arrows, left to right."""
    ax.text(0.0, y + BOX_H / 2 + 0.35, title, fontsize=13, fontweight="bold", va="bottom")
    for i, (name, detail) in enumerate(boxes):
        x = i * (BOX_W + GAP)
        ax.add_patch(FancyBboxPatch((x, y - BOX_H / 2), BOX_W, BOX_H, boxstyle="round,pad=0.04",
                                    facecolor=colour, edgecolor="#333333", linewidth=1.2))
        ax.text(x + BOX_W / 2, y + 0.25, name, ha="center", va="center", fontsize=11.5, fontweight="bold")
        ax.text(x + BOX_W / 2, y - 0.22, detail, ha="center", va="center", fontsize=8.5, color="#222222")
        if i:
            ax.add_patch(FancyArrowPatch((x - GAP + 0.04, y), (x - 0.04, y), arrowstyle="-|>",
                                         mutation_scale=16, linewidth=1.5, color="#333333"))


def main() -> None:
    """Draw both flows and save the PNG next to this folder."""
    fig, ax = plt.subplots(figsize=(12.5, 4.6))
    row(ax, 2.6, TRAIN, "#dbe9f6", "train: learns from the noisy data itself")
    row(ax, 0.0, PREDICT, "#e3f1dc", "predict: block by block, equal to whole-image prediction")
    ax.set_xlim(-0.2, 5 * BOX_W + 4 * GAP + 0.2)
    ax.set_ylim(-0.9, 3.9)
    ax.axis("off")
    out = Path(__file__).resolve().parents[1] / "dataflow.png"
    fig.savefig(out, dpi=110, bbox_inches="tight", facecolor="white")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
