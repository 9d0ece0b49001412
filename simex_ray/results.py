"""One writer for what the studies write: JSON, Parquet tables and PNG figures (Ray-free).

Each file is serialised in memory, then written atomically through :mod:`simex_ray.storage` (a temporary
file in the same folder, then a rename; an object store's single put): a reader never sees half a file, and
a crash or an interrupted run leaves the previous result whole. The folder is created when missing.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from . import storage


def write_json(path, obj: Any) -> Path:
    """``obj`` as indented JSON with a final newline (make it standard first where it may hold NaN or numpy
    values: :func:`simex_ray.protocol.jsonable`)."""
    storage.write_bytes_atomic(path, (json.dumps(obj, indent=2) + "\n").encode())
    return Path(path)


def write_table(path, rows) -> Path:
    """``rows`` (a list of dicts, or a DataFrame) as a Parquet table, without the index."""
    import pandas as pd

    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    storage.write_bytes_atomic(path, buf.getvalue())
    return Path(path)


def write_figure(path, fig) -> Path:
    """A matplotlib figure as PNG (the caller closes it)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    storage.write_bytes_atomic(path, buf.getvalue())
    return Path(path)
