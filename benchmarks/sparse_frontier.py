"""The Sparse Frontier table: quality vs density per task for every sparse method attnlab measured.

Paper: "The Sparse Frontier: Sparse Attention Trade-offs in Transformer LLMs" (Nawrot et al., 2025).

Inputs are result JSONs already written by other scripts; nothing is run here:
* ``--seer``: benchmarks/seer_smollm2.py output (block-sparse prefill, held-out KJV perplexity per length);
* ``--kv``: ``attnlab kv sweep`` outputs (KV-cache policies on needle / multikey, accuracy vs kept KV).

Writes ``--md`` (tables + the fit) and, with ``--png``, a figure (matplotlib, any machine). The fit, per
prefill method over all its sparse rows: log(ppl / dense ppl) = a + b log(1 / density) + c log(N / 1024),
least squares (c only when the method has rows at two or more lengths), with R^2; Sparse Frontier fits
log-linear laws of this kind in compression ratio and length.

    python3 benchmarks/sparse_frontier.py --seer out/seer_smollm2.json --md out/frontier.md --png out/frontier.png
"""
from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict

import numpy as np

PREFILL_ORDER = ("seer_topk", "seer_threshold", "oracle_topk", "window", "sink_window")


def run_methods(run: dict) -> list[str]:
    """The run's sparse methods: PREFILL_ORDER first, then the others (e.g. "seer_topk+sink+local2") as met."""
    seen = [r["method"] for r in run["rows"] if r["method"] != "dense"]
    return [m for m in PREFILL_ORDER if m in seen] + [m for m in dict.fromkeys(seen) if m not in PREFILL_ORDER]


def dense_ppl(run: dict) -> float | None:
    return next((r["ppl"] for r in run["rows"] if r["method"] == "dense"), None)


def within(run: dict, method: str, tol: float = 0.05) -> float | None:
    """The lowest density at which ``method`` stays within ``tol`` of dense perplexity (None: never)."""
    d = dense_ppl(run)
    ok = [r["density"] for r in run["rows"] if r["method"] == method and r["ppl"] <= (1 + tol) * d]
    return min(ok) if ok else None


def fit(points: list[tuple[float, int, float]]) -> dict | None:
    """Least squares of log ppl ratio on [1, log(1/density), log(N/1024)]; points (density, N, ratio)."""
    pts = [(d, n, r) for d, n, r in points if 0 < d < 1 and r > 0]
    lengths = {n for _, n, _ in pts}
    cols = 3 if len(lengths) > 1 else 2
    if len(pts) < cols + 1:
        return None
    x = np.array([[1.0, math.log(1 / d), math.log(n / 1024)][:cols] for d, n, _ in pts])
    y = np.array([math.log(r) for _, _, r in pts])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    resid = y - x @ coef
    ss = float(((y - y.mean()) ** 2).sum())
    r2 = 1 - float((resid ** 2).sum()) / ss if ss > 0 else float("nan")
    return {"a": float(coef[0]), "b": float(coef[1]), "c": float(coef[2]) if cols == 3 else None,
            "r2": r2, "points": len(pts)}


