"""Why does ``razor`` miss its target, and which of RazorAttention's own settings fix it? (tuning seed only)

Runs razor variants beside full / snapkv / streaming on the same samples (one recorded prefill per
sample serves every variant, so each variant costs only its decoding) and writes, per variant, the
heads it protects, its recent window, and every prediction. The variants change only what
"RazorAttention: Efficient KV Cache Compression Through Retrieval Heads" (paper 53) leaves open:
whether the 14% induction / 1% echo fractions count query heads (the paper's "heads") or KV heads,
the sink count, the compensation token, and how many protected heads the budget may hold; and, beyond
the paper, ``snap_share`` (compressed heads also keep SnapKV-chosen middle entries at the same bytes),
``snap_pool`` (how those votes are pooled) and the protected heads chosen by a probe of each KV head's
marginal value (``--probe-seed``: :func:`attnlab.kv.razor.probe_head_values`, variants probe20_snap50 and
swap5_snap50; since session 6 the library default, ``heads="probe"``, variant probe_snap50).

Never run this on the seed that is reported (0): ``--seed`` must not be 0.

    python3 benchmarks/kv_razor_tune.py --task needle multikey --length 4096 --samples 8 --seed 1 --out /tmp/razor_tune.json
    python3 benchmarks/kv_razor_tune.py --probe-seed 7 --probe-samples 2 0 --out benchmarks/results/razor_probe_heads.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from dataclasses import dataclass

import torch

from attnlab import kv
from attnlab.kv.evaluate import evaluate_policies
from attnlab.kv.base import Keep, PrefillView
from attnlab.kv.razor import Razor


PROBE_JSON = Path(__file__).resolve().parent / "results" / "razor_probe_heads.json"


def P(**kw) -> dict:
    """Razor keyword arguments of a variant of the paper's method (no snap entries, heads by echo / induction scores)."""
    return dict(kw, snap_share=0.0, heads="scores")


VARIANTS: dict[str, dict] = {
    # name: Razor keyword arguments; the paper's settings first (ties go to the earlier entry).
    # P(...): the paper's method (snap_share=0), whatever Razor's default share is.
    # ``unit``: the head count the 14% / 1% refer to: "query" heads (the paper's "heads") or KV heads.
    "q14_1": P(unit="query"),
    "kv14_1": P(unit="kv"),
    "q14_1_nocomp": P(unit="query", compensation=False),
    "q14_1_sink16": P(unit="query", n_sink=16),
    "q14_1_win512": P(unit="query", min_window=512),
    "q8_3": P(unit="query", induction_frac=0.08, echo_frac=0.03),
    "q20_3": P(unit="query", induction_frac=0.20, echo_frac=0.03),
    # session 4: around the new default (q8_3)
    "q6_3": P(unit="query", induction_frac=0.06, echo_frac=0.03),
    "q10_3": P(unit="query", induction_frac=0.10, echo_frac=0.03),
    "q8_5": P(unit="query", induction_frac=0.08, echo_frac=0.05),
    "q8_3_sink16": P(unit="query", induction_frac=0.08, echo_frac=0.03, n_sink=16),
    # every razor miss on seed 0 (session 4, H200) drops the answer's last digit: is the compensation token to blame?
    "q8_3_nocomp": P(unit="query", induction_frac=0.08, echo_frac=0.03, compensation=False),
    "q14_3": P(unit="query", induction_frac=0.14, echo_frac=0.03),
    # session 5 (beyond the paper): compressed heads give a share of their recent window to middle
    # entries chosen SnapKV-style (observation-window votes), at the same bytes
    "q8_3_snap25": dict(unit="query", induction_frac=0.08, echo_frac=0.03, snap_share=0.25),
    "q8_3_snap50": dict(unit="query", induction_frac=0.08, echo_frac=0.03, snap_share=0.5),
    "q8_3_snap75": dict(unit="query", induction_frac=0.08, echo_frac=0.03, snap_share=0.75),
    # with snap entries the compressed heads hold the needle: do they need fewer / more protected heads?
    "q6_3_snap50": dict(unit="query", induction_frac=0.06, echo_frac=0.03, snap_share=0.5),
    "q10_3_snap50": dict(unit="query", induction_frac=0.10, echo_frac=0.03, snap_share=0.5),
    # votes pooled over 15 positions: whole needle spans (7 digits and their neighbours) rather than peaks
    "q8_3_snap50_k15": dict(unit="query", induction_frac=0.08, echo_frac=0.03, snap_share=0.5, snap_kernel=15),
    # the layer's votes together (protected heads included) choose every compressed head's entries
    "q8_3_snap50_layer": dict(unit="query", induction_frac=0.08, echo_frac=0.03, snap_share=0.5, snap_votes="layer"),
    # session 6, around the default (q10_3_snap50), aimed at multikey's misses (a dropped last digit, or a
    # distractor's number): snap votes max-pooled into spans (centred, or a key's votes lifting the value after it)
    "q10_3_snap50_max9": dict(unit="query", induction_frac=0.10, echo_frac=0.03, snap_share=0.5, snap_pool="max",
                              snap_kernel=9),
    "q10_3_snap50_right13": dict(unit="query", induction_frac=0.10, echo_frac=0.03, snap_share=0.5,
                                 snap_pool="right", snap_kernel=13),
    "q10_3_snap50_nocomp": dict(unit="query", induction_frac=0.10, echo_frac=0.03, snap_share=0.5, compensation=False),
    "q10_3_snap50_k15": dict(unit="query", induction_frac=0.10, echo_frac=0.03, snap_share=0.5, snap_kernel=15),
    # the 20 KV heads (the default's count) a probe ranks most valuable at the default's operating point,
    # on multikey + needle samples of probe seed 7 (``--probe-seed``; neither tuned nor reported)
    "probe20_snap50": dict(protected_from=(str(PROBE_JSON), 20), snap_share=0.5),
    # single-head values miss redundancy (one of several late retrieval heads is worth ~0 alone): a safer
    # mix keeps the default's heads but its 5 least valuable, swapped for the 5 most valuable others
    "swap5_snap50": dict(swap_from=(str(PROBE_JSON), 5), snap_share=0.5),
    # the library's heads="probe" (its stored PROBE_ORDERS ranking, else a probe run once per model)
    "probe_snap50": dict(unit="query", induction_frac=0.10, echo_frac=0.03, snap_share=0.5, heads="probe"),
}


