"""Feature dashboards and the prompt view, checked against independent computations on the tiny model."""

import importlib.util
import itertools
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import WORDS, FirstTokenSink, tiny_model, tiny_sae

from saesteer.sae.alignment import LatentScores
from saesteer.sae.contrast import toxicity_latents
from saesteer.viz.dashboard import (
    StreamingHistogram,
    collect_latent_stats,
    feature_dashboard,
    feature_dashboards,
    logit_lens,
    prompt_latents,
)

HOOK = "blocks.1.hook_resid_post"
ROOT = Path(__file__).resolve().parents[2]


def _corpus(n=24, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def setup():
    model, sae = tiny_model(), tiny_sae("standard")
    return model, sae, _corpus()


def _latents(model, sae, text):
    """Latents of one text on its own (BOS excluded) and its tokens (BOS excluded)."""
    toks = model.to_tokens(text)
    _, cache = model.run_with_cache(toks, names_filter=HOOK)
    return sae.encode(cache[HOOK])[0, 1:], toks[0, 1:]


def test_top_contexts_highlight_the_max_token(setup):
    model, sae, corpus = setup
    latents = [0, 7, 21]
    stats = collect_latent_stats(model, sae, corpus, latents, n_top=5, context=(3, 2), batch_size=4)
    per_text = [_latents(model, sae, t) for t in corpus]
    for lat in latents:
        s = stats[lat]
        maxima = torch.stack([f[:, lat].max() for f, _ in per_text])
        expected = [i for i in torch.argsort(maxima, descending=True, stable=True).tolist() if maxima[i] > 0][:5]
        assert [c.text_index for c in s.top_contexts] == expected
        for c in s.top_contexts:
            f, toks = per_text[c.text_index]
            p = int(f[:, lat].argmax())
            assert c.position == p + 1  # the context's position counts BOS
            assert c.activation == pytest.approx(float(f[p, lat]), abs=1e-5)
            assert c.token_ids[c.highlight] == int(toks[p])
            assert c.acts[c.highlight] == pytest.approx(max(c.acts), abs=1e-6)
            assert c.highlight <= 3 and len(c.token_ids) - c.highlight - 1 <= 2
            assert c.tokens == [model.tokenizer.decode([t]) for t in c.token_ids]
    # the figure's context table bolds exactly that token
    dash = feature_dashboard(model, sae, 7, corpus, n_top=5, context=(3, 2), batch_size=4)
    table = next(t for t in dash.figure().data if t.type == "table" and t.name == "top contexts")
    first = dash.stats.top_contexts[0]
    cell = table.cells.values[1][0]
    assert cell.count("<b>") == 1
    assert f'<b><span style="color:#d62728">{first.tokens[first.highlight]}</span></b>' in cell
    assert "[[" + first.tokens[first.highlight] + "]]" in dash.contexts_table()["context"][0]


def test_histogram_counts_every_token(setup):
    model, sae, corpus = setup
    stats = collect_latent_stats(model, sae, corpus, [3, 40], n_bins=10, batch_size=5)
    acts = torch.cat([f for f, _ in (_latents(model, sae, t) for t in corpus)])
    for lat in (3, 40):
        s = stats[lat]
        assert s.n_tokens == acts.shape[0]
        assert int(s.hist_counts.sum()) + s.n_zero == s.n_tokens
        col = acts[:, lat].double().numpy()
        assert s.n_fired == int((col > 0).sum())
        assert s.density == pytest.approx((col > 0).mean())
        assert s.max_activation == pytest.approx(col.max(), abs=1e-5)
        ref, _ = np.histogram(col[col > 0], bins=s.hist_edges)
        assert s.hist_counts.tolist() == ref.tolist()


def test_streaming_histogram_is_exact_when_the_range_grows():
    rng = np.random.default_rng(0)
    h = StreamingHistogram(8)
    chunks = [rng.random(50) * 0.1, rng.random(50) * 3, rng.random(50) * 40]
    for c in chunks:
        h.add(c)
    allv = np.concatenate(chunks)
    assert h.edges[-1] > allv.max()
    assert h.counts.tolist() == np.histogram(allv, bins=h.edges)[0].tolist()


def test_streaming_over_batches_files_and_generators(setup, tmp_path):
    model, sae, corpus = setup
    a = collect_latent_stats(model, sae, corpus, [5], n_top=4, batch_size=8)[5]
    b = collect_latent_stats(model, sae, iter(corpus), [5], n_top=4, batch_size=3)[5]
    f = tmp_path / "corpus.txt"
    f.write_text("\n".join(corpus) + "\n\n")
    c = collect_latent_stats(model, sae, f, [5], n_top=4, batch_size=2)[5]
    for s in (b, c):
        assert [x.text_index for x in s.top_contexts] == [x.text_index for x in a.top_contexts]
        assert s.n_tokens == a.n_tokens and s.n_fired == a.n_fired
    endless = (corpus[i % len(corpus)] for i in itertools.count())  # streamed: only max_texts are read
    limited = collect_latent_stats(model, sae, endless, [5], max_texts=6)[5]
    assert limited.n_texts == 6 and all(x.text_index < 6 for x in limited.top_contexts)


def test_logit_lens_matches_topk(setup):
    model, sae, _ = setup
    for lat in (0, 33):
        lens = logit_lens(model, sae, lat, k=6)
        logits = sae.W_dec[lat] @ model.W_U
        assert lens.top_ids == torch.topk(logits, 6).indices.tolist()
        assert lens.bottom_ids == torch.topk(logits, 6, largest=False).indices.tolist()
        assert lens.top_values == pytest.approx(torch.topk(logits, 6).values.tolist(), abs=1e-5)
        assert lens.top_tokens == [model.tokenizer.decode([i]) for i in lens.top_ids]


def test_steering_scores_are_shown(setup):
    model, sae, corpus = setup
    d = sae.cfg.d_sae
    raw = torch.linspace(0, 1, d)
    alive = torch.ones(d, dtype=torch.bool)
    alive[9] = False
    scores = LatentScores(
        scores=1 - raw, alive=alive, raw=raw, distances=torch.zeros(3), explained_variance=0.9, hook_name=HOOK
    )
    table = toxicity_latents(model, sae, ["you stupid idiot", "i hate you"], ["a happy day", "the sun"], top_n=5)
    top = int(table["latent"].iloc[0])
    dashes = feature_dashboards(model, sae, [top, 9], corpus[:6], scores=scores, contrast=table)
    q = dashes[0].scores_table().set_index("quantity")["value"]
    assert q["alignment score"].startswith(f"{1 - raw[top].item():.4f}")
    assert float(q["contrast diff"]) == pytest.approx(float(table["diff"].iloc[0]), rel=1e-3)
    q9 = dashes[1].scores_table().set_index("quantity")["value"]
    assert "dead" in q9["alignment score"]
    if 9 not in table["latent"].tolist():
        assert "not in the table" in q9["toxicity contrast"]
    fig = dashes[0].figure()
    scores_trace = next(t for t in fig.data if t.type == "table" and t.name == "scores")
    assert "alignment score" in scores_trace.cells.values[0]
    # the figure grows with the table: ~20 px a row plus its header (plotly's 180 px of margins aside)
    n_rows = len(dashes[0].scores_table())
    assert (scores_trace.domain.y[1] - scores_trace.domain.y[0]) * (fig.layout.height - 180) >= 20 * n_rows + 28


def test_prompt_view_top_latents_per_token(setup):
    model, sae, _ = setup
    view = prompt_latents(model, sae, "the cat sat on the mat", top_k=3)
    f, toks = _latents(model, sae, "the cat sat on the mat")
    top = torch.topk(f, 3, dim=-1)
    assert view.tokens == [model.tokenizer.decode([t]) for t in toks.tolist()]
    assert torch.equal(view.top_latents, top.indices)
    assert torch.allclose(view.top_acts, top.values, atol=1e-5)
    assert view.n_active.tolist() == (f > 0).sum(-1).tolist()
    shown, z = view.heatmap_data()
    assert set(shown) == set(top.indices[top.values > 0].tolist())
    fig = view.figure()
    assert fig.data[0].type == "heatmap" and list(fig.data[0].y) == [str(i) for i in shown]
    table = view.table()
    assert len(table) == int((top.values > 0).sum())


def test_html_export_and_jupyter_repr(setup, tmp_path):
    model, sae, corpus = setup
    dash = feature_dashboard(model, sae, 2, corpus[:4])
    assert "latent 2" in dash._repr_mimebundle_()["text/html"]
    out = dash.save_html(tmp_path / "d.html", include_plotlyjs="cdn")
    text = out.read_text()
    assert "<html>" in text[:100] and "latent 2 at blocks.1.hook_resid_post" in text
    png = dash.save_png(tmp_path / "d.png").read_bytes()  # offline: kaleido 0.2.1 from the dev extra
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_bad_input(setup, tmp_path):
    model, sae, corpus = setup
    with pytest.raises(ValueError, match=r"latent 64 is outside this SAE \(d_sae=64\).*\[0, 63\]"):
        feature_dashboard(model, sae, 64, corpus)
    with pytest.raises(ValueError, match="outside this SAE"):
        logit_lens(model, sae, -1)
    with pytest.raises(ValueError, match="integer index"):
        feature_dashboard(model, sae, 1.5, corpus)
    with pytest.raises(ValueError, match="corpus is empty"):
        feature_dashboard(model, sae, 1, [])
    with pytest.raises(ValueError, match="corpus is empty"):
        feature_dashboard(model, sae, 1, iter(()))
    with pytest.raises(ValueError, match="does not exist.*pass an existing .txt file"):
        feature_dashboard(model, sae, 1, tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="non-empty string"):
        prompt_latents(model, sae, "")
    with pytest.raises(ValueError, match="top_k"):
        prompt_latents(model, sae, "the cat", top_k=65)


def test_figures_script_renders_every_figure_type(setup, tmp_path):
    """experiments/figures.py on the tiny model: dashboards, a prompt view and a steering report."""
    model, sae, corpus = setup
    spec = importlib.util.spec_from_file_location("figures_script", ROOT / "experiments" / "figures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    toxic = ["you stupid idiot", "i hate you stupid dog", "you are bad"]
    clean = ["the cat sat on the mat", "a happy day", "i love my friend"]
    written = mod.write_figures(
        model,
        sae,
        corpus=corpus,
        toxic=toxic,
        non_toxic=clean,
        prompts=["you stupid"],
        out_dir=tmp_path,
        n_latents=2,
        max_texts=12,
        max_new_tokens=4,
        include_plotlyjs="cdn",
    )
    names = sorted(p.name for p in written if p.suffix == ".html")
    assert len([n for n in names if n.startswith("latent_")]) == 2
    assert "prompt_view.html" in names and "steering_report.html" in names
    assert all(p.stat().st_size > 1000 for p in written)


# ---------------------------------------------------------------------------------------------------
# Attention sinks: left out of contexts, histogram and density (sink_factor=3.0), kept with None
# ---------------------------------------------------------------------------------------------------


SINK_WORDS = ("world", "tree", "sun", "rain", "water")  # no text of _corpus() starts with one


def _sunk_latents(model, sae, text, sink):
    """Latents, tokens and sink flags of one text run alone (BOS excluded), the sink rule written out:
    residual norm > 3 x the median norm of the text's positions (BOS included)."""
    toks = model.to_tokens(text)
    with sink.active():
        _, cache = model.run_with_cache(toks, names_filter=HOOK)
    h = cache[HOOK][0]
    norms = h.norm(dim=-1)
    return sae.encode(h)[1:], toks[0, 1:], (norms > 3.0 * norms.median())[1:]


@pytest.fixture(scope="module")
def sunk(setup):
    model, sae, corpus = setup
    texts = list(corpus)
    for i, w in zip((2, 7, 11, 19), SINK_WORDS):
        texts[i] = w + " " + texts[i]
    texts.insert(15, SINK_WORDS[-1])  # a text whose only real token is a sink
    sink = FirstTokenSink(model, SINK_WORDS, hook=HOOK)
    per_text = [_sunk_latents(model, sae, t, sink) for t in texts]
    return model, sae, texts, sink, per_text


def test_plain_corpus_has_no_sinks(setup):
    """So the independent computations above (which ignore sinks) check the default sink_factor=3.0."""
    model, sae, corpus = setup
    s = collect_latent_stats(model, sae, corpus, [0], batch_size=5)[0]
    assert s.n_sinks == 0 and s.sink_factor == 3.0


def test_sinks_left_out_of_contexts_histogram_and_density(sunk):
    model, sae, texts, sink, per_text = sunk
    n_sinks = sum(int(s.sum()) for _, _, s in per_text)
    assert n_sinks == 5 and all(bool(per_text[i][2][0]) for i in (2, 7, 11, 15, 20))  # the sink rows
    at_sinks = torch.cat([f[s] for f, _, s in per_text])
    sink_lat = int(at_sinks.max(0).values.argmax())  # the latent firing hardest at the sinks
    latents = [sink_lat, 0, 7, 21]
    with sink.active():  # batches of 5 with right padding: the medians must ignore the padding
        kept = collect_latent_stats(model, sae, texts, latents, n_top=5, n_bins=10, batch_size=5)
        full = collect_latent_stats(model, sae, texts, latents, n_top=5, n_bins=10, batch_size=5, sink_factor=None)
    for stats, drop in ((kept, True), (full, False)):
        for lat in latents:
            s = stats[lat]
            cols = [f[:, lat].masked_fill(snk, 0.0) if drop else f[:, lat] for f, _, snk in per_text]
            counted = torch.cat([f[~snk, lat] if drop else f[:, lat] for f, _, snk in per_text]).double().numpy()
            assert s.n_tokens == len(counted)
            assert s.n_sinks == (n_sinks if drop else 0)
            assert s.sink_factor == (3.0 if drop else None)
            assert s.n_fired == int((counted > 0).sum())
            # (batches of 5 against one text at a time: float32 rounding, up to 4e-5 relative on AMD EPYC)
            assert s.max_activation == pytest.approx(counted.max(), rel=1e-4)
            ref, _ = np.histogram(counted[counted > 0], bins=s.hist_edges)
            assert s.hist_counts.tolist() == ref.tolist()
            maxima = torch.stack([c.max() for c in cols])
            expected = [i for i in torch.argsort(maxima, descending=True, stable=True).tolist() if maxima[i] > 0][:5]
            assert [c.text_index for c in s.top_contexts] == expected
            for c in s.top_contexts:
                p = int(cols[c.text_index].argmax())
                assert c.position == p + 1
                assert c.activation == pytest.approx(float(cols[c.text_index][p]), rel=1e-4)
                if drop:
                    assert not bool(per_text[c.text_index][2][p])  # never a sink
    # the case matters: kept, the sinks take the latent's top contexts and stretch its histogram
    k, f = kept[sink_lat], full[sink_lat]
    assert f.top_contexts[0].position == 1 and bool(per_text[f.top_contexts[0].text_index][2][0])
    assert f.max_activation > 10 * k.max_activation
    assert f.hist_edges[-1] > 10 * k.hist_edges[-1]
    assert f.n_tokens == k.n_tokens + n_sinks


def test_excluded_sinks_are_reported_in_the_figure(sunk):
    model, sae, texts, sink, per_text = sunk
    n_sinks = sum(int(s.sum()) for _, _, s in per_text)
    with sink.active():
        dash = feature_dashboard(model, sae, 3, texts, batch_size=5)
        both = feature_dashboard(model, sae, 3, texts, batch_size=5, sink_factor=None)
    assert dash.stats.n_sinks == n_sinks
    titles = [a.text for a in dash.figure().layout.annotations]
    assert any(f"<br>{n_sinks:,} attention-sink tokens left out" in t for t in titles), titles
    row = dash.scores_table().set_index("quantity")["value"]["sinks left out"]
    assert row == f"{n_sinks:,} (norm above 3x row median)"
    assert any("attention sinks kept (sink_factor=None)" in a.text for a in both.figure().layout.annotations)
    assert both.scores_table().set_index("quantity")["value"]["sinks left out"].startswith("none")


def test_sink_errors_name_the_fix(sunk):
    model, sae, _, sink, _ = sunk
    with sink.active(), pytest.raises(ValueError, match=r"attention sink at sink_factor=3.0.*sink_factor=None"):
        collect_latent_stats(model, sae, ["world", "tree"], [0])
    with pytest.raises(ValueError, match=r"sink_factor must be a number > 1"):
        collect_latent_stats(model, sae, ["the cat"], [0], sink_factor=1.0)


# ---------------------------------------------------------------------------------------------------
# Jupyter display: one representation path; plain tqdm
# ---------------------------------------------------------------------------------------------------


def test_views_have_one_jupyter_repr_and_draw_once(setup, monkeypatch):
    import json

    import plotly.io as pio
    from IPython.core.formatters import DisplayFormatter

    from saesteer.viz.dashboard import FeatureDashboard, PlotlyView, PromptLatents
    from saesteer.viz.steering_report import SteeringReport

    for cls in (PlotlyView, FeatureDashboard, PromptLatents, SteeringReport):
        reprs = sorted(n for n in dir(cls) if n.startswith("_repr_") or n == "_ipython_display_")
        assert reprs == ["_repr_mimebundle_"], (cls.__name__, reprs)
    model, sae, corpus = setup
    dash = feature_dashboard(model, sae, 2, corpus[:4])
    built = []
    draw = dash.figure
    monkeypatch.setattr(dash, "figure", lambda: built.append(1) or draw())
    # Jupyter's default renderer: plotly's own bundle would publish all of plotly.js on every display
    monkeypatch.setattr(pio.renderers, "default", "plotly_mimetype+notebook")
    data, _ = DisplayFormatter().format(dash)
    assert len(built) == 1  # IPython asked once and the figure was built once
    assert set(data) == {"application/vnd.plotly.v1+json", "text/html", "text/plain"}
    fig = data["application/vnd.plotly.v1+json"]
    assert fig["layout"]["title"]["text"] == "latent 2 at blocks.1.hook_resid_post"
    assert json.loads(json.dumps(fig))["data"][0]["type"] == "table"  # JSON-serialisable as the frontend gets it
    html = data["text/html"]
    assert "latent 2 at blocks.1.hook_resid_post" in html and "cdn.plot.ly" in html
    assert len(html) < 200_000 and "window.Plotly = Plotly" not in html  # plotly.js not embedded
    assert data["text/plain"] == "<FeatureDashboard: latent 2 at blocks.1.hook_resid_post>"
    assert set(dash._repr_mimebundle_(include={"text/html"})) == {"text/html"}
    assert "text/html" not in dash._repr_mimebundle_(exclude={"text/html"})


def test_progress_bars_are_plain_tqdm():
    """tqdm.auto warns "IProgress not found" in kernels without ipywidgets."""
    import tqdm

    from saesteer.sae import activations
    from saesteer.viz import dashboard

    assert dashboard.tqdm is tqdm.tqdm and activations.tqdm is tqdm.tqdm