def prefill_tables(seer: dict) -> list[str]:
    lines = [f"## Task: held-out KJV New Testament perplexity, block-sparse prefill ({seer.get('device_name', '')})",
             "", "Cells: perplexity ratio to dense at the same length (+x%), density = kept fraction of the causal "
             "blocks (mean over layers, KV heads, held-out segments). Top-k, oracle, window and "
             "sink+window share one k per column, hence one density. Method options: +sink / +localN = the "
             "first / N most recent blocks always kept (counted in k), +mass = oracle ranks tiles by mass, +dev / +devo = by "
             "mass weighted by ||v - o|| (through o_proj for devo; ours), +adev = per-head k from the dev map. Adaptive rows "
             "(ours: *_topp, *_global, *_headk; +true = oracle ranks by true attention shares) spend top-k's block "
             "count of their column; a row at another density says so (\"at 0.098\").", ""]
    points = defaultdict(list)
    for run in seer["runs"]:
        d = dense_ppl(run)
        if d is None:
            continue
        n = run["n"]
        if run.get("gate_free"):
            gates = "no gates at this block size"
        elif "calib_tokens" not in run:  # --gate-variants run cut before its first training ended
            gates = "no gates trained"
        else:
            gates = (f"gates: {run['calib_tokens']} calibration tokens, {run['steps']} steps, KL "
                     f"{run['kl_calib_before']:.3f} -> {run['kl_calib_after']:.3f}, held-out {run['kl_heldout_after']:.3f}")
            if run.get("gate_keep_sink") or run.get("gate_keep_local", 1) > 1:
                gates += " (KL over the blocks not forced)"
        lines.append(f"### N = {n}, {run.get('block', 64)}-token blocks (dense ppl {d:.3f}; {gates})")
        lines.append("")
        ks = sorted({r["k"] for r in run["rows"] if "k" in r}, reverse=True)
        dens_k = {k: next(r["density"] for r in run["rows"] if r.get("k") == k) for k in ks}
        lines.append("| method | " + " | ".join(f"k={k} ({dens_k[k]:.3f})" for k in ks)
                     + " | lowest density within 5% |")
        lines.append("|---" * (len(ks) + 2) + "|")
        for m in run_methods(run):
            rows = [r for r in run["rows"] if r["method"] == m]
            for r in rows:
                points[(m, run.get("block", 64))].append((r["density"], n, r["ppl"] / d))
            rows = [r for r in rows if "k" in r]
            if not rows:
                continue
            # a row whose density is not its column's (per-head k: at most top-k's count) shows its own
            cell = {r["k"]: f"{r['ppl']:.2f} ({100 * (r['ppl'] / d - 1):+.1f}%)"
                    + (f" at {r['density']:.3f}" if abs(r["density"] - dens_k[r["k"]]) > 5e-4 else "") for r in rows}
            best = within(run, m)
            best = "none" if best is None else f"{best:.3f}"
            lines.append(f"| {m} | " + " | ".join(cell.get(k, "") for k in ks) + f" | {best} |")
        if run.get("block", 64) < 64:  # cells finer than the kernel's tiles: what the kernel computes
            tiled = [m for m in run_methods(run) if any(r.get("tile64_density") for r in run["rows"]
                                                            if r["method"] == m and "k" in r)]
            if tiled:
                lines += ["", "Fraction of causal 64 x 64 kernel tiles these selections touch (the kernel's work):", "",
                          "| method | " + " | ".join(f"k={k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
                for m in tiled:
                    cell = {r["k"]: f"{r['tile64_density']:.3f}" for r in run["rows"]
                            if r["method"] == m and r.get("tile64_density") is not None and "k" in r}
                    lines.append(f"| {m} | " + " | ".join(cell.get(k, "") for k in ks) + " |")
        if run.get("variants"):  # seer_smollm2.py --gate-variants: each gate recipe's training and ranking
            lines += ["", "Gate recipes (``--gate-variants``; the header's gates are the first). KL over the free "
                      f"blocks on the early-stopping calibration segment ({run.get('val_index')}, Old Testament) and on "
                      f"the first held-out segment; kept = attention share the head-k selection keeps at k="
                      f"{next(iter(run['variants'].values()))['kept_k']} (oracle with the same budgets in brackets):", "",
                      "| recipe | segments | steps run | train s | KL val | KL held-out | kept val | kept held-out |",
                      "|---|---|---|---|---|---|---|---|"]
            dev = any("held_kept_dev" in v for v in run["variants"].values())
            if dev:  # seer7: the share of the output-deviation map kept too (its own oracle in brackets)
                lines[-2:] = [lines[-2] + " kept dev held-out |", lines[-1] + "---|"]
            for name, v in run["variants"].items():
                lines.append(f"| {v['spec']} | {v['train_segments']} | {v['steps_run']} | {v['train_s']:.0f} | "
                             + (f"{v['kl_val_before']:.3f} -> " if v.get("kl_val_before") is not None else "")
                             + f"{v['kl_val_after']:.3f} | {v['kl_heldout_after']:.3f} | "
                             f"{v['val_kept']:.4f} ({v['val_kept_oracle']:.4f}) | "
                             f"{v['held_kept']:.4f} ({v['held_kept_oracle']:.4f}) |"
                             + (f" {v['held_kept_dev']:.4f} ({v['held_kept_dev_oracle']:.4f}) |" if "held_kept_dev" in v
                                else " |" if dev else ""))
            lines.append(f"\nCalibration: {run.get('calib_segments_computed')} segments of {n} tokens, "
                         f"{run.get('calib_s_per_segment', 0):.2f} s each.")
            vd = next((r.get("val_ppl") for r in run["rows"] if r["method"] == "dense"), None)
            if vd:  # --val-ppl: the calibration side, where recipes are chosen, beside the held-out NT
                lines += ["", f"Perplexity ratio to dense on the early-stopping segment (Old Testament, dense "
                          f"{vd:.3f}; where recipes are chosen) and on the held-out NT (reported):", "",
                          "| method | early-stopping segment | held-out NT |", "|---|---|---|"]
                for r in run["rows"]:
                    if r["method"] != "dense" and r.get("val_ppl"):
                        lines.append(f"| {r['method']} | {100 * (r['val_ppl'] / vd - 1):+.2f}% | "
                                     f"{100 * (r['ppl'] / d - 1):+.2f}% |")
        # rows with their own density: gate thresholds (t) and fixed top-p masses (p)
        for key, m in dict.fromkeys((key, r["method"]) for key in ("threshold", "p") for r in run["rows"] if key in r):
            th = [r for r in run["rows"] if r["method"] == m and key in r]
            lines += ["", f"| {m} | " + " | ".join(f"{key[0]}={r[key]:g}" for r in th) + " |",
                      "|---" * (len(th) + 1) + "|",
                      "| density | " + " | ".join(f"{r['density']:.3f}" for r in th) + " |",
                      "| ppl | " + " | ".join(f"{r['ppl']:.2f} ({100 * (r['ppl'] / d - 1):+.1f}%)" for r in th) + " |"]
        lines.append("")
    for run in seer["runs"]:
        if run.get("needle"):
            lines += [f"### Needle at N = {run['n']}: block-sparse prefill, dense decoding (greedy, 12 tokens)", "",
                      "| method | k | threshold | density | accuracy | 95% CI | samples |", "|---|---|---|---|---|---|---|"]
            for r in run["needle"]:
                lines.append(f"| {r['method']} | {r.get('k', '')} | {r.get('threshold', '')} | {r['density']:.3f} | "
                             f"{r['accuracy']:.2f} | [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}] | {r['n_samples']} |")
            lines.append("")
    lines += ["### Fit: log(ppl / dense) = a + b log(1/density) + c log(N/1024)", "",
              "| method | block | a | b | c | R^2 | points |", "|---|---|---|---|---|---|---|"]
    order = {m: i for i, m in enumerate(PREFILL_ORDER)}
    for m, block in sorted(points, key=lambda mb: (mb[1], order.get(mb[0], len(order)), mb[0])):
        f = fit(points[(m, block)])
        if f:
            c = f"{f['c']:+.3f}" if f["c"] is not None else ""
            lines.append(f"| {m} | {block} | {f['a']:+.3f} | {f['b']:+.3f} | {c} | {f['r2']:.2f} | {f['points']} |")
    return lines + [""]


def kv_tables(kv_runs: list[dict]) -> list[str]:
    by_task = defaultdict(list)
    for run in kv_runs:
        for r in run.get("results", []):
            by_task[(r["task"], r["length"])].append(r)
    lines = []
    for (task, n), rows in sorted(by_task.items()):
        lines += [f"## Task: {task} at {n} tokens, KV-cache policies (decode; density = kept KV fraction)", "",
                  "| policy | kept fraction | accuracy | 95% CI | samples |", "|---|---|---|---|---|"]
        for r in sorted(rows, key=lambda r: (r["policy"] != "full", r["policy"], -r["kept_fraction"])):
            ci = r.get("ci95") or [float("nan")] * 2
            lines.append(f"| {r['policy']} | {r['kept_fraction']:.3f} | {r['accuracy']:.3f} | "
                         f"[{ci[0]:.2f}, {ci[1]:.2f}] | {r['n_samples']} |")
        lines.append("")
    return lines


def figure(seer: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in seer["runs"] if dense_ppl(r)]
    fig, axes = plt.subplots(1, max(len(runs), 1), figsize=(4.2 * max(len(runs), 1), 3.6), squeeze=False)
    for ax, run in zip(axes[0], runs):
        d = dense_ppl(run)
        for m in run_methods(run):
            pts = sorted((r["density"], r["ppl"] / d) for r in run["rows"] if r["method"] == m)
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=m)
        ax.axhline(1.05, color="grey", ls="--", lw=0.8)
        ax.axvline(0.10, color="grey", ls=":", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"N = {run['n']}")
        ax.set_xlabel("block density (kept fraction)")
        ax.set_ylabel("ppl / dense ppl")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seer", help="benchmarks/seer_smollm2.py JSON")
    ap.add_argument("--kv", nargs="*", default=[], help="attnlab kv sweep JSONs")
    ap.add_argument("--md", required=True)
    ap.add_argument("--png")
    args = ap.parse_args()
    lines = ["# The Sparse Frontier for SmolLM2-135M: quality vs density per task", ""]
    seer = None
    if args.seer:
        with open(args.seer) as f:
            seer = json.load(f)
        lines += prefill_tables(seer)
    kv = []
    for p in args.kv:
        with open(p) as f:
            kv.append(json.load(f))
    lines += kv_tables(kv)
    with open(args.md, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.png and seer:
        figure(seer, args.png)


if __name__ == "__main__":
    main()