# Variants before session 6 protect heads by RazorAttention's scores: say so explicitly, since Razor's default
# became heads="probe" (session 6's round 2 ran "q8_3" with probe heads before this line existed).
for _kw in VARIANTS.values():
    if not {"heads", "protected_from", "swap_from"} & set(_kw):
        _kw["heads"] = "scores"


def razor_kwargs(name: str) -> dict:
    """VARIANTS[name] with ``protected_from=(json path, count)`` turned into ``protected`` (the first count
    KV heads of that file's ``order``, the heads a head probe ranks most valuable first); the environment
    variable RAZOR_PROBE_JSON, when set, names the file instead."""
    kw = dict(VARIANTS[name])
    if "protected_from" in kw:
        path, count = kw.pop("protected_from")
        path = os.environ.get("RAZOR_PROBE_JSON") or path  # h200_kv.sh: the probe it has just run
        order = json.loads(Path(path).read_text())["order"][:count]
        kw["protected"] = torch.tensor(order, dtype=torch.long)
    if "swap_from" in kw:  # the default's heads, its k least valuable (by the probe) swapped for the k most valuable others
        path, k = kw.pop("swap_from")
        probe = json.loads(Path(os.environ.get("RAZOR_PROBE_JSON") or path).read_text())
        value = torch.tensor(probe["values"], dtype=torch.float64)
        base = [tuple(c) for c in probe["base_protected"][:probe.get("base_count", 20)]]
        others = [tuple(c) for c in probe["order"] if tuple(c) not in base][:k]
        keep = sorted(base, key=lambda c: -float(value[c]))[:len(base) - k]
        kw["protected"] = torch.tensor(keep + others, dtype=torch.long)
    return kw


def variant(model, budget: float, **kw) -> Razor:
    return Razor(budget=budget, **kw)


def probe_heads(model, tok, args, checkpoint=None) -> dict:
    """:func:`attnlab.kv.razor.probe_head_values` on ``--probe-seed`` (``--probe-samples`` multikey, needle),
    with every sample's values and the ranking (``order``, most valuable first); ``checkpoint(result)`` after
    each sample, so a run cut short keeps the samples done."""
    from attnlab.kv.razor import probe_head_values

    cfg = model.config.get_text_config(decoder=True)
    H = cfg.num_key_value_heads
    base = Razor(budget=args.budget, heads="scores")
    base.prepare(model)
    base.plan(args.length, cfg.num_hidden_layers, H)
    values = torch.zeros(cfg.num_hidden_layers, H, dtype=torch.float64)
    per_sample = []
    t0 = time.time()

    def on_sample(task, s, target, ref, v):
        nonlocal values
        values += v
        per_sample.append(dict(task=task, index=s.metadata["index"], target=tok.decode(target),
                               answer=s.answers[0], base_nll=ref, values=v.tolist()))
        print(f"probe {task} {s.metadata['index']}: target {tok.decode(target)!r} base nll {ref:.3f} "
              f"({time.time() - t0:.0f} s)", flush=True)
        if checkpoint is not None:
            checkpoint(_probe_result(values, per_sample, base, H))

    probe_head_values(model, tok, budget=args.budget, length=args.length, seed=args.probe_seed,
                      samples=tuple(args.probe_samples), max_new_tokens=args.max_new_tokens, on_sample=on_sample)
    return _probe_result(values, per_sample, base, H)


