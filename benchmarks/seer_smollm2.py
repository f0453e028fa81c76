"""SeerAttention gates on SmolLM2-135M and block-sparse prefill perplexity vs density (The Sparse Frontier's
question for this model: quality vs density per method, at several lengths).

Calibration: ``--calib-segments`` segments of N tokens from the start of the KJV (Genesis onward, Old
Testament only). Held-out: ``--held-segments`` segments of N tokens of the KJV New Testament (from 80% of
kjv_text()'s characters on; disjoint from calibration). For each length N the gates are trained at N, then
for each target density the k (blocks per query block) closest to it is run with SeerAttention top-k,
oracle top-k (the exact pooled map), a sliding window and sink + window blocks (all at the same density by
construction), and SeerAttention with gate thresholds (their own density). Rows go to ``--out`` as JSON
after every row; ``benchmarks/sparse_frontier.py`` turns it into the table, the fit and a figure.
``--gate-targets max mass`` trains two gate sets from one calibration pass: on the paper's max-pooled map
and on the tile mass map (ours); seer entries pick theirs with ``+tmax`` / ``+tmass`` (default: the first).

``--methods`` entries are a method of ``BlockSelect`` with optional ``+`` options: ``+sink`` (always keep
the first block), ``+local2`` (always keep the 2 most recent blocks; ``+localN`` any N), ``+mass`` (oracle:
rank tiles by probability mass instead of max), ``+true`` (oracle_topp / oracle_global: rank by true
attention shares, not renormalised over the free blocks). Forced blocks count in k, so densities stay equal.
Seer entries with forced blocks train the gates with those blocks left out of the KL (all seer entries must
then force the same blocks). The adaptive allocations (``seer_topp``, ``seer_global``, ``oracle_topp``,
``oracle_global``; attnlab.sparse.seer_adaptive) run in the top-k rows with the same k, which fixes their
block count, hence their density, to top-k's; ``seer_headk`` / ``oracle_headk`` rows get one k per (layer, KV
head) from ``allocate_head_k`` on the calibration segments' mass maps, spending at most top-k's block count
over the whole model (their density is measured, at most top-k's; ``seer_headk+gcurve``: the curves rank blocks
by the gates, so the budget goes where the gates' own top-k loses attention; ``+sens``: each layer's curve
weighted by its loss rise per dropped share with only that layer sparse); ``--p-methods`` rows run top-p with each
fixed ``--ps`` mass (their own density).

Output-aware options (session 7, ours; seer.PooledDeviation): ``+dev`` / ``+devo`` (oracle: rank tiles by mass
weighted by ||v - o||, through o_proj for devo), ``+adev`` / ``+adevo`` (*_headk: per-head k from the dev / devo
map's kept-share curves instead of the mass map's; ``+adevw`` / ``+adevow``: rows weighted by their absolute
deviation), and the variant key ``target=dev`` (gates distilled from the dev map). ``benchmarks/h200_seer7.sh``,
H200 (benchmarks/results/seer7_h200.md): at 8K, density 0.099 the dev oracle is +2.79% vs the mass oracle's +2.97%
(reversed on the OT segment) and dev-distilled gates +5.81% (max gates +5.85%): not within 5%.

``--gate-variants name:key=val,...`` (session 6, :func:`run_variants`): one calibration pass (max + mass maps,
up to ``--calib-segments``), then several gate recipes (data, steps, hidden, loss, rotary block terms, query
statistics; :func:`parse_variant`), each trained and evaluated at once; seer entries pick theirs with
``+v<name>``. Every recipe stops early on segment ``--val-index`` and the *_headk budgets come from the first
``--alloc-segments`` segments' mass maps, so recipes differ only in themselves. ``--val-ppl`` adds each row's
perplexity on that segment (the calibration side, where recipes are chosen). Session 6 on the H200
(benchmarks/results/seer6_h200.md, seer6_h200_r2.md): at density 0.099 every recipe lands at +5.4% to +6.1% on
the held-out NT, a seed changes a recipe by 0.2 points, and the recipe chosen on the calibration side (an
ensemble of two seeds of q3 + 69 segments) is +5.73%: not within 5%. Session 7 with ``--block 8`` (benchmarks/h200_seer8.sh,
results/seer8_h200.md): +3.39% at density 0.0989 (90.1% block sparsity), within 5%.

    python3 benchmarks/seer_smollm2.py --device cuda --lengths 2048 4096 8192 --out /tmp/seer_smollm2.json
    python3 benchmarks/seer_smollm2.py --device cpu --lengths 256 --calib-segments 2 --steps 5 --out /tmp/s.json
    python3 benchmarks/seer_smollm2.py --block 16 --methods seer_topk+sink+local2 oracle_topk+sink+local2 sink_window
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch

from attnlab.hf import load
from attnlab.hf.attach import attach
from attnlab.sparse.seer import (
    TARGETS, calibration_targets, ensemble_gates, gate_kl, make_gates, mean_kl, train_gates,
)
from attnlab.sparse.seer_adaptive import allocate_head_k, kept_mass_curve
from attnlab.sparse.seer_prefill import BlockSelect, forced_blocks, topk_density
from attnlab.eval import greedy_generate
from attnlab.tasks import make_needle, string_match_all, wilson_interval
from attnlab.tasks.haystack import kjv_text

NT_START = "The book of the generation of Jesus Christ"
T0 = time.time()  # --deadline-s counts from here


def nll_sum(model, ids: torch.Tensor, modifier=None) -> tuple[float, int]:
    """(summed next-token NLL, predicted tokens) of ``ids`` (1, N) under dense or modified attention."""
    with torch.no_grad():
        if modifier is None:
            logits = model(input_ids=ids).logits
        else:
            with attach(model, modifiers=[modifier]):
                logits = model(input_ids=ids).logits
    nll = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum")
    return nll.item(), ids.shape[1] - 1


def perplexity(model, held: list[torch.Tensor], make_modifier=None, tiles: list | None = None) -> tuple[float, float]:
    """(perplexity over all held-out segments, mean block density; 1.0 for dense). ``tiles``: a list that gets
    each segment's 64 x 64 kernel-tile density (BlockSelect.mean_tile_density), when given."""
    tot, cnt, dens = 0.0, 0, []
    for ids in held:
        mod = make_modifier() if make_modifier else None
        s, c = nll_sum(model, ids, mod)
        tot, cnt = tot + s, cnt + c
        dens.append(mod.mean_density() if mod else 1.0)
        if tiles is not None:
            tiles.append(mod.mean_tile_density() if mod else 1.0)
    return math.exp(tot / cnt), sum(dens) / len(dens)


