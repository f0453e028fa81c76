"""Attention-layer drop on SmolLM2: quality and prefill speed vs the number k of dropped attention layers.

Paper: "What Matters in Transformers? Not All Attention is Needed" (He et al., arXiv 2406.15786).

Run: python3 benchmarks/layer_drop.py [--ks 0 1 2 4 6 8 12] [--seeds 0 1 2] [--sst2 60] [--speed-reps 3]
         [--device cuda] [--batch-size 32] [--out PATH.json]
Writes benchmarks/results/layer_drop.json (or --out) and prints a markdown table (also written beside
the json as .md when --out is given).

* drop order: "similarity" = highest cos(X, X + Attn) first, measured on calibration prompts from the
  start of the bundled KJV Genesis text (8 x 128 tokens); "random" = seeded random layers (the paper's
  baseline), one row per seed;
* perplexity: held-out KJV text (later in Genesis, disjoint from the calibration tokens), 4 windows of
  256 tokens, exp(mean next-token NLL);
* SST-2 4-shot accuracy (label-word log-likelihood, uncalibrated and contextually calibrated) on a fixed
  subset of the test split, through attnlab.tasks.classification / attnlab.eval;
* prefill speed at 1,024 tokens: best (minimum) of ``--speed-reps`` forwards per k, alternating configs
  round by round; wall and process CPU time.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from importlib.resources import files
from pathlib import Path

import torch

from attnlab.hf import load
from attnlab.interventions.layer_drop import choose_layers, drop_attention_layers, redundancy_order


def perplexity(model, windows: list[torch.Tensor]) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in windows:
            ids = ids.to(model.device)
            logits = model(input_ids=ids, use_cache=False).logits
            nll = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum")
            total, count = total + float(nll), count + ids.shape[1] - 1
    return math.exp(total / count)


def sst2_accuracy(model, tokenizer, prompts, batch_size: int = 1) -> dict:
    from attnlab.eval import Scores, score_prompts

    ll, cf = score_prompts(model, tokenizer, prompts, batch_size=batch_size)
    s = Scores.of(ll, cf, prompts.labels)
    return dict(uncalibrated=s.uncalibrated, uncalibrated_ci=list(s.uncalibrated_ci),
                calibrated=s.calibrated, calibrated_ci=list(s.calibrated_ci))


def forward_seconds(model, ids) -> tuple[float, float]:
    cuda = ids.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ks", type=int, nargs="*", default=[0, 1, 2, 4, 6, 8, 12])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--sst2", type=int, default=60, help="SST-2 test rows (0: skip)")
    parser.add_argument("--sst2-ks", type=int, nargs="*", default=[0, 4, 8])
    parser.add_argument("--speed-ks", type=int, nargs="*", default=[0, 4, 8, 12])
    parser.add_argument("--speed-reps", type=int, default=3)
    parser.add_argument("--speed-batch", type=int, default=1, help="sequences of 1,024 tokens per timed forward")
    parser.add_argument("--windows", type=int, default=4, help="held-out windows of 256 tokens")
    parser.add_argument("--order", type=int, nargs="*", default=None,
                        help="reuse a similarity order printed by an earlier run (skips measuring it)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=1, help="SST-2 prompts per forward (batched scoring)")
    parser.add_argument("--out", default=None, help="json path (default benchmarks/results/layer_drop.json)")
    args = parser.parse_args()
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / "layer_drop.json"
    model, tokenizer = load(device=args.device)
    ids = tokenizer(files("attnlab.data").joinpath("kjv_genesis.txt").read_text())["input_ids"]
    calibration = [ids[i:i + 128] for i in range(0, 8 * 128, 128)]
    held_out = [torch.tensor([ids[start:start + 256]])
                for start in range(len(ids) // 2, len(ids) // 2 + args.windows * 256, 256)]
    assert len(ids) // 2 > 8 * 128, "held-out windows must not overlap the calibration tokens"

    t0 = time.time()
    order = list(args.order) if args.order else redundancy_order(model, calibration)
    print(f"similarity drop order ({'given' if args.order else f'measured in {time.time() - t0:.0f} s'}): {order}", flush=True)
    result = dict(meta=dict(model="SmolLM2-135M-Instruct (dequantized Q4_1), float32", torch=torch.__version__,
                            threads=torch.get_num_threads(), cpu=platform.processor() or platform.machine(),
                            device=torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                            calibration="KJV Genesis tokens 0-1023 (8 x 128)",
                            held_out=f"KJV Genesis tokens {len(ids) // 2}-{len(ids) // 2 + args.windows * 256 - 1} "
                                     f"({args.windows} x 256)", order_given=bool(args.order)),
                  similarity_order=order, perplexity=[], sst2=[], speed=[])

    def layers_for(k, how, seed=0):
        return order[:k] if how == "similarity" else choose_layers(model, None, k, order="random", seed=seed)

    configs = [("similarity", 0)] + [("random", s) for s in args.seeds]
    for k in args.ks:
        for how, seed in configs:
            if k == 0 and how == "random":
                continue
            layers = layers_for(k, how, seed)
            with drop_attention_layers(model, layers):
                ppl = perplexity(model, held_out)
            result["perplexity"].append(dict(k=k, order=how, seed=seed, layers=layers, perplexity=ppl))
            print(f"ppl k={k} {how} seed={seed}: {ppl:.3f}  layers={layers}", flush=True)
        out.write_text(json.dumps(result, indent=1))

    if args.sst2:
        from attnlab.eval import classification_prompts

        prompts = classification_prompts("sst2", tokenizer, "test", shots=4, seed=0, n_samples=args.sst2)
        for k in args.sst2_ks:
            for how, seed in configs[:2]:
                if k == 0 and how == "random":
                    continue
                layers = layers_for(k, how, seed)
                with drop_attention_layers(model, layers):
                    acc = sst2_accuracy(model, tokenizer, prompts, args.batch_size)
                result["sst2"].append(dict(k=k, order=how, seed=seed, layers=layers, n=len(prompts.rows), **acc))
                print(f"sst2 k={k} {how}: {acc}", flush=True)
            out.write_text(json.dumps(result, indent=1))

    if args.speed_ks:
        measure_speed(model, order, args, result)
    out.write_text(json.dumps(result, indent=1))
    if args.out:
        out.with_suffix(".md").write_text(markdown(result) + "\n")
    print(markdown(result))


def measure_speed(model, order: list[int], args, result: dict) -> None:
    """Prefill time at 1,024 tokens for each k in ``args.speed_ks`` (similarity order), configs alternated round by round."""
    x = torch.randint(100, model.config.vocab_size, (args.speed_batch, 1024), generator=torch.Generator().manual_seed(0))
    x = x.to(model.device)
    for _ in range(3 if args.device.startswith("cuda") else 1):
        forward_seconds(model, x)  # warm-up
    times: dict[int, list] = {k: [] for k in args.speed_ks}
    for _ in range(args.speed_reps):
        for k in args.speed_ks:
            with drop_attention_layers(model, order[:k]):
                times[k].append(forward_seconds(model, x))
    base_wall, base_cpu = min(t[0] for t in times[0]), min(t[1] for t in times[0])
    for k in args.speed_ks:
        wall, cpu = min(t[0] for t in times[k]), min(t[1] for t in times[k])
        result["speed"].append(dict(k=k, tokens=1024, batch=args.speed_batch, best_wall_s=wall, best_cpu_s=cpu, speedup_wall=base_wall / wall,
                                    speedup_cpu=base_cpu / cpu, all=times[k]))
        print(f"speed k={k}: wall {wall:.3f} s ({base_wall / wall:.2f}x), cpu {cpu:.3f} s ({base_cpu / cpu:.2f}x)", flush=True)


def markdown(result: dict) -> str:
    lines = ["| k dropped | similarity order: ppl | random order: ppl (mean over seeds; each) |", "|---|---|---|"]
    ks = sorted({r["k"] for r in result["perplexity"]})
    for k in ks:
        sim = [r["perplexity"] for r in result["perplexity"] if r["k"] == k and r["order"] == "similarity"]
        rnd = [r["perplexity"] for r in result["perplexity"] if r["k"] == k and r["order"] == "random"]
        rnd_txt = f"{sum(rnd) / len(rnd):.2f} ({', '.join(f'{v:.2f}' for v in rnd)})" if rnd else "-"
        lines.append(f"| {k} | {sim[0]:.2f} | {rnd_txt} |")
    if result["sst2"]:
        lines += ["", "| k dropped | order | SST-2 4-shot uncalibrated [95% CI] | calibrated [95% CI] |", "|---|---|---|---|"]
        for r in result["sst2"]:
            (a, b), (c, d) = r["uncalibrated_ci"], r["calibrated_ci"]
            lines.append(f"| {r['k']} | {r['order']} | {r['uncalibrated']:.3f} [{a:.3f}, {b:.3f}] | "
                         f"{r['calibrated']:.3f} [{c:.3f}, {d:.3f}] |")
    batch = result["speed"][0].get("batch", 1) if result["speed"] else 1
    lines += ["", f"| k dropped (similarity order) | prefill {batch} x 1,024 tokens, best wall (s) | speed-up | best CPU (s) | speed-up |",
              "|---|---|---|---|---|"]
    for r in result["speed"]:
        lines.append(f"| {r['k']} | {r['best_wall_s']:.3f} | {r['speedup_wall']:.2f}x | {r['best_cpu_s']:.3f} | {r['speedup_cpu']:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