def _probe_result(values: torch.Tensor, per_sample: list, base: Razor, H: int) -> dict:
    mean = values / max(1, len(per_sample))
    flat = mean.flatten().argsort(descending=True, stable=True)
    order = [[int(i) // H, int(i) % H] for i in flat]
    return dict(values=mean.tolist(), order=order, base_protected=base.protected.tolist(),
                base_count=int(base_mask_count(base, H)), n_samples=len(per_sample), samples=per_sample)


def base_mask_count(base: Razor, H: int) -> int:
    """How many of ``base``'s protected heads its plan keeps at the probe's length (the default: 20 at 4K)."""
    return int(base._plans[next(iter(base._plans))][0].sum()) if base._plans else len(base.protected)


@dataclass
class NeedleOracle(Razor):
    """DIAGNOSTIC ONLY (knows the answer): razor whose compressed heads in ``layers`` also keep the
    prompt positions ``span`` (the needle's digits), a few entries over the budget (the compensation
    token still averages them in: it is computed before they are added)."""

    span: tuple = (0, 0)
    layers: tuple = (0, 10**6)

    def select(self, view):
        keeps = Razor.select(self, view)
        if not self.layers[0] <= view.layer < self.layers[1]:
            return keeps
        out = []
        for k in keeps:
            if k.index.shape[1] >= view.length:  # protected: keeps everything already
                out.append(k)
                continue
            extra = torch.arange(*self.span, device=k.index.device).expand(k.index.shape[0], -1)
            if torch.isin(extra, k.index).any():
                raise ValueError("NeedleOracle: the needle is already kept (in a sink or the recent window)")
            index = torch.cat([k.index, extra], 1).sort(1).values
            out.append(Keep(k.heads, index, k.extra_keys, k.extra_values, k.extra_log_weight))
        return out


@dataclass
class CrossLayerVotes(Razor):
    """DIAGNOSTIC (no answer knowledge, but sees every layer's votes, which ``Policy.select`` cannot):
    razor with snap entries chosen in every layer by ``votes`` (T,), the observation-window votes of
    the later layers summed (each layer's normalised to sum 1)."""

    votes: torch.Tensor | None = None

    def select(self, view):
        shared = self.votes.to(view.keys.device).expand(view.n_kv_heads, -1)
        return Razor.select(self, PrefillView(view.layer, view.n_layers, view.keys, view.values, shared))


def later_layer_votes(rec, first: int) -> torch.Tensor:
    """(T,) sum over layers >= ``first`` of each layer's window votes (summed over KV heads), normalised."""
    total = None
    for layer in rec.layers[first:]:
        v = layer.scores["window"][0].float().sum(0)  # (T,)
        v = v / v.sum().clamp_min(1e-12)
        total = v if total is None else total + v
    return total


def diagnose(model, tok, args) -> dict:
    """Per needle sample of the tuning seed: what razor's compressed heads need to copy the last digit.

    Decodes each sample under razor (default settings), razor at larger budgets, snap_share variants
    (with how many compressed rows hold the needle's digits), and NeedleOracle over layer ranges.
    """
    from attnlab.eval import get_task
    from attnlab.kv.evaluate import _eos_ids, decode, record_prefill
    from attnlab.kv.session import apply

    samples = get_task("needle").make(tok, length=args.length, n_samples=max(args.diagnose) + 1, seed=args.seed)
    eos = _eos_ids(model, tok)
    cfg = model.config.get_text_config(decoder=True)
    out = {}
    for i in args.diagnose:
        s = samples[i]
        ids = torch.tensor([s.input_ids], device=model.device)
        toks, ans = list(s.input_ids), list(tok(s.answers[0], add_special_tokens=False).input_ids)
        a = next(p for p in range(len(toks)) if toks[p:p + len(ans)] == ans)
        span = (a, a + len(ans))
        paper = VARIANTS["q8_3"]
        pols = {"razor[q8_3]": Razor(budget=args.budget, **paper)}
        pols.update({f"razor[q8_3]@{b}": Razor(budget=b, **paper) for b in (0.5, 0.8)})
        pols.update({f"razor:{n}": Razor(budget=args.budget, **VARIANTS[n])
                     for n in ("q8_3_snap50", "q8_3_snap75", "q8_3_snap50_layer")})
        n_layers = cfg.num_hidden_layers
        ranges = [(0, n_layers), (0, n_layers // 3), (n_layers // 3, 2 * n_layers // 3), (2 * n_layers // 3, n_layers),
                  (0, n_layers // 2), (n_layers // 2, n_layers)]
        pols.update({f"oracle[{lo}:{hi}]": NeedleOracle(budget=args.budget, span=span, layers=(lo, hi), **paper)
                     for lo, hi in ranges})
        row = dict(answer=s.answers[0], needle_at=a, predictions={}, rows_with_needle={})
        with apply(model, None) as session:
            rec, logits, _ = record_prefill(model, ids, frozenset({"window"}), session)
            first = logits.argmax(-1)
            for lo in (n_layers // 2, 2 * n_layers // 3):
                for share in (0.25, 0.5):
                    pols[f"xlayer[{lo}:]@{share}"] = CrossLayerVotes(
                        budget=args.budget, snap_share=share, votes=later_layer_votes(rec, lo),
                        **{k: v for k, v in paper.items() if k != "snap_share"})
            for name, pol in pols.items():
                if args.diagnose_only and not any(name.startswith(x) for x in args.diagnose_only):
                    continue
                pol.prepare(model)
                cache = rec.compressed(pol, reserve=args.max_new_tokens + 1)
                rows, _, _ = decode(model, ids, first, cache, args.max_new_tokens, eos, eos[0])
                row["predictions"][name] = tok.decode(rows[0], skip_special_tokens=True)
                if "snap" in name or "xlayer" in name:  # per layer: compressed rows that hold every digit of the needle
                    per = []
                    for layer in cache.layers:
                        held = [set(range(*span)) <= set(g.pos[r, :g.n].tolist())
                                for g in layer.groups if g.n < len(toks) for r in range(g.size)]
                        per.append(f"{sum(held)}/{len(held)}")
                    row["rows_with_needle"][name] = per
                print(f"sample {i} {name:24s} {row['predictions'][name]!r}", flush=True)
        out[str(i)] = row
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", nargs="+", default=["needle", "multikey"])
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--budget", type=float, default=0.3)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--device", default="cpu")
    p.add_argument("--diagnose", type=int, nargs="+", default=None,
                   help="needle sample indices: run the per-sample diagnosis (NeedleOracle etc.) instead")
    p.add_argument("--diagnose-only", nargs="+", default=None, help="name prefixes of the diagnosis' policies to run")
    p.add_argument("--probe-seed", type=int, default=None,
                   help="rank KV heads by their marginal value at razor's operating point on this seed's "
                        "multikey + needle samples (--probe-samples) and write that (not a tuning run)")
    p.add_argument("--probe-samples", type=int, nargs=2, default=[5, 3], help="multikey, needle samples of the probe")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.seed == 0 or args.probe_seed in (0, 1, 2):
        raise SystemExit("error: seed 0 is the reported seed and 1, 2 the tuning seeds; probe on another one")
    if args.seed == 0:
        raise SystemExit("error: seed 0 is the reported seed; tune on another one")
    from attnlab.hf import load

    model, tok = load()
    model.to(args.device)
    if args.probe_seed is not None:
        def write(result: dict) -> None:
            report = dict(command="python3 " + " ".join(sys.argv), args=vars(args), **result)
            Path(args.out).write_text(json.dumps(report, indent=1, default=str))

        write(probe_heads(model, tok, args, checkpoint=write))
        return 0
    if args.diagnose:
        report = dict(command="python3 " + " ".join(sys.argv), args=vars(args), samples=diagnose(model, tok, args))
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
        return 0
    policies = [kv.make_policy("full"), kv.make_policy("snapkv", budget=args.budget),
                kv.make_policy("streaming", budget=args.budget)]
    names = ["full", "snapkv", "streaming"]
    for name in args.variants:
        policies.append(variant(model, args.budget, **razor_kwargs(name)))
        names.append("razor:" + name)
    report = dict(command="python3 " + " ".join(sys.argv), args=vars(args), results={})
    t0 = time.time()
    for task in args.task:
        res = evaluate_policies(model, tok, policies, task, args.length, args.samples, args.seed,
                                max_new_tokens=args.max_new_tokens, batch_size=args.batch)
        for name, pol, r in zip(names, policies, res):
            d = r.to_dict()
            if isinstance(pol, Razor):
                mask, window = pol.plan(args.length, 30, 3)
                d["protected"] = mask.nonzero().tolist()
                d["window"] = window
                d["snap"] = pol.split_window(window)[0]
            report["results"].setdefault(name, {})[task] = d
            print(f"{name:22s} {task:9s} acc={r.accuracy:.3f} kept={r.kept_fraction:.3f} "
                  f"decode={r.decode_tokens_per_s:.1f} tok/s", flush=True)
        report["seconds"] = time.time() - t0
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
