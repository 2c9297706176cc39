"""Where a report's tables and figures go: <out>/tables/*.csv and <out>/figures/*.png."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import Image


def save_table(table: pd.DataFrame | pd.Series, out: str | Path, name: str) -> pd.DataFrame:
    """Write the table at full precision (for tests and re-analysis); return it rounded for
    reading in the notebook."""
    table = table.to_frame() if isinstance(table, pd.Series) else table
    path = Path(out) / "tables" / f"{name}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=not isinstance(table.index, pd.RangeIndex))
    return table.round(4)


def save_figure(fig: plt.Figure, out: str | Path, name: str) -> Image:
    """Write the figure as PNG and display that very file, so the notebook, its HTML export and
    the figures folder show the same image."""
    path = Path(out) / "figures" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Image(filename=str(path))