def k_for_density(n_blocks: int, density: float) -> int:
    """The k (blocks per query block) whose causal top-k density is closest to ``density``."""
    return min(range(1, n_blocks + 1), key=lambda k: abs(topk_density(n_blocks, k) - density))


def parse_method(spec: str) -> tuple[str, dict]:
    """"oracle_topk+mass+sink+local2" -> ("oracle_topk", BlockSelect keyword arguments)."""
    base, *opts = spec.split("+")
    kw: dict = {}
    for o in opts:
        if o == "sink":
            kw["keep_sink"] = True
        elif o in ("mass", "dev", "devo"):
            kw["oracle_reduce"] = o
        elif o[0] == "a" and o[1:] in ALLOCS:
            if not base.endswith("_headk"):
                raise ValueError(f"option {o} (the per-head k allocation's map) is for *_headk only, got {spec=}")
            kw["alloc"] = o[1:]
        elif o == "true":
            kw["renorm"] = False
        elif o in ("gcurve", "sens"):
            if base != "seer_headk":
                raise ValueError(f"option {o} is for seer_headk only, got {spec=}")
            kw["gate_curves" if o == "gcurve" else "layer_sens"] = True
        elif o.startswith("local") and o[5:].isdigit():
            kw["keep_local"] = int(o[5:])
        elif o[0] == "t" and o[1:] in TARGETS:
            kw["gate_target"] = o[1:]
        elif o[0] == "v" and len(o) > 1:
            if not base.startswith("seer"):
                raise ValueError(f"option {o} (a gate variant) is for seer methods only, got {spec=}")
            kw["gate_variant"] = o[1:]
        else:
            raise ValueError(f"unknown option {o!r} in method {spec=} "
                             "(sink, mass, dev, devo, true, gcurve, sens, localN, t<target>, a<map>, v<variant>)")
    if base not in BlockSelect.METHODS:
        raise ValueError(f"method {base!r} in {spec=} is not one of {BlockSelect.METHODS}")
    return base, kw


# per-head k from the kept-share curves of: the mass map, the dev / devo map, or ("w") the dev / devo map with each
# row weighted by its absolute deviation (heads compared in output units, not in shares of their own rows)
ALLOCS = ("mass", "dev", "devo", "devw", "devow")


def gate_forcing(specs: list[str]) -> tuple[bool, int]:
    """(keep_sink, keep_local) shared by every seer entry of ``specs``; the gates are trained for it."""
    forcing = {(kw.get("keep_sink", False), kw.get("keep_local", 1))
               for base, kw in map(parse_method, specs) if base.startswith("seer")}
    if len(forcing) > 1:
        raise ValueError(f"seer methods force different blocks {sorted(forcing)}: one gate training per run")
    return forcing.pop() if forcing else (False, 1)


class OneLayer(BlockSelect):
    """BlockSelect on one layer only (the others dense): a layer's own cost of sparsity."""

    def __init__(self, layer: int, *args, **kw):
        super().__init__(*args, **kw)
        self.only = layer

    def score_bias(self, ctx):
        return super().score_bias(ctx) if ctx.layer == self.only else None


def segments(ids: torch.Tensor, n: int, count: int) -> list[torch.Tensor]:
    segs = [ids[:, i * n:(i + 1) * n] for i in range(count)]
    return [s for s in segs if s.shape[1] == n]


