"""Issue 4's KV accuracy runs in one process (one model load): tune razor on seed 1, report on seed 0.

1. Tuning (``--tune-seed``, 1 by default; never reported as the result): razor variants
   (``kv_razor_tune.VARIANTS``: what RazorAttention (paper 53) leaves open, and session 5's snap_share,
   beyond the paper), beside full / snapkv / streaming, on needle and multikey at ``--length`` tokens,
   budget 0.3. A second tuning seed (2) can break a tie among variants tied on seed 1
   (``--choose-among`` those; the others run beside them for comparison).
2. The variant with the best mean accuracy over both tasks is chosen (ties: the earlier variant in
   VARIANTS, the paper's own settings first).
3. Report (seed 0): full, streaming, snapkv, h2o, razor (the library default), ``razor[q8_3]`` (the
   paper's method with our head shares, session 4's default), ``razor[kv]`` (session 3's), razor with
   the chosen settings when it differs, moa, task_kv, at budget 0.3, on needle and multikey,
   ``--samples`` each. ``--report lean``: tune without snapkv / streaming, report only full, razor and
   the chosen razor.
4. If time is left (``--deadline``): budgets 0.2 and 0.5 for streaming, snapkv and the chosen razor.

The JSON (``--out``) is rewritten after every step, so a run cut short keeps what finished.

    python3 benchmarks/kv_h200.py --device cuda --samples 50 --tune-samples 30 --batch 10 --out /tmp/kv.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kv_razor_tune import VARIANTS, razor_kwargs  # noqa: E402

DEFAULT_VARIANT = "probe_snap50"  # the variant equal to kv.Razor's defaults (session 6 round 1; session 5: q10_3_snap50; session 4: q8_3)
PAPER_VARIANT = "q8_3"  # the paper's method with our head shares (session 4's default)

from attnlab import kv  # noqa: E402
from attnlab.kv.evaluate import evaluate_policies  # noqa: E402

TASKS = ("multikey", "needle")  # multikey first: the target it misses; a run cut short keeps it


def run(model, tok, labelled: list[tuple[str, kv.Policy]], seed: int, args, partial=None,
        sizes: dict | None = None) -> dict:
    """{label: {task: PolicyResult dict}} for every (label, policy) on both tasks; ``partial(out)`` after each task.

    ``sizes``: {task: samples} (default ``--samples`` for every task); a task with 0 samples is skipped."""
    out: dict = {}
    for task in TASKS:
        n = (sizes or {}).get(task, args.samples)
        if n <= 0:
            continue
        res = evaluate_policies(model, tok, [p for _, p in labelled], task, args.length, n,
                                seed, max_new_tokens=args.max_new_tokens, batch_size=args.batch, progress=False)
        for (label, pol), r in zip(labelled, res):
            d = r.to_dict()
            if isinstance(pol, kv.Razor):
                mask, window = pol.plan(args.length, *mask_shape(model))
                d.update(protected=mask.nonzero().tolist(), window=window, snap=pol.split_window(window)[0])
            out.setdefault(label, {})[task] = d
            print(f"seed {seed} {label:18s} {task:9s} acc={r.accuracy:.3f} kept={r.kept_fraction:.3f} "
                  f"decode={r.decode_tokens_per_s:.1f} tok/s", flush=True)
        if partial is not None:
            partial(out)
    return out


def tune_sizes(args) -> dict:
    """{task: samples per tuning seed}: ``--tune-samples`` is one count for both tasks or needle, multikey."""
    n = args.tune_samples
    return dict(zip(("needle", "multikey"), n if len(n) == 2 else n * 2))


def mask_shape(model) -> tuple[int, int]:
    c = model.config.get_text_config(decoder=True)
    return c.num_hidden_layers, c.num_key_value_heads


RETRIEVAL_VARIANT = "q8_3_ret"  # q8_3's heads plus the retrieval heads (paper 8) of --retrieval-json, those first


def razor_variant(model, name: str, budget: float, retrieval_json: str | None) -> kv.Razor:
    """The razor policy of variant ``name``; RETRIEVAL_VARIANT also protects the KV heads of the
    retrieval heads (score > 0.1) listed in ``retrieval_json`` (``benchmarks/retrieval_heads.py``)."""
    if name != RETRIEVAL_VARIANT:
        return kv.Razor(budget=budget, **razor_kwargs(name))
    from attnlab.kv.razor import model_head_scores, protection_order

    cfg = model.config.get_text_config(decoder=True)
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    found = [(layer, head // group) for layer, head in json.loads(Path(retrieval_json).read_text())["retrieval_heads"]]
    shares = VARIANTS[PAPER_VARIANT]
    razor = protection_order(model_head_scores(model), induction_frac=shares["induction_frac"],
                             echo_frac=shares["echo_frac"], unit=shares["unit"])
    order = list(dict.fromkeys(found + [tuple(c) for c in razor.tolist()]))  # first come, first kept by plan()
    return kv.Razor(budget=budget, protected=torch.tensor(order), snap_share=0.0)


def choose(tuned: dict, among: list[str] | None = None) -> str:
    """The razor variant (of ``among``, default all) with the best mean accuracy over the tasks (ties: the earlier one).

    ``tuned``: {label: {task: result}} of one seed, or {seed: that} of several: then a task's accuracy is
    pooled over the seeds (correct answers / samples)."""
    per_seed = tuned if all(str(k).isdigit() for k in tuned) else {"0": tuned}
    names = [n for n in [*VARIANTS, RETRIEVAL_VARIANT]
             if all(f"razor:{n}" in t for t in per_seed.values()) and (not among or n in among)]

    def pooled(n: str, task: str) -> float:
        rs = [t[f"razor:{n}"][task] for t in per_seed.values() if task in t[f"razor:{n}"]]
        total = sum(r["n_samples"] for r in rs)
        return sum(r["accuracy"] * r["n_samples"] for r in rs) / total if total else 0.0

    tasks = sorted({task for t in per_seed.values() for per in t.values() for task in per})
    mean = {n: sum(pooled(n, task) for task in tasks) / len(tasks) for n in names}
    return max(names, key=lambda n: (round(mean[n], 12), -names.index(n)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--samples", type=int, default=50, help="per task, reported seed")
    p.add_argument("--tune-samples", type=int, nargs="+", default=[30],
                   help="per tuning seed: one count for both tasks, or two (needle, multikey)")
    p.add_argument("--seed", type=int, default=0, help="the reported seed")
    p.add_argument("--tune-seed", type=int, nargs="+", default=[1],
                   help="tuning seeds (never the reported one); with several, accuracies are pooled over them")
    p.add_argument("--budget", type=float, default=0.3)
    p.add_argument("--extra-budgets", type=float, nargs="*", default=[0.2, 0.5])
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--deadline", type=float, default=170, help="seconds; no new step starts after it")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--retrieval-json", default=None,
                   help="retrieval heads scored on another seed (benchmarks/retrieval_heads.py): adds variant q8_3_ret")
    p.add_argument("--choose-among", nargs="+", default=None, choices=list(VARIANTS),
                   help="variants the choice may take (default: all run); the others are run for comparison only")
    p.add_argument("--report", choices=["all", "lean", "final", "none"], default="all",
                   help="lean: tune without snapkv/streaming and report only full, razor and the chosen razor; "
                        "final: tune without snapkv/streaming, report full, streaming, snapkv, razor, the paper's "
                        "method and the chosen razor; none: tune only")
    p.add_argument("--no-tune", action="store_true", help="skip tuning (the chosen variant is the default)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.seed in args.tune_seed:
        raise SystemExit("error: the tuning seeds must differ from the reported seed")
    if len(args.tune_samples) not in (1, len(TASKS)):
        raise SystemExit(f"error: --tune-samples takes 1 or {len(TASKS)} counts")
    t0 = time.time()
    from attnlab.eval import resolve_device
    from attnlab.hf import load

    model, tok = load()
    model.to(resolve_device(args.device))
    report = dict(command="python3 " + " ".join(sys.argv), args=vars(args), variants=VARIANTS, steps={})
    out = Path(args.out)

    def save(step: str, data) -> None:
        report["steps"][step] = data
        report["seconds"] = round(time.time() - t0, 1)
        out.write_text(json.dumps(report, indent=1, default=str))
        print(f"== step {step} done at {report['seconds']} s", flush=True)

    b = args.budget
    best = DEFAULT_VARIANT
    if not args.no_tune:
        tuning = [("full", kv.make_policy("full"))]
        if args.report == "all":
            tuning += [("snapkv", kv.make_policy("snapkv", budget=b)), ("streaming", kv.make_policy("streaming", budget=b))]
        names = args.variants + ([RETRIEVAL_VARIANT] if args.retrieval_json else [])
        for n in names:
            try:
                tuning.append((f"razor:{n}", razor_variant(model, n, b, args.retrieval_json)))
            except (OSError, ValueError, KeyError) as err:  # e.g. a probe file not there: run the others
                print(f"SKIPPED variant {n}: {err!r}", flush=True)
        tuned: dict = {}

        def save_tune(seed: int, res: dict) -> str:  # after every task: a run cut short keeps what finished
            tuned[str(seed)] = res
            chosen = choose(tuned, args.choose_among)
            save("tune", dict(seed=args.tune_seed[0] if len(args.tune_seed) == 1 else list(map(int, tuned)),
                              results=tuned[str(seed)] if len(args.tune_seed) == 1 else tuned,
                              chosen=chosen, candidates=args.choose_among,
                              chosen_kwargs=VARIANTS.get(chosen, "retrieval heads + q8_3")))
            return chosen

        for seed in args.tune_seed:
            best = save_tune(seed, run(model, tok, tuning, seed, args, sizes=tune_sizes(args),
                                       partial=lambda res, seed=seed: save_tune(seed, res)))
    if args.report == "none":
        return 0

    lean = args.report in ("lean", "final")
    reported = [("full", kv.make_policy("full"))]
    if not lean or args.report == "final":
        reported += [(n, kv.make_policy(n, budget=b)) for n in ("streaming", "snapkv")]
    if not lean:
        reported.append(("h2o", kv.make_policy("h2o", budget=b)))
    # "razor" is the library default (20 probe-ranked heads, snap_share 0.5: session 6 round 1, seeds 1 + 2);
    # razor[q8_3] the paper's method with those heads (session 4's default), razor[kv] session 3's;
    # the variant chosen on the tuning seed in this run is reported beside them when it differs.
    reported.append(("razor", kv.make_policy("razor", budget=b)))
    if not lean or args.report == "final":
        reported.append((f"razor[{PAPER_VARIANT}]", razor_variant(model, PAPER_VARIANT, b, None)))
    if not lean:
        reported.append(("razor[kv]", razor_variant(model, "kv14_1", b, None)))
    if best not in (DEFAULT_VARIANT, PAPER_VARIANT, "kv14_1"):  # kv14_1 is razor[kv]
        reported.append((f"razor[{best}]", razor_variant(model, best, b, args.retrieval_json)))
    if not lean:
        reported += [(n, kv.make_policy(n, budget=b)) for n in ("moa", "task_kv")]
    report_step = lambda res: save("report", dict(seed=args.seed, budget=b, results=res))  # noqa: E731
    run(model, tok, reported, args.seed, args, partial=report_step)

    extra = {}
    for eb in args.extra_budgets:
        if time.time() - t0 > args.deadline:
            print(f"deadline: budget {eb} not run", flush=True)
            break
        pols = [("streaming", kv.make_policy("streaming", budget=eb)), ("snapkv", kv.make_policy("snapkv", budget=eb)),
                (f"razor[{best}]", razor_variant(model, best, eb, args.retrieval_json))]
        extra[str(eb)] = run(model, tok, pols, args.seed, args)
        save("extra_budgets", extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
