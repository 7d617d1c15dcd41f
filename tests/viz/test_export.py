"""HTML and PNG export of plotly figures (saesteer.viz.export), offline."""

import struct

import plotly.graph_objects as go
import pytest

from saesteer.viz import export as figure_export
from saesteer.viz.export import figure_png, save_figure, write_html, write_png


def _fig(width=None, height=None):
    fig = go.Figure(go.Scatter(x=[1, 2, 3], y=[3, 1, 2], mode="lines+markers"))
    fig.update_layout(title="t", width=width, height=height)
    return fig


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_png_has_the_requested_size(tmp_path):
    assert figure_export.png_backend() == "kaleido-0.2"  # the dev extra installs the offline backend
    assert _png_size(figure_png(_fig(), width=300, height=200, scale=2)) == (600, 400)
    path = write_png(_fig(width=320, height=240), tmp_path / "sub" / "f.png")  # layout size, folder created
    assert _png_size(path.read_bytes()) == (320, 240)


def test_html_embedded_and_shared_plotlyjs(tmp_path):
    page = write_html(_fig(), tmp_path / "a.html").read_text()
    assert len(page) > 1_000_000  # plotly.js inside
    assert not (tmp_path / "plotly.min.js").exists()

    shared = tmp_path / "shared"
    a = write_html(_fig(), shared / "a.html", include_plotlyjs="directory").read_text()
    write_html(_fig(), shared / "b.html", include_plotlyjs="directory")
    assert 'src="plotly.min.js"' in a and len(a) < 100_000
    assert (shared / "plotly.min.js").stat().st_size > 1_000_000
    assert sorted(p.name for p in shared.iterdir()) == ["a.html", "b.html", "plotly.min.js"]  # no temp files


def test_save_figure_without_backend_writes_html_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr(figure_export, "png_backend", lambda: None)
    notes = []
    written = save_figure(_fig(), tmp_path / "f.html", log=notes.append)
    assert written == [tmp_path / "f.html"] and (tmp_path / "f.html").is_file()
    assert not (tmp_path / "f.png").exists()
    assert len(notes) == 1 and "saesteer[png]" in notes[0]
    with pytest.raises(RuntimeError, match=r"pip install 'saesteer\[png\]'"):
        figure_png(_fig())


def test_save_figure_writes_both(tmp_path):
    written = save_figure(_fig(), tmp_path / "f.html", scale=1.0)
    assert [p.name for p in written] == ["f.html", "f.png"]
    assert _png_size((tmp_path / "f.png").read_bytes()) == (700, 500)  # plotly's default size


def test_a_hung_png_export_is_abandoned_and_the_next_one_starts_afresh(tmp_path, monkeypatch):
    """A kaleido scope that never answers: save_figure writes the HTML, notes the timeout, drops the scope."""
    import threading

    release = threading.Event()

    class Hung:
        stopped = False

        def transform(self, *a, **k):
            release.wait(30)
            return b""

        def _shutdown_kaleido(self):
            Hung.stopped = True

    monkeypatch.setattr(figure_export, "png_backend", lambda: "kaleido-0.2")
    monkeypatch.setattr(figure_export, "_SCOPE", Hung())
    monkeypatch.setattr(figure_export, "PNG_TIMEOUT_S", 0.2)
    with pytest.raises(RuntimeError, match="timed out"):
        figure_png(_fig(), timeout=0.2)
    assert figure_export._SCOPE is None and Hung.stopped  # the next export starts a fresh Chromium
    monkeypatch.setattr(figure_export, "_SCOPE", Hung())
    notes = []
    written = save_figure(_fig(), tmp_path / "f.html", log=notes.append)
    release.set()
    assert written == [tmp_path / "f.html"] and not (tmp_path / "f.png").exists()
    assert len(notes) == 1 and "timed out" in notes[0]
