"""In-context linear regression (paper 6's setting): trained softmax attention vs the ridge and one-step-GD baselines.

Paper: "In-Context Linear Regression Demystified: Training Dynamics and Mechanistic Interpretability of
Multi-Head Softmax Attention" (d=5, L=40 pairs, noise variance 0.1). The paper trains ONE layer of
multi-head softmax attention and finds it implements a debiased one-step gradient-descent predictor;
one GD step cannot reach the Bayes-optimal ridge error (about 0.240 vs 0.115 here, closed forms in
``LinearRegressionICL``), so the issue's target (within 10% of ridge) needs depth. This script trains
both: the paper's one-layer models (1, 2, 4 heads, no MLP) and deeper softmax transformers, and scores
every model and baseline on the same large held-out batch.

    python3 benchmarks/icl_regression.py --device cuda --steps 20000 --out benchmarks/results/icl_regression
    python3 benchmarks/icl_regression.py --quick            # CPU smoke run, a few hundred steps
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time

import torch

from attnlab.models import for_task
from attnlab.tasks.linear_regression import LinearRegressionICL
from attnlab.train import TrainConfig, train

# name: (layers, heads, d_model, mlp_ratio)
CONFIGS = {
    "1 layer, 1 head (paper)": (1, 1, 64, 0),
    "1 layer, 2 heads (paper)": (1, 2, 64, 0),
    "1 layer, 4 heads (paper)": (1, 4, 64, 0),
    "4 layers, 4 heads, MLP": (4, 4, 128, 4),
    "8 layers, 4 heads, MLP": (8, 4, 128, 4),
}


def squared_errors(pred: torch.Tensor, batch) -> torch.Tensor:
    return (pred.double().cpu() - batch.targets[:, -1].double().cpu()).square()


def summary(err: torch.Tensor, ridge: torch.Tensor) -> dict:
    """Mean squared error with its standard error, and the ratio to ridge with a paired 95% interval (delta method)."""
    n = err.numel()
    mse, r = err.mean().item(), ridge.mean().item()
    diff = err - ridge * (mse / r)  # linearised ratio: Var(mean(e) / mean(r))
    se_ratio = diff.std().item() / math.sqrt(n) / r
    return dict(mse=mse, se=err.std().item() / math.sqrt(n), ratio=mse / r,
                ratio_ci=[mse / r - 1.96 * se_ratio, mse / r + 1.96 * se_ratio])


def run(args: argparse.Namespace) -> dict:
    task = LinearRegressionICL()
    test = task.sample(args.eval, seed=424242)
    ridge = squared_errors(task.ridge_predict(test), test)
    rows = [dict(name="ridge (Bayes-optimal)", **summary(ridge, ridge)),
            dict(name="one GD step, optimal step size", **summary(squared_errors(task.gd_one_step_predict(test), test), ridge))]
    for name in args.configs:
        layers, heads, width, mlp = CONFIGS[name]
        torch.manual_seed(args.seed)
        model = for_task(task, "softmax", d_model=width, n_layers=layers, n_heads=heads, pos="none", mlp_ratio=mlp)
        t0 = time.time()
        result = train(model, task, TrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, weight_decay=0.0,
                                                eval_every=max(1, args.steps // 10), seed=args.seed,
                                                device=args.device, progress=not args.no_progress))
        model.eval()
        with torch.no_grad():
            pred = torch.cat([model(test.inputs[i:i + 4096].to(args.device))[:, -1, 0] for i in range(0, args.eval, 4096)])
        row = dict(name=name, layers=layers, heads=heads, d_model=width, mlp_ratio=mlp, params=model.n_params(),
                   steps=result.steps, seconds=round(time.time() - t0, 1),
                   curve=[(h["step"], round(h["metric"], 4)) for h in result.history], **summary(squared_errors(pred, test), ridge))
        print(f"{name}: mse {row['mse']:.4f} ({row['ratio']:.3f} x ridge) in {row['seconds']} s", flush=True)
        rows.append(row)
    return dict(command="python3 benchmarks/icl_regression.py " + " ".join(args.argv), device=args.device,
                torch=torch.__version__, host=platform.node(), eval_examples=args.eval, steps=args.steps,
                batch=args.batch, lr=args.lr, rows=rows)


def markdown(res: dict) -> str:
    out = ["# In-context linear regression (paper 6's setting: d=5, L=40 pairs, noise variance 0.1)", "",
           f"Command: `{res['command']}` (device {res['device']}, torch {res['torch']}). Softmax attention"
           f" (attnlab TinyTransformer, no positional encoding), AdamW lr {res['lr']} warm-up + cosine,"
           f" batch {res['batch']}, {res['steps']} steps, fresh tasks every step; every row scored on the same"
           f" {res['eval_examples']:,} held-out tasks. Ratio interval: paired 95% (delta method).", "",
           "| model | params | mse (+- s.e.) | x ridge [95%] | train s |", "|---|---|---|---|---|"]
    for r in res["rows"]:
        lo, hi = r["ratio_ci"]
        out.append(f"| {r['name']} | {r.get('params', '-')} | {r['mse']:.4f} +- {r['se']:.4f} | {r['ratio']:.3f} "
                   f"[{lo:.3f}, {hi:.3f}] | {r.get('seconds', '-')} |")
    out += ["", "Target (issue 6): trained multi-head softmax attention within 10% of ridge (x ridge <= 1.10).",
            "The paper's one-layer model learns a (debiased) one-step GD predictor, whose population error with the",
            "best step size is 1 + s^2 - 1/(1 + (d+1)/L + s^2 d/L) = 0.240, about 2.1x ridge: one layer cannot meet",
            "the target; depth can."]
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval", type=int, default=16384)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: 2 configs, 200 steps, 2048 test tasks")
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    ap.add_argument("--no-progress", action="store_true")
    import sys
    args = ap.parse_args()
    args.argv = sys.argv[1:]
    if args.quick:
        args.steps, args.eval, args.configs = 200, 2048, ["1 layer, 2 heads (paper)", "4 layers, 4 heads, MLP"]
    res = run(args)
    text = markdown(res)
    print(text)
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump(res, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
