"""attnlab's KV policies beside NVIDIA kvpress's presses, on the same model, samples and KV budget.

kvpress pins transformers < 5.3 and attnlab needs >= 5.3, so the work is split over two environments
(``bash benchmarks/kvpress_env.sh`` makes the kvpress one, default /tmp/kvpress-venv):

    # 1. main env: the task samples (prompt ids + answers) and the model directory, as JSON
    python3 benchmarks/kvpress_compare.py samples --task needle --length 2048 --samples 8
    # 2. kvpress env: greedy answers under SnapKV / StreamingLLM / ExpectedAttention presses (+ no press)
    /tmp/kvpress-venv/bin/python benchmarks/kvpress_compare.py press --budgets 0.25
    # 3. main env: attnlab's policies on the same samples (attnlab.kv.evaluate.evaluate_policies)
    python3 benchmarks/kvpress_compare.py attnlab --budgets 0.25
    # 4. main env: one table, every prediction scored by attnlab's scorer for the task
    python3 benchmarks/kvpress_compare.py table

Budget = fraction of the prompt's KV entries kept; for kvpress ``compression_ratio = 1 - budget``
(its ScorerPresses keep int(T * (1 - ratio)) entries in every head). Both sides prefill the whole
prompt (question included) with full attention, compress once after the prefill and decode greedily
with ``model.generate``: kvpress's ``with press(model): model.generate(...)`` usage, not its pipeline
(which would keep the question out of the compressed context). The model is SmolLM2 from the
safetensors directory ``attnlab.load()`` writes (``attnlab.hf.cache_dir``), loaded in float32 by both.
No kvpress code is copied: the ``press`` step imports the installed package.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SAMPLES = RESULTS / "kvpress_samples.json"
PRESS = RESULTS / "kvpress_presses.json"
ATTNLAB = RESULTS / "kvpress_attnlab.json"
TABLE = RESULTS / "kvpress_compare.md"
PRESSES = ("snapkv", "streaming_llm", "expected_attention", "snapkv_w32")  # snapkv_w32: attnlab's 32-query window


def cmd_samples(args) -> None:
    """Main env: write the task samples and the model directory."""
    from attnlab.eval import get_task
    from attnlab.hf import load
    from attnlab.hf.cache_dir import cache_root

    model, tok = load()
    model_dir = str(model.name_or_path)
    assert Path(model_dir).is_relative_to(cache_root()), model_dir  # the safetensors attnlab wrote
    spec = get_task(args.task)
    samples = spec.make(tok, length=args.length, n_samples=args.samples, seed=args.seed)
    out = dict(task=args.task, length=args.length, seed=args.seed, model_dir=model_dir,
               max_new_tokens=args.max_new_tokens,
               samples=[dict(input_ids=list(s.input_ids), answers=list(s.answers)) for s in samples])
    args.samples_json.write_text(json.dumps(out))
    print(f"wrote {len(samples)} samples of {args.task} at {args.length} tokens to {args.samples_json}")


def make_press(name: str, budget: float):
    from kvpress import ExpectedAttentionPress, SnapKVPress, StreamingLLMPress

    ratio = 1.0 - budget
    return {"snapkv": lambda: SnapKVPress(compression_ratio=ratio),
            "snapkv_w32": lambda: SnapKVPress(compression_ratio=ratio, window_size=32),
            "streaming_llm": lambda: StreamingLLMPress(compression_ratio=ratio),
            "expected_attention": lambda: ExpectedAttentionPress(compression_ratio=ratio)}[name]()


def cmd_press(args) -> None:
    """kvpress env: greedy answers under each press and budget (and with no press)."""
    import contextlib

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    data = json.loads(args.samples_json.read_text())
    model = AutoModelForCausalLM.from_pretrained(data["model_dir"], dtype=torch.float32,
                                                 attn_implementation="sdpa").eval().to(args.device)
    tok = AutoTokenizer.from_pretrained(data["model_dir"])
    eos = model.generation_config.eos_token_id
    configs = [("no_press", 1.0)] + [(p, b) for b in args.budgets for p in args.presses]
    runs = {f"{p}@{b:g}": dict(press=p, budget=b, records=[]) for p, b in configs}
    for i, s in enumerate(data["samples"]):
        ids = torch.tensor([s["input_ids"]], device=model.device)
        T = ids.shape[1]
        for p, b in configs:
            cache = DynamicCache()
            ctx = make_press(p, b)(model) if p != "no_press" else contextlib.nullcontext()
            _sync(model)
            start = time.perf_counter()
            with torch.no_grad(), ctx:
                out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                                     max_new_tokens=data["max_new_tokens"], do_sample=False,
                                     pad_token_id=eos if isinstance(eos, int) else eos[0])
            _sync(model)
            seconds = time.perf_counter() - start
            new = out[0, T:].tolist()
            fed = max(0, len(new) - 1)  # the last token is produced, never fed back
            held = [layer.keys.shape[2] for layer in cache.layers]
            runs[f"{p}@{b:g}"]["records"].append(dict(
                prediction=tok.decode(new, skip_special_tokens=True), prompt_tokens=T,
                kept_prompt_fraction=sum(h - fed for h in held) / (len(held) * T),
                kept_fraction=sum(held) / (len(held) * (T + fed)), seconds=seconds, new_tokens=len(new)))
            print(f"sample {i} {p}@{b:g}: {runs[f'{p}@{b:g}']['records'][-1]['prediction']!r} {seconds:.1f}s",
                  flush=True)
        args.press_json.write_text(json.dumps(dict(
            kvpress=_version("kvpress"), transformers=transformers.__version__, torch=torch.__version__,
            device=torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else "cpu",
            n_done=i + 1, runs=list(runs.values()))))  # checkpoint after every sample


def _sync(model) -> None:
    import torch

    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


def cmd_attnlab(args) -> None:
    """Main env: attnlab's policies on the same samples (one recorded prefill per sample)."""
    from attnlab.hf import load
    from attnlab.kv import make_policy
    from attnlab.kv.evaluate import evaluate_policies
    import attnlab.kv.evaluate as ev

    data = json.loads(args.samples_json.read_text())
    model, tok = load(data["model_dir"])
    model.to(args.device)
    policies = [make_policy("full")]
    for b in args.budgets:
        for name in args.policies:
            kwargs = {}
            if name == "task_kv":
                kwargs = dict(calibration=(1024, 1), task=data["task"] if args.task_aware else None)
            if name == "moa":
                kwargs = dict(calibration=(tuple(args.moa_tasks), tuple(args.moa_lengths), 1))
            policies.append(make_policy(name, budget=b, **kwargs))
    n = min(args.limit or len(data["samples"]), len(data["samples"]))
    spec = ev.get_task(data["task"])
    made = spec.make(tok, length=data["length"], n_samples=n, seed=data["seed"])
    assert [list(s.input_ids) for s in made] == [s["input_ids"] for s in data["samples"][:n]], "samples differ"
    start = time.perf_counter()
    results = evaluate_policies(model, tok, policies, data["task"], data["length"], n,
                                seed=data["seed"], max_new_tokens=data["max_new_tokens"], progress=False,
                                batch_size=args.batch)
    for r in results:
        print(r.summary())
    args.attnlab_json.write_text(json.dumps(dict(seconds=time.perf_counter() - start,
                                                 runs=[r.to_dict() for r in results])))


