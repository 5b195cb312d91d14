"""Self-contained HTML pages (``alignkit report``, ``alignkit compare``): inline CSS, every picture and sound a
``data:`` URI, no script and no external resource, so a page opens offline and can be mailed as one file.

Plots are drawn with matplotlib (the Agg backend; ``pip install 'alignkit[report]'``) and inlined as PNG.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import Any

__all__ = ["data_uri", "escape", "figure_uri", "page", "pyplot", "table"]

CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
pre { background: #f7f7f7; padding: 0.6em; overflow-x: auto; font-size: 0.85em; }
.banner { background: #fff3cd; border: 1px solid #e0c060; padding: 0.6em; }
.note { color: #555; font-size: 0.9em; }
.sample img.pixels { image-rendering: pixelated; }
.sample img { max-width: 260px; }
figure { margin: 0.6em 0; } figure img { max-width: 100%; height: auto; } figcaption { font-size: 0.85em; color: #555; }
"""


def escape(text: Any) -> str:
    return html.escape(str(text), quote=True)


def data_uri(data: bytes, mime: str) -> str:
    """``data:<mime>;base64,...`` of ``data``."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed).

    Raises:
        ImportError: matplotlib is missing, with the command that installs it.
    """
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("the report's plots need matplotlib: pip install 'alignkit[report]' (or matplotlib)") \
            from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_uri(fig: Any, dpi: int = 90) -> str:
    """A matplotlib figure as a PNG data URI; the figure is closed."""
    plt = pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return data_uri(buf.getvalue(), "image/png")


def table(rows: Sequence[Sequence[Any]], header: bool = True) -> str:
    """An HTML table of ``rows`` (the first one the header when ``header``); cells are escaped."""
    out = ["<table>"]
    for i, row in enumerate(rows):
        tag = "th" if header and i == 0 else "td"
        out.append("<tr>" + "".join(f"<{tag}>{escape(c)}</{tag}>" for c in row) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def page(title: str, body: str) -> str:
    """A whole HTML document with the inline stylesheet."""
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{escape(title)}</title>\n"
            f"<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")
