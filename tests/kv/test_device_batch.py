"""Session 3 additions: batched evaluation, the cache keyword, --device, razor's head units."""
from __future__ import annotations

import pytest
import torch

from attnlab import kv
from attnlab.cli import main
from attnlab.eval import resolve_device
from attnlab.kv.evaluate import equal_length_batches, evaluate_policies
from attnlab.kv.razor import protection_order


def test_cache_kwargs_names_the_models_cache_argument(smollm):
    model, _ = smollm
    cache = object()
    (name, value), = kv.cache_kwargs(model, cache).items()
    assert value is cache
    import inspect

    assert name in inspect.signature(model.forward).parameters


def test_equal_length_batches():
    assert equal_length_batches([5, 4, 5, 5, 4], 2) == [[1, 4], [0, 2], [3]]
    assert equal_length_batches([3], 8) == [[0]]


def test_batched_evaluation_equals_batch_one(smollm):
    """Batches of equal-length prompts give each sample the predictions it gets alone (greedy, float32)."""
    model, tok = smollm
    policies = lambda: [kv.make_policy("full"), kv.make_policy("snapkv", budget=0.3),  # noqa: E731
                        kv.make_policy("streaming", budget=0.3)]
    one = evaluate_policies(model, tok, policies(), "needle", 384, 3, seed=5, max_new_tokens=10, progress=False)
    lengths = {r["prompt_tokens"] for r in one[0].records}
    three = evaluate_policies(model, tok, policies(), "needle", 384, 3, seed=5, max_new_tokens=10, progress=False,
                              batch_size=3)
    for a, b in zip(one, three):
        assert [r["prediction"] for r in a.records] == [r["prediction"] for r in b.records], a.policy
        assert a.accuracy == b.accuracy
        assert b.kept_bytes > 0 and abs(a.kept_fraction - b.kept_fraction) < 0.02
    assert [r["index"] for r in three[0].records] == [0, 1, 2]
    assert max(r["batch"] for r in three[0].records) == 3 - len(lengths) + 1


def test_batch_size_is_checked(smollm):
    model, tok = smollm
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_policies(model, tok, [kv.make_policy("full")], "needle", 256, 1, batch_size=0, progress=False)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="--device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.parametrize("argv", [
    ["kv", "eval", "--policy", "snapkv", "--budget", "0.3", "--task", "needle", "--length", "512", "--device", "tpu"],
    ["kv", "sweep", "--task", "needle", "--length", "512", "--device", "tpu"],
    ["heads", "retrieval", "--out", "/tmp/x", "--device", "tpu"],
    ["eval", "--task", "needle", "--length", "512", "--device", "tpu"],
])
def test_bad_device_is_a_clear_error(argv):
    with pytest.raises(SystemExit, match="--device"):
        main(argv)


def test_kv_batch_flag_is_checked():
    with pytest.raises(SystemExit, match="--batch"):
        main(["kv", "eval", "--policy", "snapkv", "--budget", "0.3", "--task", "needle", "--length", "512",
              "--batch", "0"])


def _scores(layers=4, heads=6, groups=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    echo, ind = torch.rand(layers, heads, generator=g, dtype=torch.float64), torch.rand(layers, heads, generator=g,
                                                                                        dtype=torch.float64)
    n_kv = heads // groups
    return {"echo": echo, "induction": ind, "echo_kv": echo.view(layers, n_kv, groups).amax(-1),
            "induction_kv": ind.view(layers, n_kv, groups).amax(-1)}


def test_protection_by_query_heads_covers_the_top_query_heads():
    s = _scores()
    order = protection_order(s, induction_frac=0.25, echo_frac=0.05, unit="query")
    kv_set = {tuple(c) for c in order.tolist()}
    top_q = s["induction"].flatten().topk(6).indices  # ceil(0.25 * 24)
    for i in top_q.tolist():
        layer, head = divmod(i, 6)
        assert (layer, head // 3) in kv_set
    top_e = s["echo"].flatten().topk(2).indices  # ceil(0.05 * 24)
    for i in top_e.tolist():
        layer, head = divmod(i, 6)
        assert (layer, head // 3) in kv_set
    # and nothing else: every protected KV head holds one of those query heads
    chosen = {(divmod(i, 6)[0], divmod(i, 6)[1] // 3) for i in top_q.tolist() + top_e.tolist()}
    assert kv_set == chosen
    by_kv = {tuple(c) for c in protection_order(s, induction_frac=0.25, echo_frac=0.05, unit="kv").tolist()}
    # ceil(0.25 * 8) = 2 KV heads by induction, ceil(0.05 * 8) = 1 by echo
    expect = {divmod(i, 2) for i in s["induction_kv"].flatten().topk(2).indices.tolist()}
    expect |= {divmod(i, 2) for i in s["echo_kv"].flatten().topk(1).indices.tolist()}
    assert by_kv == expect
    with pytest.raises(ValueError, match="unit"):
        protection_order(s, unit="layer")
    with pytest.raises(ValueError, match="unit"):
        kv.Razor(budget=0.3, unit="layer")
