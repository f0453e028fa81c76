"""The sweep's figure (accuracy vs kept KV bytes, one panel per task) and markdown table."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .evaluate import PolicyResult

_STYLE = {"full": ("black", "*"), "streaming": ("tab:blue", "s"), "snapkv": ("tab:orange", "^"),
          "h2o": ("tab:green", "D"), "razor": ("tab:red", "o"), "moa": ("tab:purple", "v"),
          "task_kv": ("tab:brown", "P")}


def sweep_figure(results: Sequence[PolicyResult], path: Path, title: str = "") -> Path:
    """PNG: accuracy (with Wilson 95% bars) against the fraction of KV bytes kept, per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r.task for r in results))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4), squeeze=False, sharey=True)
    for ax, task in zip(axes[0], tasks):
        rows = [r for r in results if r.task == task]
        for name in dict.fromkeys(r.policy for r in rows):
            pts = sorted((r for r in rows if r.policy == name), key=lambda r: r.kept_fraction)
            color, marker = _STYLE.get(name, ("gray", "x"))
            x = [r.kept_fraction for r in pts]
            y = [r.accuracy for r in pts]
            # clamp: the Wilson bound of 1.0 (or 0.0) can round a hair past the accuracy itself
            err = [[max(0.0, r.accuracy - r.ci95[0]) for r in pts], [max(0.0, r.ci95[1] - r.accuracy) for r in pts]]
            ax.errorbar(x, y, yerr=err, color=color, marker=marker, capsize=3, lw=1.5, label=name, alpha=0.85)
        n = rows[0].n_samples if rows else 0
        ax.set_title(f"{task} (n={n} per point)")
        ax.set_xlabel("KV bytes kept (fraction of full cache)")
        ax.set_xlim(0, 1.05)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (95% Wilson CI)")
    axes[0][0].set_ylim(-0.05, 1.05)
    axes[0][-1].legend(loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sweep_table(results: Sequence[PolicyResult], command: str = "") -> str:
    """Markdown: one row per (task, policy, budget), with accuracy relative to the full cache."""
    full = {r.task: r.accuracy for r in results if r.policy == "full"}
    lines = ["# KV-cache policies: accuracy vs kept KV bytes", ""]
    if command:
        lines += ["Command:", "", f"    {command}", ""]
    lines += ["| task | policy | budget | kept KV (fraction) | saved | accuracy | 95% CI | vs full | "
              "prefill tok/s | decode tok/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        rel = f"{r.accuracy / full[r.task]:.2f}" if full.get(r.task) else "-"
        lines.append(f"| {r.task} | {r.policy} | {r.budget:g} | {r.kept_fraction:.3f} | {1 - r.kept_fraction:.0%} | "
                     f"{r.accuracy:.3f} | [{r.ci95[0]:.2f}, {r.ci95[1]:.2f}] | {rel} | "
                     f"{r.prefill_tokens_per_s:.0f} | {r.decode_tokens_per_s:.1f} |")
    return "\n".join(lines) + "\n"
