"""`attnlab heads retrieval`: retrieval score of every head from needle copy-paste events.

Writes ``DIR/retrieval_heads.json`` (per-head scores [L][H], the retrieval heads, the fraction of
heads above the 0.1 threshold, every sample's parameters and answer) and ``DIR/retrieval_heads.png``
(a layer x head heatmap). See :mod:`attnlab.analysis.retrieval_heads` for the definition
("Retrieval Head Mechanistically Explains Long-Context Factuality", arXiv 2404.15574).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .analysis.retrieval_heads import THRESHOLD, RetrievalScores, retrieval_head_scores


def heatmap_png(scores: torch.Tensor, path: str | Path, title: str, threshold: float | None = THRESHOLD) -> Path:
    """Draw (L, H) scores as a layer (rows) x head (columns) heatmap PNG; heads above ``threshold`` boxed."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    s = scores.detach().double().cpu().numpy()
    layers, heads = s.shape
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * heads, 1.2 + 0.22 * layers))
    im = ax.imshow(s, cmap="viridis", vmin=0.0, vmax=max(1e-9, float(s.max())), aspect="auto")
    if threshold is not None:
        for layer, head in zip(*(s > threshold).nonzero()):
            ax.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.2))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(heads))
    ax.set_yticks(range(0, layers, max(1, layers // 15)))
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.08)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_results(result: RetrievalScores, out: str | Path, meta: dict) -> tuple[Path, Path]:
    """Write the JSON and the heatmap PNG into directory ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = dict(meta, **result.to_dict())
    json_path = out / "retrieval_heads.json"
    json_path.write_text(json.dumps(data, indent=1))
    frac = result.fraction_above()
    title = (f"retrieval score, {meta.get('model', '')}: {frac:.1%} of heads > {THRESHOLD} "
             f"({result.n_counted}/{len(result.records)} samples counted)")
    png_path = heatmap_png(result.scores, out / "retrieval_heads.png", title)
    return json_path, png_path


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `attnlab heads` and its `retrieval` subcommand."""
    heads = subparsers.add_parser("heads", help="find special attention heads (retrieval heads)")
    sub = heads.add_subparsers(dest="heads_command", required=True)
    p = sub.add_parser(
        "retrieval", help="retrieval score per head from needle copy-paste events (JSON + heatmap)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default=None, help="smollm2 (default), a local HF model dir or a .gguf file")
    p.add_argument("--samples", type=int, default=8, help="needle samples per length, at evenly spaced depths (default 8)")
    p.add_argument("--length", type=int, nargs="+", default=[1024], help="prompt length(s) in tokens (default 1024)")
    p.add_argument("--seed", type=int, default=0, help="needle generator seed")
    p.add_argument("--min-recall", type=float, default=0.5, help="a sample counts if its needle recall is above this")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_retrieval)
    return heads


def _run_retrieval(args: argparse.Namespace) -> int:
    from .eval import resolve_device
    from .hf import load
    from .tasks import depth_grid, needle_grid

    try:
        if args.samples <= 0:
            raise ValueError(f"--samples must be a positive integer; got {args.samples}")
        if any(L <= 0 for L in args.length):
            raise ValueError(f"--length must be positive token counts; got {args.length}")
        if not 0.0 <= args.min_recall < 1.0:
            raise ValueError(f"--min-recall must lie in [0, 1); got {args.min_recall}")
        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise ValueError(f"--out must be a directory; {args.out!r} is a file")
        device = resolve_device(args.device)
        model, tokenizer = load(args.model)
        model.to(device)
        context = getattr(model.config, "max_position_embeddings", None)
        if context is not None and max(args.length) + 16 > context:
            raise ValueError(f"--length {max(args.length)} plus the answer exceeds the model's context of {context}")
        samples = needle_grid(tokenizer, args.length, depth_grid(args.samples), 1, seed=args.seed)
        result = retrieval_head_scores(model, tokenizer, samples, min_recall=args.min_recall,
                                       progress=not args.no_progress)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    meta = dict(model=args.model or "smollm2", lengths=args.length, samples_per_length=args.samples, seed=args.seed)
    json_path, png_path = write_results(result, args.out, meta)
    top = ", ".join(f"({l},{h}) {result.scores[l, h]:.2f}" for l, h in result.ranking()[:5])
    print(f"{result.fraction_above():.1%} of {result.scores.numel()} heads have retrieval score > {THRESHOLD} "
          f"({result.n_counted}/{len(result.records)} samples counted); top: {top}")
    if result.n_counted == 0:
        print("warning: the model recalled no needle, so every score is 0")
    print(f"wrote {json_path} and {png_path}")
    return 0
