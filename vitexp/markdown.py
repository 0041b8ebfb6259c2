"""Tables as text: each cell formatted once (`cells`), and GitHub-flavoured Markdown
(`markdown_table`), for the report page and the README's verdict table."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd


def _fmt(v, integral: bool = False) -> str:
    """One cell: INTEGRAL columns as integers, errors (>= 1) to 2 decimals, small
    numbers (lr, wd) to 3 significant digits, missing as blank."""
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else ""
    if isinstance(v, (float, np.floating)):
        if not np.isfinite(v):
            return "" if np.isnan(v) else str(v)
        if integral:
            return str(int(v))
        return f"{v:.2f}" if abs(v) >= 1 else f"{v:.3g}"
    return "" if v is None else str(v)


def cells(df: pd.DataFrame) -> pd.DataFrame:
    """DF as strings, column by column (a float column of whole numbers reads as integers)."""
    out = {}
    for col in df.columns:
        values = df[col]
        num = pd.to_numeric(values, errors="coerce") if values.dtype.kind == "f" else None
        integral = num is not None and bool(np.all(np.mod(num.dropna(), 1) == 0))
        out[col] = [_fmt(v, integral) for v in values]
    return pd.DataFrame(out, columns=df.columns)


_MD_SPECIAL = re.compile(r"([\\`*\[\]<>|])")


def md_escape(text: str) -> str:
    """TEXT as literal Markdown: its special characters backslash-escaped, on one line."""
    return _MD_SPECIAL.sub(r"\\\1", str(text)).replace("\n", " ")


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (pandas' to_markdown needs tabulate)."""
    lines = ["| " + " | ".join(md_escape(c) for c in df.columns) + " |",
             "|" + "|".join("---" for _ in df.columns) + "|"]
    lines += ["| " + " | ".join(md_escape(v) for v in row) + " |" for row in cells(df).itertuples(index=False)]
    return "\n".join(lines)