def calib_and_held(tok, text: str, n: int, args, dev) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Calibration segments (Old Testament, from Genesis on; CPU) and held-out segments (from 80% of the text
    on: the New Testament; on ``dev``), each (1, n) token ids."""
    nt = text.find(NT_START)
    calib = segments(tok(text[:min(nt, args.calib_segments * n * 8)], return_tensors="pt").input_ids,
                     n, args.calib_segments)
    start = int(0.8 * len(text))
    held = [s.to(dev) for s in segments(tok(text[start:start + args.held_segments * n * 8],
                                            return_tensors="pt").input_ids, n, args.held_segments)]
    return calib, held


def run_length(model, tok, text: str, n: int, args, out: dict, save) -> None:
    """Train gates at length ``n`` and append every method's rows to ``out["runs"]``."""
    dev = model.device
    t0 = time.time()
    calib, held = calib_and_held(tok, text, n, args, dev)
    targets = tuple(args.gate_targets)
    # *_headk rows allocate their per-head k from the calibration segments' mass maps (one extra pooled map)
    headk = any(parse_method(m)[0].endswith("_headk") for m in args.methods)
    allocs = {parse_method(m)[1].get("alloc", "mass") for m in args.methods if parse_method(m)[0].endswith("_headk")}
    if any(a.endswith("w") for a in allocs):
        raise ValueError(f"row-weighted allocations {sorted(allocs)} need --gate-variants (run_variants)")
    cal_targets = targets + tuple(sorted(a for a in allocs if a not in targets))
    per_seg = [calibration_targets(model, s, block=args.block, targets=cal_targets) for s in calib]
    held_t = calibration_targets(model, held[0], block=args.block, targets=targets)
    keep_sink, keep_local = gate_forcing(args.methods + args.threshold_methods + args.p_methods)
    exclude = None
    if keep_sink or keep_local > 1:  # the gates learn only the blocks the selection does not force
        exclude = forced_blocks(n // args.block, keep_sink, keep_local, dev)
    gates, stats = {}, {}
    for t in targets:
        if gates and time.time() - T0 > args.train_deadline_s:
            print(f"N={n}: train deadline passed, no {t}-target gates (their rows are skipped)", flush=True)
            continue
        t1 = time.time()
        data = [seg[t] for seg in per_seg]
        # the last calibration segment(s) (Old Testament, never the held-out NT) pick the early-stopping point
        data, val = data[:len(data) - args.val_segments], data[len(data) - args.val_segments:]
        gates[t] = make_gates(model, hidden=args.hidden)
        kl0 = mean_kl(gates[t], data, exclude)
        losses = train_gates(gates[t], data, steps=args.steps, lr=args.lr, val=val or None, exclude=exclude)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        stats[t] = {"kl_calib_before": kl0, "kl_calib_after": mean_kl(gates[t], data, exclude),
                    "kl_val_after": mean_kl(gates[t], val, exclude) if val else None,
                    "kl_heldout_after": mean_kl(gates[t], [held_t[t]], exclude),
                    "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
                    "steps_s": time.time() - t1}
        print(f"N={n}: {t}-target gates, KL {kl0:.3f} -> {stats[t]['kl_calib_after']:.3f} (calibration), "
              f"{stats[t]['kl_heldout_after']:.3f} (held-out), {stats[t]['steps_s']:.1f} s", flush=True)
    run = {"n": n, "block": args.block, "calib_tokens": n * len(data), "val_tokens": n * len(val),
           "held_tokens": n * len(held), "gate_keep_sink": keep_sink, "gate_keep_local": keep_local,
           "steps": args.steps, "lr": args.lr, **stats[targets[0]], "gate_targets": stats,
           "train_s": time.time() - t0, "rows": []}
    out["runs"].append(run)
    print(f"N={n}: calibration + gates in {run['train_s']:.1f} s", flush=True)
    t_eval = time.time()

    def add(method: str, make, rows: dict = run, **extra) -> None:
        if time.time() - t_eval > args.eval_budget_s or time.time() - T0 > args.deadline_s:
            print(f"N={n}: eval budget or deadline spent, skipping {method} {extra}", flush=True)
            return
        tiles: list = []
        ppl, density = perplexity(model, held, make, tiles)
        tile = None if None in tiles else sum(tiles) / len(tiles)
        rows["rows"].append({"method": method, "density": density, "tile64_density": tile, "ppl": ppl, **extra})
        shown = {e: v for e, v in extra.items() if e != "head_k"}  # (the per-layer ks go to the JSON only)
        print(f"N={n} block={rows['block']} {method} {shown} density {density:.3f} ppl {ppl:.3f}", flush=True)
        save()

    def select(base: str, block: int, kw: dict, **more) -> BlockSelect:
        kw = dict(kw)
        g = gates.get(kw.pop("gate_target", targets[0])) if base.startswith("seer") else None
        return BlockSelect(base, block=block, gates=g, **kw, **more)

    done: set = set()
    curves: dict = {}

    def head_k(kw: dict, k: int) -> dict:
        """{layer: [k per KV head]} for a *_headk row: allocate_head_k on the calibration segments' mass maps
        (not the early-stopping one), spending at most top-k's block count over all layers and heads. With
        +gcurve the curves rank blocks by the row's gates (the share the gates' top-k keeps), else by the map
        (both on the gates' training segments, where the gates look better than on new text)."""
        forcing = (kw.get("keep_sink", False), kw.get("keep_local", 1))
        gate_t = kw.get("gate_target", targets[0]) if kw.get("gate_curves") else None
        src = kw.get("alloc", "mass")
        qb, k_max = n // args.block, min(n // args.block, 4 * k_for_density(n // args.block, max(args.densities)))
        if (forcing, gate_t, src) not in curves:
            forced = forced_blocks(qb, *forcing, device=dev)
            fit_segs = per_seg[:len(per_seg) - args.val_segments] or per_seg
            cs = {}
            for layer in fit_segs[0][src]:
                scores = None
                if gate_t is not None:
                    with torch.no_grad():
                        scores = torch.cat([gates[gate_t][str(layer)](*seg[gate_t][layer][:2]) for seg in fit_segs])
                cs[layer] = kept_mass_curve(torch.cat([seg[src][layer][2] for seg in fit_segs]), forced, k_max, scores)
            curves[(forcing, gate_t, src)] = cs
        cs = curves[(forcing, gate_t, src)]
        if kw.get("layer_sens"):  # weight each layer's curve by its perplexity cost per unit of attention dropped
            cs = {layer: c * w for (layer, c), w in zip(cs.items(), layer_sensitivity(kw, k, cs))}
        return allocate_head_k(cs, qb, k, k_min=forcing[1] + forcing[0])

    def layer_sensitivity(kw: dict, k: int, cs: dict) -> list[float]:
        """Per layer (in ``cs`` order): the early-stopping calibration segment's loss increase when only that
        layer runs the row's uniform top-k, divided by the attention share that top-k drops there (``cs``)."""
        ids = calib[-1].to(dev)
        base_kw = {o: v for o, v in kw.items() if o not in ("gate_curves", "layer_sens", "gate_target", "alloc")}
        g = gates[kw.get("gate_target", targets[0])]
        key = ("rise", k, tuple(sorted(base_kw.items())), kw.get("gate_target", targets[0]))
        if key not in curves:  # the loss rises depend on k and the gates' selection only: measured once
            loss0 = nll_sum(model, ids)[0]
            curves[key] = [nll_sum(model, ids, OneLayer(layer, "seer_topk", block=args.block, k=k, gates=g, **base_kw))[0]
                           - loss0 for layer in cs]
        rise = curves[key]
        dropped = [max(1.0 - c[:, min(k, c.shape[1] - 1)].mean().item(), 1e-4) for c in cs.values()]
        # a layer whose loss did not rise (noise) still gets a tenth of the mean rise: its blocks are not free
        floor = 0.1 * max(sum(max(r, 0.0) for r in rise) / len(rise), 1e-6)
        out = [max(r, floor) / d for r, d in zip(rise, dropped)]
        print(f"N={n} k={k}: per-layer loss rise (nats, summed over the segment) "
              + " ".join(f"{r:.1f}" for r in rise), flush=True)
        return out

    def topk_rows(specs: list[str], block: int, rows: dict, density: float) -> None:
        k = k_for_density(n // block, density)
        if (block, k) in done:
            return
        done.add((block, k))
        for spec in specs:
            base, kw = parse_method(spec)
            if k < kw.get("keep_local", 1) + kw.get("keep_sink", False):
                continue  # fewer blocks than the method forces
            if base.startswith("seer") and kw.get("gate_target", targets[0]) not in gates:
                continue  # that gate set was not trained (train deadline)
            if base.endswith("_headk"):
                hk = head_k(kw, k)
                ks = [x for v in hk.values() for x in v]
                bkw = {o: v for o, v in kw.items() if o not in ("gate_curves", "layer_sens", "alloc")}
                add(spec, lambda b=base, kw=bkw, hk=hk: select(b, block, kw, head_k=hk), rows, k=k,
                    head_k_min=min(ks), head_k_max=max(ks), head_k={str(layer): v for layer, v in hk.items()})
                continue
            add(spec, lambda b=base, kw=kw, k=k: select(b, block, kw, k=k), rows, k=k)

    add("dense", None)
    others = []  # gate-free rows at other block sizes, each its own run entry
    for block in args.oracle_blocks:
        if n % block or block == args.block or any(m.startswith("seer") for m in args.oracle_methods):
            print(f"N={n}: skipping oracle block {block} (must divide N, differ from --block; no seer)", flush=True)
            continue
        others.append((block, {"n": n, "block": block, "gate_free": True, "rows": [dict(r) for r in run["rows"][:1]]}))
        out["runs"].append(others[-1][1])
    # density by density, in the order given (the first is the target): every block size's rows at it
    for d in args.densities:
        topk_rows(args.methods, args.block, run, d)
        for block, other in others:
            topk_rows(args.oracle_methods, block, other, d)
    # threshold and top-p rows: one row per value of their own knob
    for specs, values, knob in ((args.threshold_methods, args.thresholds, "threshold"), (args.p_methods, args.ps, "p")):
        for spec in specs:
            base, kw = parse_method(spec)
            if kw.get("gate_target", targets[0]) not in gates:
                continue
            for x in values:
                add(spec, lambda x=x, b=base, kw=kw, knob=knob: select(b, args.block, kw, **{knob: x}), **{knob: x})
    if n == args.needle_length:
        run_needle(model, tok, gates, n, args, run, save)
    if args.save_gates:
        for t, g in gates.items():
            torch.save(g.state_dict(), f"{args.save_gates}_{n}_{t}.pt")


VARIANT_KEYS = {"segs": int, "steps": int, "hidden": int, "lr": float, "loss": str, "rope": int, "seed": int,
                "time": float, "qstats": int, "of": str, "target": str}


def parse_variant(spec: str) -> tuple[str, dict]:
    """"data:segs=0,steps=9000,loss=top64" -> ("data", {...}): a gate training recipe for --gate-variants.

    segs: calibration segments trained on (the first ones, the early-stopping one left out; 0 = all computed);
    loss: "kl" (free blocks, the default), "incl" (the forced blocks in the KL too) or "top<M>" (KL on the
    target's M largest free blocks, seer.gate_kl's ``top``); rope: 1 = rotary block-position terms
    (AttnGate's ``rope_block``); qstats: 3 = the gate also reads the block's query maxima and minima
    (AttnGate's ``q_stats``); time: this training's cap in seconds; of: "a+b" = no training, the ensemble of
    the recipes a and b trained before (seer.GateEnsemble); target: the calibration map distilled and early-
    stopped on (seer.TARGETS: "max", the paper's, by default; "dev" / "devo" the output-aware ones, ours).
    Unset keys take the run's flags."""
    name, _, rest = spec.partition(":")
    if not name.isidentifier():
        raise ValueError(f"variant name must be an identifier, got {spec=}")
    opts: dict = {}
    for item in filter(None, rest.split(",")):
        key, _, val = item.partition("=")
        if key not in VARIANT_KEYS:
            raise ValueError(f"unknown key {key!r} in variant {spec=} (keys: {sorted(VARIANT_KEYS)})")
        opts[key] = VARIANT_KEYS[key](val)
    loss = opts.get("loss", "kl")
    if not (loss in ("kl", "incl") or (loss.startswith("top") and loss[3:].isdigit() and int(loss[3:]) > 0)):
        raise ValueError(f"variant {spec=}: loss must be kl, incl or top<M>, got {loss=}")
    if opts.get("qstats", 1) not in (1, 3):
        raise ValueError(f"variant {spec=}: qstats must be 1 or 3")
    if opts.get("target", "max") not in TARGETS:
        raise ValueError(f"variant {spec=}: target must be one of {TARGETS}")
    return name, opts


def run_variants(model, tok, text: str, n: int, args, out: dict, save) -> None:
    """--gate-variants: one calibration pass, several gate recipes, each trained then evaluated at once.

    Every variant stops early on the same calibration segment (``--val-index``), and the per-head budgets of
    the *_headk rows come from the same ``--alloc-segments`` mass maps, so the variants differ only in their
    recipe. Per variant the JSON keeps the free-block KL and the attention share its head-k selection keeps
    (per layer, vs the oracle's with the same budgets) on the early-stopping segment (the calibration side,
    where variants are chosen) and on the first held-out segment (reported)."""
    dev = model.device
    t0 = time.time()
    calib_ids, held = calib_and_held(tok, text, n, args, dev)
    vi = len(calib_ids) - 1 if args.val_index is None else min(args.val_index, len(calib_ids) - 1)
    n_alloc = args.alloc_segments or vi
    per_seg: list = []
    seg_s: list = []
    q_stats = max(parse_variant(v)[1].get("qstats", 1) for v in args.gate_variants)
    # maps to calibrate: the paper's target and the mass map always (per-head k, kept shares), plus what the
    # recipes distil and the *_headk rows allocate from
    need = {parse_variant(v)[1].get("target", "max") for v in args.gate_variants}
    allocs = {parse_method(m)[1].get("alloc", "mass") for m in args.methods}
    need |= {a.rstrip("w") for a in allocs} | set(args.calib_targets)
    cal_targets = ("max", "mass") + tuple(t for t in TARGETS if t in need and t not in ("max", "mass"))
    totals = any(a.endswith("w") for a in allocs)

    def calibrate(upto: int, deadline: float = 1e9) -> None:
        while len(per_seg) < min(upto, len(calib_ids)) and (len(per_seg) <= vi or time.time() - T0 < deadline):
            t1 = time.time()
            per_seg.append(calibration_targets(model, calib_ids[len(per_seg)], block=args.block,
                                               chunk=args.calib_chunk, targets=cal_targets, q_stats=q_stats,
                                               totals=totals))
            seg_s.append(time.time() - t1)

    calibrate(max(vi, n_alloc) + 1)
    held_t = calibration_targets(model, held[0], block=args.block, chunk=args.calib_chunk, targets=cal_targets,
                                 q_stats=q_stats)
    # the gates' forced blocks, which the *_headk budgets also assume (a run without gates: the oracle rows')
    seer = [m for m in args.methods if m.startswith("seer")]
    keep_sink, keep_local = gate_forcing(seer or [m.replace("oracle", "seer", 1) for m in args.methods
                                                  if parse_method(m)[0].endswith("_headk")])
    qb = n // args.block
    forced = forced_blocks(qb, keep_sink, keep_local, dev)
    exclude = forced if keep_sink or keep_local > 1 else None
    k_min = keep_local + keep_sink
    train_idx = [i for i in range(len(per_seg)) if i != vi]
    alloc_idx = train_idx[:n_alloc]
    ks = {d: k_for_density(qb, d) for d in args.densities}
    k_max = min(qb, 4 * max(ks.values()))
    # per-head k from the kept-share curves of a calibration map ("mass" unless a row says +adev / +adevo)
    def alloc_curve(src: str, layer: int) -> torch.Tensor:
        m = src.rstrip("w")
        w = torch.cat([per_seg[i][f"{m}_total"][layer][2] for i in alloc_idx]) if src.endswith("w") else None
        return kept_mass_curve(torch.cat([per_seg[i][m][layer][2] for i in alloc_idx]), forced, k_max, row_weight=w)

    srcs = [t for t in cal_targets if t != "max"] + sorted(a for a in allocs if a.endswith("w"))
    curves = {src: {layer: alloc_curve(src, layer) for layer in per_seg[0]["mass"]} for src in srcs}
    head_ks = {(src, k): allocate_head_k(c, qb, k, k_min=k_min) for src, c in curves.items()
               for k in ks.values() if k >= k_min}
    run = {"n": n, "block": args.block, "calib_segments_computed": len(per_seg), "val_index": vi,
           "alloc_segments": len(alloc_idx), "calib_s_per_segment": sum(seg_s) / len(seg_s),
           "held_tokens": n * len(held), "gate_keep_sink": keep_sink, "gate_keep_local": keep_local,
           "variants": {}, "rows": [], "train_s": time.time() - t0}
    out["runs"].append(run)
    print(f"N={n}: {len(per_seg)} calibration segments ({run['calib_s_per_segment']:.2f} s each), "
          f"early stopping on segment {vi}, head k from {len(alloc_idx)}: {time.time() - t0:.1f} s", flush=True)
    gates: dict = {}

    def add(method: str, make, **extra) -> None:
        if time.time() - T0 > args.deadline_s:
            print(f"N={n}: deadline passed, skipping {method} {extra}", flush=True)
            return
        tiles: list = []
        ppl, density = perplexity(model, held, make, tiles)
        tile = None if None in tiles else sum(tiles) / len(tiles)
        # the same row on the early-stopping segment (Old Testament): the calibration side, where recipes are chosen
        val_ppl = perplexity(model, [calib_ids[vi].to(dev)], make)[0] if args.val_ppl else None
        run["rows"].append({"method": method, "density": density, "tile64_density": tile, "ppl": ppl,
                            "val_ppl": val_ppl, **extra})
        shown = {e: v for e, v in extra.items() if e != "head_k"}
        print(f"N={n} block={args.block} {method} {shown} density {density:.3f} ppl {ppl:.3f}"
              + (f" (early-stopping segment {val_ppl:.3f})" if val_ppl else "")
              + f" [{time.time() - T0:.0f} s]", flush=True)
        save()

    def rows(specs: list[str]) -> None:
        for d in args.densities:
            k = ks[d]
            for spec in specs:
                base, kw = parse_method(spec)
                if k < k_min:
                    continue  # fewer blocks than the methods force
                kw = dict(kw)
                name = kw.pop("gate_variant", None)
                kw.pop("gate_target", None)
                src = kw.pop("alloc", "mass")
                if base.startswith("seer") and name not in gates:
                    continue
                more = {"head_k": head_ks[(src, k)]} if base.endswith("_headk") else {"k": k}
                extra = {"k": k}
                if base.endswith("_headk"):
                    flat = [x for v in head_ks[(src, k)].values() for x in v]
                    extra.update(head_k_min=min(flat), head_k_max=max(flat), alloc=src,
                                 head_k={str(layer): v for layer, v in head_ks[(src, k)].items()})
                add(spec, lambda b=base, kw=kw, g=gates.get(name), more=more:
                    BlockSelect(b, block=args.block, gates=g, **kw, **more), **extra)

    def kept(g, seg: dict, k: int, src: str = "mass") -> tuple[list[float], list[float]]:
        """Per layer: the share of ``seg``'s ``src`` map (attention mass, or the output deviation for "dev") that
        the gates' head-k selection keeps, and the oracle's (ranked by that map; both with the mass budgets)."""
        got, orc = [], []
        with torch.no_grad():
            for layer, (q, kf, mass) in seg[src].items():
                hk = head_ks[("mass", k)][layer]
                cg = kept_mass_curve(mass, forced, k_max, g[str(layer)](q, kf))
                co = kept_mass_curve(mass, forced, k_max)
                got.append(sum(cg[h, x].item() for h, x in enumerate(hk)) / len(hk))
                orc.append(sum(co[h, x].item() for h, x in enumerate(hk)) / len(hk))
        return got, orc

    def layer_kl(g, seg: dict) -> float:
        """Free-block KL of any gate set (AttnGate or GateEnsemble per layer), mean over layers."""
        with torch.no_grad():
            vals = [gate_kl(g[str(layer)](q, kf), t, exclude).item() for layer, (q, kf, t) in seg.items()]
        return sum(vals) / len(vals)

    def dev_kept(g, k0: int) -> dict:
        """Held-out share of the output-deviation map ("dev") kept by the gates' head-k selection vs its oracle."""
        if "dev" not in held_t:
            return {}
        dk, do = kept(g, held_t, k0, "dev")
        return {"held_kept_dev": sum(dk) / len(dk), "held_kept_dev_oracle": sum(do) / len(do),
                "held_kept_dev_layers": dk, "held_kept_dev_oracle_layers": do}

    def ensemble_variant(name: str, spec: str, opt: dict) -> None:
        members = [m for m in opt["of"].split("+") if m in gates]  # a recipe skipped for time is left out
        if len(members) < 2:
            raise ValueError(f"ensemble {spec}: fewer than 2 of its recipes were trained ({members})")
        g = ensemble_gates([gates[m] for m in members])
        gates[name] = g
        tgt = {run["variants"][m].get("target", "max") for m in members}
        tgt = tgt.pop() if len(tgt) == 1 else "max"
        k0 = ks[args.densities[0]]
        vk, vo = kept(g, per_seg[vi], k0)
        hkp, ho = kept(g, held_t, k0)
        run["variants"][name] = {
            "spec": spec, "members": members, "target": tgt, "train_segments": 0, "calib_tokens": 0, "steps_run": 0,
            "train_s": 0.0, "kl_val_before": None, "kl_val_after": layer_kl(g, per_seg[vi][tgt]),
            "kl_heldout_after": layer_kl(g, held_t[tgt]), "kept_k": k0, "val_kept": sum(vk) / len(vk),
            "val_kept_oracle": sum(vo) / len(vo), "held_kept": sum(hkp) / len(hkp),
            "held_kept_oracle": sum(ho) / len(ho), "val_kept_layers": vk, "val_kept_oracle_layers": vo,
            "held_kept_layers": hkp, "held_kept_oracle_layers": ho, **dev_kept(g, k0)}
        st = run["variants"][name]
        print(f"N={n}: ensemble {spec} ({'+'.join(members)}): free-block KL {st['kl_val_after']:.3f} (early-stopping segment), "
              f"{st['kl_heldout_after']:.3f} (held-out); head-k kept share {st['val_kept']:.4f} (val), "
              f"{st['held_kept']:.4f} (held-out)", flush=True)
        save()

    add("dense", None)
    rows([m for m in args.methods if not m.startswith("seer")])
    for spec in args.gate_variants:
        try:
            name, opt = parse_variant(spec)
            mine = [m for m in args.methods if parse_method(m)[1].get("gate_variant") == name]
            left = args.deadline_s - (time.time() - T0) - len(mine) * len(args.densities) * args.row_s - 4
            limit = min(opt.get("time", 1e9), left)
            if "of" in opt:  # an ensemble of recipes trained above: nothing to train
                ensemble_variant(name, spec, opt)
                rows(mine)
                continue
            if limit < args.min_train_s:
                print(f"N={n}: {limit:.0f} s left for variant {name}: skipped", flush=True)
                continue
            segs = opt.get("segs", len(train_idx))
            if segs == 0 or segs > len(train_idx):
                calibrate(len(calib_ids) if segs == 0 else segs + 1, args.calib_deadline_s)
                run.update(calib_segments_computed=len(per_seg), calib_s_per_segment=sum(seg_s) / len(seg_s))
                limit = min(opt.get("time", 1e9), args.deadline_s - (time.time() - T0)
                            - len(mine) * len(args.densities) * args.row_s - 4)
            idx = [i for i in range(len(per_seg)) if i != vi]
            idx = idx if segs == 0 else idx[:segs]
            tgt = opt.get("target", "max")
            data, val = [per_seg[i][tgt] for i in idx], [per_seg[vi][tgt]]
            loss = opt.get("loss", "kl")
            top = int(loss[3:]) if loss.startswith("top") else None
            ex = None if loss == "incl" else exclude
            t1 = time.time()
            g = make_gates(model, hidden=opt.get("hidden", args.hidden), seed=opt.get("seed", 0),
                           rope_block=args.block if opt.get("rope") else None, q_stats=opt.get("qstats", 1))
            kl0 = mean_kl(g, val, exclude)
            losses = train_gates(g, data, steps=opt.get("steps", args.steps), lr=opt.get("lr", args.lr), val=val,
                                 exclude=ex, top=top, time_limit_s=limit)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            train_s = time.time() - t1
            gates[name] = g
            k0 = ks[args.densities[0]]
            vk, vo = kept(g, per_seg[vi], k0)
            hkp, ho = kept(g, held_t, k0)
            st = {"spec": spec, "target": tgt, "train_segments": len(idx), "calib_tokens": n * len(idx), "steps_run": len(losses),
                  "train_s": train_s, "kl_val_before": kl0, "kl_val_after": mean_kl(g, val, exclude),
                  "kl_heldout_after": mean_kl(g, [held_t[tgt]], exclude),
                  "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
                  "kept_k": k0, "val_kept": sum(vk) / len(vk), "val_kept_oracle": sum(vo) / len(vo),
                  "held_kept": sum(hkp) / len(hkp), "held_kept_oracle": sum(ho) / len(ho),
                  "val_kept_layers": vk, "val_kept_oracle_layers": vo, "held_kept_layers": hkp,
                  "held_kept_oracle_layers": ho, **dev_kept(g, k0)}
            run["variants"][name] = st
            if len(run["variants"]) == 1:  # the table's header line describes the first (baseline) gates
                run.update(calib_tokens=st["calib_tokens"], steps=st["steps_run"], lr=opt.get("lr", args.lr),
                           kl_calib_before=kl0, kl_calib_after=mean_kl(g, data[:8], exclude),
                           kl_heldout_after=st["kl_heldout_after"])
            print(f"N={n}: variant {spec}: {len(idx)} segments, {len(losses)} steps in {train_s:.1f} s; free-block KL "
                  f"{kl0:.3f} -> {st['kl_val_after']:.3f} (early-stopping segment), {st['kl_heldout_after']:.3f} "
                  f"(held-out); head-k kept share {st['val_kept']:.4f} vs oracle {st['val_kept_oracle']:.4f} (val), "
                  f"{st['held_kept']:.4f} vs {st['held_kept_oracle']:.4f} (held-out) [{time.time() - T0:.0f} s]",
                  flush=True)
            save()
            rows(mine)
        except Exception as e:  # one recipe failing (e.g. out of memory) must not lose the others
            print(f"N={n}: variant {spec} FAILED: {type(e).__name__}: {e}", flush=True)
            out.setdefault("errors", []).append(f"N={n} variant {spec}: {type(e).__name__}: {e}")
            gates.pop(parse_variant(spec)[0], None)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            save()


def run_needle(model, tok, gates, n: int, args, run: dict, save) -> None:
    """Needle accuracy (greedy, 12 new tokens) with block-sparse prefill and dense decoding, per method."""
    samples = make_needle(tok, n, args.needle_samples, seed=0)
    run["needle"] = []
    t0 = time.time()
    qb = -(-max(len(s.input_ids) for s in samples) // args.block)
    configs = [("dense", {})]
    for d in args.needle_densities:
        k = k_for_density(qb, d)
        configs += [(m, {"k": k}) for m in args.methods]
    configs += [(m, {"threshold": th}) for m in args.threshold_methods for th in args.needle_thresholds]
    for method, kw in configs:
        if time.time() - t0 > args.needle_budget_s:
            print(f"needle: budget spent, skipping {method} {kw}", flush=True)
            continue
        base, opts = parse_method(method)
        if kw.get("k", 1e9) < opts.get("keep_local", 1) + opts.get("keep_sink", False):
            continue
        g = gates.get(opts.pop("gate_target", args.gate_targets[0])) if base.startswith("seer") else None
        scores, dens = [], []
        for s in samples:
            mod = BlockSelect(base, block=args.block, gates=g, **kw, **opts)
            with attach(model, modifiers=[mod]):
                pred = greedy_generate(model, tok, s, 12)
            scores.append(string_match_all(pred, s.answers))
            dens.append(mod.mean_density())
        acc = sum(scores) / len(scores)
        run["needle"].append({"method": method, **kw, "density": sum(dens) / len(dens), "accuracy": acc,
                              "ci95": list(wilson_interval(sum(scores), len(scores))), "n_samples": len(scores)})
        print(f"needle N={n} {method} {kw} density {run['needle'][-1]['density']:.3f} accuracy {acc:.2f}", flush=True)
        save()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048])
    ap.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.3, 0.2, 0.1, 0.05])
    ap.add_argument("--thresholds", type=float, nargs="*", default=[0.001, 0.003, 0.01, 0.03])
    ap.add_argument("--methods", nargs="+", default=["seer_topk", "oracle_topk", "window", "sink_window"],
                    help="top-k rows at every density: BlockSelect methods with +sink/+localN/+mass options")
    ap.add_argument("--gate-targets", nargs="+", default=["max"], choices=TARGETS,
                    help="train one gate set per target map (one calibration pass); seer entries pick with +tmax/+tmass")
    ap.add_argument("--threshold-methods", nargs="*", default=["seer_threshold"],
                    help="rows at every --thresholds value (seer_threshold with +sink/+localN options)")
    ap.add_argument("--p-methods", nargs="*", default=[],
                    help="rows at every --ps value: seer_topp / oracle_topp with a fixed mass p (their own density)")
    ap.add_argument("--ps", type=float, nargs="*", default=[0.9])
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--calib-segments", type=int, default=8)
    ap.add_argument("--held-segments", type=int, default=2)
    ap.add_argument("--val-segments", type=int, default=1, help="calibration segments kept for early stopping")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--eval-budget-s", type=float, default=1e9, help="per length: skip the rows after this")
    ap.add_argument("--train-deadline-s", type=float, default=1e9,
                    help="train the gate sets after the first only while less than this since start")
    ap.add_argument("--deadline-s", type=float, default=1e9, help="skip every row once this long since start")
    ap.add_argument("--oracle-blocks", type=int, nargs="*", default=[],
                    help="after the main rows: --oracle-methods rows at these other block sizes (no gates)")
    ap.add_argument("--oracle-methods", nargs="*", default=["oracle_topk", "oracle_topk+mass+sink+local2",
                                                            "sink_window"])
    ap.add_argument("--needle-length", type=int, default=0, help="needle task at this length (one of --lengths)")
    ap.add_argument("--needle-samples", type=int, default=10)
    ap.add_argument("--needle-densities", type=float, nargs="*", default=[0.1, 0.2])
    ap.add_argument("--needle-thresholds", type=float, nargs="*", default=[0.01])
    ap.add_argument("--needle-budget-s", type=float, default=1e9)
    ap.add_argument("--save-gates", default=None, help="path prefix for the gates' state dicts")
    ap.add_argument("--gate-variants", nargs="*", default=[],
                    help="name:key=val,... gate recipes (parse_variant), trained and evaluated in this order; "
                         "seer methods pick one with +v<name> (replaces the --gate-targets flow)")
    ap.add_argument("--val-index", type=int, default=None, help="variants: the early-stopping calibration segment")
    ap.add_argument("--alloc-segments", type=int, default=None,
                    help="variants: the first this many training segments give the *_headk budgets")
    ap.add_argument("--calib-chunk", type=int, default=256, help="variants: query rows per exact-attention chunk")
    ap.add_argument("--calib-deadline-s", type=float, default=1e9,
                    help="variants: calibrate segments beyond the first ones only until this long since start")
    ap.add_argument("--row-s", type=float, default=4.0, help="variants: seconds kept free per row to come")
    ap.add_argument("--min-train-s", type=float, default=15.0, help="variants: skip a training with less time left")
    ap.add_argument("--calib-targets", nargs="*", default=[], choices=TARGETS,
                    help="variants: calibrate these maps too (max and mass always; e.g. dev for its kept shares)")
    ap.add_argument("--val-ppl", action="store_true",
                    help="variants: each row's perplexity on the early-stopping segment too (choose recipes there)")
    ap.add_argument("--out", default="benchmarks/results/seer_smollm2.json")
    args = ap.parse_args()
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       "cpu" if args.device == "auto" else args.device)
    torch.manual_seed(0)
    model, tok = load("smollm2", dtype=torch.float32)
    model.to(dev)
    text = kjv_text()
    out = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized, float32)", "device": str(dev),
           "device_name": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
           "torch": torch.__version__, "args": vars(args), "runs": []}

    def save() -> None:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)

    save()  # the header at once: a run killed during calibration still leaves its settings
    for n in args.lengths:
        try:
            (run_variants if args.gate_variants else run_length)(model, tok, text, n, args, out, save)
        except Exception as e:  # one length failing (e.g. out of memory) must not lose the others
            print(f"N={n} FAILED: {type(e).__name__}: {e}", flush=True)
            out.setdefault("errors", []).append(f"N={n}: {type(e).__name__}: {e}")
        save()


if __name__ == "__main__":
    main()
