"""Evaluate an SAE (a registered name or an SAELens folder) on held-out English text; write the numbers next to it.

Prints and writes (into ``quality.json`` in the SAE's folder, under ``stored_<dtype on disk>``; the other keys
training wrote are kept): explained variance, L0, dead-latent share, and the next-token
cross-entropy increase (nats) when the SAE reconstruction replaces the residual stream (no error
term), computed by :func:`saesteer.sae.quality.evaluate_saes`. Held-out text: every 50th sentence of
``english_corpus()`` (never trained on), packed into BOS-led rows; by default rows 24..119, the rows the
shipped SAE's final evaluation used (its training tracked held-out EV on rows 0..23).
BOS and attention-sink tokens (norm > the SAE's ``metadata.max_token_norm``) are excluded; the JSON
also has the CE increase with the sinks spliced too.

    HF_HUB_OFFLINE=1 .venv/bin/python experiments/eval_sae.py            # the project's SAE for SmolLM2-135M
    HF_HUB_OFFLINE=1 .venv/bin/python experiments/eval_sae.py --sae smollm2-135m-res-15-4608 --no-ce
    HF_HUB_OFFLINE=1 .venv/bin/python experiments/eval_sae.py --sae FOLDER --rows 200 --out /tmp/q.json

A registered SAE is checked against its pinned sha256 before it is evaluated.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from saesteer.data.atomic import write_text_atomic  # noqa: E402
from saesteer.experiment import DEFAULT_MODEL, seed_everything  # noqa: E402
from saesteer.sae.quality import HELDOUT_EVERY, evaluate_saes, pack_token_rows, split_heldout  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--sae",
        default=None,
        help="registered SAE name or SAELens folder (cfg.json + "
        f"sae_weights.safetensors); default: the project's SAE for --model, else for {DEFAULT_MODEL}",
    )
    p.add_argument(
        "--model",
        default=None,
        help="model for saesteer.models.loading.load_model (default: the SAE's metadata.model_name)",
    )
    p.add_argument("--rows", type=int, default=96, help="held-out rows to evaluate")
    p.add_argument("--offset", type=int, default=24, help="skip this many held-out rows first")
    p.add_argument(
        "--heldout-every", type=int, default=HELDOUT_EVERY, help="held-out rule: sentence i when i %% N == N-1"
    )
    p.add_argument(
        "--context-size", type=int, default=None, help="tokens per row (default: the SAE's metadata.context_size)"
    )
    p.add_argument(
        "--max-norm",
        type=float,
        default=None,
        help="exclude tokens with a larger residual norm (default: the SAE's metadata.max_token_norm)",
    )
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward pass")
    p.add_argument("--no-ce", action="store_true", help="skip the cross-entropy splice (much faster)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--out", type=Path, default=None, help="JSON to update (default: quality.json in the SAE's folder)")
    return p.parse_args(argv)


def sae_folder(name: str) -> Path:
    """The folder of a registered SAE (its files checked against their sha256) or of an SAELens folder."""
    from saesteer.sae.registry import project_saes

    if name in project_saes():
        return project_saes()[name].verify()
    folder = Path(name)
    if not (folder / "cfg.json").is_file() or not (folder / "sae_weights.safetensors").is_file():
        raise SystemExit(
            f"--sae {name!r} is neither a registered SAE ({sorted(project_saes())}) nor an SAELens folder "
            "(cfg.json + sae_weights.safetensors); pass one of those names or such a folder."
        )
    return folder


def main(argv=None) -> int:
    args = parse_args(argv)
    seed_everything(0, threads=args.threads)
    from sae_lens import SAE
    from safetensors import safe_open

    from saesteer.checks import check_sae_fits
    from saesteer.data.datasets import english_corpus
    from saesteer.models.loading import load_model
    from saesteer.sae.registry import default_project_sae

    t0 = time.time()
    name = args.sae or default_project_sae(args.model or DEFAULT_MODEL).name
    folder = sae_folder(name)
    sae = SAE.load_from_disk(folder).eval().requires_grad_(False)
    meta = sae.cfg.metadata
    with safe_open(str(folder / "sae_weights.safetensors"), framework="pt") as f:
        disk_dtype = str(f.get_slice("W_enc").get_dtype()).lower().replace("torch.", "")
    disk_dtype = {"f16": "float16", "bf16": "bfloat16", "f32": "float32"}.get(disk_dtype, disk_dtype)
    model_name = args.model or meta.model_name
    hook = meta.hook_name
    ctx = args.context_size or meta.context_size or 128
    max_norm = args.max_norm if args.max_norm is not None else meta.get("max_token_norm")
    print(
        f"SAE {name} ({folder}): {sae.cfg.architecture()} d_in {sae.cfg.d_in} d_sae {sae.cfg.d_sae}, hook {hook}, "
        f"weights on disk {disk_dtype}, loaded as {sae.W_enc.dtype}",
        flush=True,
    )

    model = load_model(model_name)
    check_sae_fits(model, sae, hook)  # the hook exists and d_in == d_model (the error says what to load instead)
    _, heldout = split_heldout(english_corpus(), args.heldout_every)
    rows = pack_token_rows(heldout, model.tokenizer, ctx, max_rows=args.offset + args.rows)[args.offset :]
    print(f"evaluating on {rows.shape[0]} held-out rows of {ctx} tokens (max_norm {max_norm})", flush=True)
    q = evaluate_saes(
        model,
        {"sae": sae},
        rows,
        hook,
        batch_size=args.batch_size,
        compute_ce=not args.no_ce,
        progress=True,
        max_norm=max_norm,
    )["sae"]
    print(f"explained variance      {q.explained_variance:.4f}")
    print(f"L0                      {q.l0:.1f}")
    print(f"dead latents            {q.n_dead} / {q.d_sae} ({q.dead_share:.2%}) on {q.n_tokens} tokens")
    if q.ce_increase is not None:
        print(f"CE clean / spliced      {q.ce_clean:.4f} / {q.ce_spliced:.4f} nats")
        print(
            f"CE increase             {q.ce_increase:.4f} nats (sinks spliced too: {q.ce_increase_all_positions:.4f})"
        )
    print(f"excluded sink tokens    {q.n_excluded_tokens}")

    out = args.out or folder / "quality.json"
    data = json.loads(out.read_text()) if out.exists() else {}
    data.update({"model_name": model_name, "hook_name": hook})
    data[f"stored_{disk_dtype}"] = q.to_dict()
    data.setdefault("eval_settings", {}).update(
        {
            "rows": int(rows.shape[0]),
            "row_offset": args.offset,
            "context_size": ctx,
            "heldout_every": args.heldout_every,
            "max_norm": max_norm,
            "seconds": round(time.time() - t0, 1),
        }
    )
    write_text_atomic(out, json.dumps(data, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
