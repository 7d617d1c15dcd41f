"""Writing plotly figures to HTML and PNG, offline.

PNG needs a headless browser. plotly >= 6 exports through kaleido >= 1, which drives a Chrome that
must be installed separately (and fetched from the internet); kaleido 0.2.1 ships its own Chromium in
its wheel (``pip install 'saesteer[png]'``), so it works on machines that reach only the package index.
:func:`write_png` uses kaleido 0.2.x directly (with the plotly.js bundled in the installed plotly) and
falls back to plotly's own ``to_image`` for kaleido >= 1.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

_SCOPE: Any = None
_LOCK = threading.Lock()

PNG_HINT = (
    "PNG export needs kaleido: `pip install 'saesteer[png]'` (kaleido 0.2.1, Chromium included, works "
    "offline) or kaleido >= 1 with Chrome (`plotly_get_chrome`). HTML export needs nothing."
)


def png_backend() -> str | None:
    """``"kaleido-0.2"`` (bundled Chromium), ``"kaleido"`` (>= 1, needs Chrome) or None (no PNG export)."""
    try:
        import kaleido
    except ImportError:
        return None
    version = getattr(kaleido, "__version__", "")
    if version.startswith("0.") or hasattr(kaleido, "scopes"):
        return "kaleido-0.2"
    return "kaleido"


def _kaleido02_scope() -> Any:
    """One kaleido 0.2 plotly scope per process (it starts a Chromium subprocess), on plotly's own plotly.js."""
    global _SCOPE
    with _LOCK:
        if _SCOPE is None:
            import plotly
            from kaleido.scopes.plotly import PlotlyScope

            js = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
            _SCOPE = PlotlyScope(plotlyjs=str(js) if js.is_file() else None, mathjax=False)
        return _SCOPE


PNG_TIMEOUT_S = 120.0
"""Seconds a PNG export may take before it is abandoned (a headless Chromium can hang; a long run must not)."""


def _drop_kaleido02_scope() -> None:
    """Forget (and try to stop) the kaleido 0.2 scope, so that the next export starts a fresh Chromium."""
    global _SCOPE
    with _LOCK:
        scope, _SCOPE = _SCOPE, None
    stop = getattr(scope, "_shutdown_kaleido", None)
    if callable(stop):
        try:
            stop()
        except Exception:  # noqa: BLE001 - a hung subprocess may refuse; the next export starts anew anyway
            pass


def _within(seconds: float, fn: Any) -> Any:
    """``fn()`` on a daemon thread; TimeoutError if it has not returned after ``seconds``."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            out["error"] = exc

    worker = threading.Thread(target=run, daemon=True, name="saesteer-png-export")
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise TimeoutError(f"no answer within {seconds:g} s")
    if "error" in out:
        raise out["error"]
    return out["value"]


def figure_png(
    fig: Any,
    *,
    width: int | None = None,
    height: int | None = None,
    scale: float = 1.0,
    timeout: float | None = None,
) -> bytes:
    """The PNG bytes of plotly figure ``fig`` (size: ``width`` x ``height`` CSS pixels, default the layout's
    or 700 x 500, times ``scale``), abandoned after ``timeout`` seconds (default :data:`PNG_TIMEOUT_S`).

    Raises:
        RuntimeError: no PNG backend (the message says what to install), or the export failed or timed out
            (a timed-out kaleido 0.2 scope is dropped, so the next export starts a fresh one).
    """
    backend = png_backend()
    if backend is None:
        raise RuntimeError(PNG_HINT)
    width = width or fig.layout.width or 700
    height = height or fig.layout.height or 500

    def export() -> bytes:
        if backend == "kaleido-0.2":
            return _kaleido02_scope().transform(
                fig.to_plotly_json(), format="png", width=width, height=height, scale=scale
            )
        return fig.to_image(format="png", width=width, height=height, scale=scale)

    try:
        return _within(PNG_TIMEOUT_S if timeout is None else timeout, export)
    except TimeoutError as exc:
        if backend == "kaleido-0.2":
            _drop_kaleido02_scope()
        raise RuntimeError(f"PNG export with {backend} timed out ({exc}). {PNG_HINT}") from exc
    except Exception as exc:
        raise RuntimeError(f"PNG export with {backend} failed ({type(exc).__name__}: {exc}). {PNG_HINT}") from exc


def write_png(
    fig: Any, path: str | os.PathLike, *, width: int | None = None, height: int | None = None, scale: float = 1.0
) -> Path:
    """Write ``fig`` as a PNG to ``path`` atomically (see :func:`figure_png`)."""
    from saesteer.data.atomic import write_bytes_atomic

    path = Path(path)
    write_bytes_atomic(path, figure_png(fig, width=width, height=height, scale=scale))
    return path


def write_html(fig: Any, path: str | os.PathLike, *, include_plotlyjs: bool | str = True) -> Path:
    """Write ``fig`` as a standalone HTML page to ``path`` atomically.

    ``include_plotlyjs``: True embeds plotly.js (4.7 MB; opens offline), ``"directory"`` writes one shared
    ``plotly.min.js`` beside the page (several pages in a folder share it), ``"cdn"`` links the CDN.
    """
    from saesteer.data.atomic import write_text_atomic

    path = Path(path)
    html = fig.to_html(include_plotlyjs=include_plotlyjs, full_html=True)
    if include_plotlyjs == "directory":
        _write_plotlyjs_beside(path)
    write_text_atomic(path, html)
    return path


def _write_plotlyjs_beside(path: Path) -> None:
    """``plotly.min.js`` next to ``path`` (what plotly's ``include_plotlyjs="directory"`` expects), if absent."""
    from plotly.offline import get_plotlyjs

    from saesteer.data.atomic import write_text_atomic

    js = path.parent / "plotly.min.js"
    if not js.is_file():
        write_text_atomic(js, get_plotlyjs())


def save_figure(
    fig: Any,
    path: str | os.PathLike,
    *,
    png: bool = True,
    include_plotlyjs: bool | str = True,
    scale: float = 2.0,
    log: Any = None,
) -> list[Path]:
    """Write ``path`` (.html) and, if ``png``, a .png beside it; returns the files written.

    The PNG is a bonus: without a backend, or if the export fails, ``log`` (default ``print``) gets a
    note and only the HTML is written.
    """
    log = log or print
    path = Path(path)
    written = [write_html(fig, path.with_suffix(".html"), include_plotlyjs=include_plotlyjs)]
    if png:
        try:
            written.append(write_png(fig, path.with_suffix(".png"), scale=scale))
        except RuntimeError as exc:
            log(f"note: no PNG next to {path.name}: {exc}")
    return written
