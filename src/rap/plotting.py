"""What every rap plot shares (rap.report's pages, the KV evaluations' plots)."""

from __future__ import annotations

from pathlib import Path


def save_figure(fig, ax, path: Path, legend_size: int = 7) -> Path:
    """Grid, legend, tight layout, 120 dpi PNG, figure closed: every rap plot ends the same way."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
