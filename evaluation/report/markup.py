"""HTML building blocks of the report: escaping, number formatting, tables, embedded figures."""
from __future__ import annotations

import base64
import html
import io
import math
import re
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.4}
h1{border-bottom:2px solid #444}h2{border-bottom:1px solid #bbb;margin-top:2em}
table{border-collapse:collapse;font-size:12px;margin:.5em 0}
th,td{border:1px solid #ccc;padding:2px 6px;text-align:right}
th{background:#f0f0f0}td.s{text-align:left}tr.sig td{background:#fff3d6}
pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:12px}
.na{color:#a33;font-style:italic}.note{color:#555;font-size:13px}
.ok{border-left:4px solid #27ae60;padding-left:.6em}.bad{border-left:4px solid #c0392b;padding-left:.6em}
img{max-width:100%;border:1px solid #ddd;margin:.5em 0}
"""

MAX_ROWS = 2000  # beyond this a table is truncated, with a note, to keep the file usable

SHORT_ES = {"cohens_h": "h", "d_per_observation": "d"}  # effect-size kinds as one letter


def esc(x: object) -> str:
    return html.escape(str(x), quote=True)


def fmt(x: object, col: str = "") -> str:
    """A cell as text: empty for missing, "yes"/"" for booleans, p-values in scientific notation below 1e-3."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else ""
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if isinstance(x, (float, np.floating)):
        x = float(x)
        if col.startswith("p_") or col == "p_value":
            return f"{x:.2e}" if 0 < x < 1e-3 else f"{x:.3f}"
        return f"{x:.4g}"
    return str(x)


def na(what: str) -> str:
    return f'<p class="na">{esc(what)}: not available.</p>'


def table(df: pd.DataFrame | None, what: str, highlight: str | None = None, collapse_over: int = 60) -> str:
    """HTML table with every header and cell escaped; long tables go inside <details>."""
    if df is None or not isinstance(df, pd.DataFrame) or df.empty:
        return na(what)
    note = ""
    if len(df) > MAX_ROWS:
        note = f'<p class="note">Showing the first {MAX_ROWS} of {len(df)} rows.</p>'
        df = df.head(MAX_ROWS)
    head = "".join(f"<th>{esc(c)}</th>" for c in df.columns)
    body = []
    for _, row in df.iterrows():
        cls = ' class="sig"' if highlight and bool(row.get(highlight, False)) else ""
        cells = []
        for c in df.columns:
            v = row[c]
            is_text = not isinstance(v, (int, float, np.integer, np.floating)) or isinstance(v, bool)
            cells.append(f'<td{" class=s" if is_text else ""}>{esc(fmt(v, str(c)))}</td>')
        body.append(f"<tr{cls}>{''.join(cells)}</tr>")
    t = f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{note}"
    if len(df) > collapse_over:
        return f"<details><summary>{esc(what)} ({len(df)} rows)</summary>{t}</details>"
    return t


class Figures:
    """Saves figures to out_dir/figures and returns <img> tags with the PNG embedded."""

    def __init__(self, out_dir: Path):
        self.dir = out_dir / "figures"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.used: set[str] = set()

    def add(self, fig: Figure, name: str, alt: str) -> str:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "figure"
        base, i = stem, 1
        while stem in self.used:
            i += 1
            stem = f"{base}_{i}"
        self.used.add(stem)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
        plt.close(fig)
        png = buf.getvalue()
        (self.dir / f"{stem}.png").write_bytes(png)
        b64 = base64.b64encode(png).decode("ascii")
        return f'<img alt="{esc(alt)}" src="data:image/png;base64,{b64}">'


def anchor_sections(body: str) -> tuple[str, str]:
    """Give each <h2> an id (report.html#seeds-and-power links to it) and return a contents line."""
    links = []

    def anchor(m: re.Match[str]) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", html.unescape(m.group(1)).lower()).strip("-")
        links.append(f'<a href="#{slug}">{m.group(1)}</a>')
        return f'<h2 id="{slug}">{m.group(1)}</h2>'
    body = re.sub(r"<h2>(.*?)</h2>", anchor, body)
    return body, " · ".join(links)