def cmd_table(args) -> None:
    """Main env: score every prediction with the task's scorer; one markdown table + JSON."""
    from attnlab.eval import get_task
    from attnlab.tasks import wilson_interval

    data = json.loads(args.samples_json.read_text())
    spec = get_task(data["task"])
    answers = [s["answers"] for s in data["samples"]]
    press = json.loads(args.press_json.read_text()) if args.press_json.exists() else None
    ours = json.loads(args.attnlab_json.read_text())["runs"] if args.attnlab_json.exists() else []
    # only the samples both sides finished (the press step checkpoints sample by sample)
    done = [len(answers)] + ([press["n_done"]] if press else []) + [len(r["records"]) for r in ours[:1]]
    n = min(done)
    runs = [(f"kvpress {press['kvpress']}", r["press"], r["budget"], r["records"][:n], "kept_fraction")
            for r in (press["runs"] if press else [])]
    runs += [("attnlab", r["policy"], r["budget"], r["records"][:n], "kept_fraction") for r in ours]
    rows = []
    for library, method, budget, recs, kept_key in runs:
        scores = [float(spec.score(r["prediction"], a)) for r, a in zip(recs, answers)]
        rows.append(dict(library=library, method=method, budget=budget, n=n, accuracy=sum(scores) / n,
                         ci95=wilson_interval(sum(scores), n), kept=sum(r[kept_key] for r in recs) / n,
                         seconds=sum(r["seconds"] for r in recs) / n if "seconds" in recs[0] else None,
                         predictions=[r["prediction"] for r in recs]))
    rows.sort(key=lambda r: (-r["budget"], r["library"], r["method"]))
    title = f"attnlab KV policies vs kvpress presses: {data['task']} at {data['length']} tokens, SmolLM2-135M-Instruct"
    lines = [f"# {title}",
             "",
             f"Same first {n} of {len(answers)} generated samples (seed {data['seed']}; both sides finished them), "
             f"greedy, {data['max_new_tokens']} new tokens, "
             "prompt (question included) prefilled in full and compressed once after prefill. Budget = fraction "
             "of prompt KV entries kept (kvpress compression_ratio = 1 - budget). `kept` = KV entries held at the "
             "end of generation over those a full cache would hold (decoded tokens included on both sides), "
             "measured from the caches. Scored by attnlab's scorer for the task. `s/sample` = kvpress wall time per "
             f"generate (prefill + decode) on {(press or {}).get('device', 'cpu')}"
             + (": a shared, heavily loaded 2-core CPU, do not read it as speed."
                if (press or {}).get("device", "cpu") == "cpu" else "."),
             "",
             "| library | method | budget | n | accuracy | 95% CI | kept | s/sample |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["ci95"]
        sec = f"{r['seconds']:.1f}" if r["seconds"] is not None else ""
        lines.append(f"| {r['library']} | {r['method']} | {r['budget']:g} | {r['n']} | {r['accuracy']:.3f} | "
                     f"[{lo:.2f}, {hi:.2f}] | {r['kept']:.3f} | {sec} |")
    args.table.write_text("\n".join(lines) + "\n")
    args.table.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def main(argv=None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    for name, func in (("samples", cmd_samples), ("press", cmd_press), ("attnlab", cmd_attnlab), ("table", cmd_table)):
        p = sub.add_parser(name)
        p.set_defaults(func=func)
        p.add_argument("--samples-json", type=Path, default=SAMPLES)
        p.add_argument("--press-json", type=Path, default=PRESS)
        p.add_argument("--attnlab-json", type=Path, default=ATTNLAB)
        p.add_argument("--table", type=Path, default=TABLE)
        p.add_argument("--budgets", type=float, nargs="+", default=[0.25])
        p.add_argument("--device", default="cpu", help="cpu (default) or cuda (press and attnlab steps)")
    s = sub.choices["samples"]
    s.add_argument("--task", default="needle")
    s.add_argument("--length", type=int, default=2048)
    s.add_argument("--samples", type=int, default=8)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--max-new-tokens", type=int, default=12)
    sub.choices["press"].add_argument("--presses", nargs="+", default=list(PRESSES[:3]), choices=PRESSES)
    a = sub.choices["attnlab"]
    a.add_argument("--policies", nargs="+", default=["streaming", "snapkv", "razor", "moa", "task_kv"])
    a.add_argument("--moa-lengths", type=int, nargs="+", default=[1024, 2048])
    a.add_argument("--moa-tasks", nargs="+", default=["passkey", "variable_tracking"])
    a.add_argument("--limit", type=int, default=0, help="only the first N samples (0: all)")
    a.add_argument("--batch", type=int, default=1, help="prompts per forward (accuracy does not depend on it)")
    a.add_argument("--task-aware", action="store_true", help="calibrate task_kv on the evaluated task")
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
