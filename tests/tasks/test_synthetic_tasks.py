"""Synthetic training tasks: seeded, exact, and their scorers right on hand-made examples."""
import math

import pytest
import torch

from attnlab.tasks import IGNORE, MQAR, SYNTHETIC_TASKS, Algorithmic, Batch, LinearRegressionICL, ListOps, ScanSnap, recall_answers
from attnlab.tasks.listops import TOKEN_ID, decode, evaluate
from attnlab.tasks.synthetic import token_accuracy, value_mse

SMALL = [MQAR(64, 4, 128), LinearRegressionICL(), Algorithmic("sum"), Algorithmic("sort"), ListOps(), ScanSnap()]


@pytest.mark.parametrize("task", SMALL, ids=repr)
def test_seeded_and_shaped(task):
    a, b, c = task.sample(16, seed=3), task.sample(16, seed=3), task.sample(16, seed=4)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets.nan_to_num(7.0), b.targets.nan_to_num(7.0))
    assert not torch.equal(a.inputs, c.inputs)
    assert a.inputs.shape[:2] == a.targets.shape == (16, task.seq_len)
    if task.vocab_size is not None:
        assert a.inputs.dtype == torch.long and 0 <= a.inputs.min() and a.inputs.max() < task.vocab_size
        asked = a.targets[a.targets != IGNORE]
        assert len(asked) and asked.max() < task.n_classes
    else:
        assert a.inputs.shape[-1] == task.in_dim and (~torch.isnan(a.targets)).any()


def test_mqar_answers_recoverable_from_context():
    batch = MQAR(128, 8, 512).sample(64, seed=1)
    assert torch.equal(recall_answers(batch.inputs, 8), batch.targets)
    noisy = MQAR(128, 8, 512, random_non_queries=True).sample(64, seed=1)
    asked = noisy.targets != IGNORE  # a random filler may repeat a key, unasked (as in Zoology)
    assert torch.equal(recall_answers(noisy.inputs, 8)[asked], noisy.targets[asked])
    assert (noisy.inputs[:, 16:] != 0).float().mean() > 0.9
    assert ((batch.targets != IGNORE).sum(1) == 8).all()  # every key asked exactly once
    keys, values = batch.inputs[:, 0:16:2], batch.inputs[:, 1:16:2]
    assert (keys >= 1).all() and (keys < 256).all() and (values >= 256).all()
    assert all(len(set(r.tolist())) == 8 for r in keys)


def test_mqar_power_law_prefers_short_gaps():
    batch = MQAR(256, 4, 1024).sample(400, seed=0)
    query_pos = (batch.targets != IGNORE).nonzero()[:, 1] - 8
    assert (query_pos < 62).float().mean() > 0.5  # uniform would put ~25% in the first quarter


def test_token_accuracy_hand_made():
    targets = torch.tensor([[IGNORE, 2, IGNORE, 0]])
    logits = torch.zeros(1, 4, 3)
    logits[0, 1, 2] = logits[0, 3, 1] = 1.0  # right, then wrong
    assert token_accuracy(logits, targets) == 0.5
    with pytest.raises(ValueError, match="targets"):
        token_accuracy(logits, torch.full((1, 4), IGNORE))


def test_ridge_baseline_near_noise_level():
    task = LinearRegressionICL(dim=5, n_pairs=40, noise_var=0.1)
    batch = task.sample(20000, seed=0)
    ridge = task.ridge_mse(batch)
    # Bayes risk = sigma^2 (1 + E tr posterior cov) ~ 0.1 (1 + d / (L - d)) ~ 0.114
    assert 0.1 < ridge < 0.13
    zero = value_mse(torch.zeros(20000, 41), batch.targets)  # predicting 0 costs Var(y) = 1 + sigma^2
    assert abs(zero - 1.1) < 0.05
    noiseless = LinearRegressionICL(noise_var=0.0)
    b = noiseless.sample(64, seed=0)
    assert noiseless.ridge_mse(b) < 1e-12  # 40 exact pairs pin beta down


def test_one_step_gd_baseline_matches_its_closed_form_and_is_optimal():
    """The one-layer model's ceiling (paper 6): one GD step with the optimal step size, about 0.240."""
    task = LinearRegressionICL(dim=5, n_pairs=40, noise_var=0.1)
    batch = task.sample(50_000, seed=3)
    gd = task.gd_one_step_mse(batch)
    assert abs(gd - (1 + 0.1 - 1 / (1 + 6 / 40 + 0.5 / 40))) < 0.01
    y = batch.targets[:, -1].double()
    for lr in (0.75, 0.97):  # the population optimum is ~0.86: steps either side do worse
        assert (task.gd_one_step_predict(batch, lr) - y).square().mean().item() > gd
    assert gd > 2 * task.ridge_mse(batch)


def test_algorithmic_answers():
    values = torch.tensor([[0.5, -1.0, 2.0, -3.0]])
    from attnlab.tasks.algorithmic import answer
    assert answer("sum", values).tolist() == [[0.5, -0.5, 1.5, -1.5]]
    assert answer("min", values).tolist() == [[0.5, -1.0, -1.0, -3.0]]
    assert answer("sort", values).tolist() == [[-3.0, -1.0, 0.5, 2.0]]
    batch = Algorithmic("min", seq_len=16, scale=4.0).sample(32, seed=0)
    assert batch.inputs.abs().max() <= 4.0 and torch.equal(batch.targets, batch.inputs[..., 0].cummin(-1).values)
    with pytest.raises(ValueError, match="op"):
        Algorithmic("max")


def test_listops_evaluator_hand_made():
    assert evaluate("[MAX 2 9 [MIN 4 7 ] 0 ]".split()) == 9
    assert evaluate("[SM 5 6 [MED 1 8 3 ] ]".split()) == 4  # 5 + 6 + 3 = 14 -> 4
    assert evaluate("[MED 1 2 3 4 ]".split()) == 2  # median 2.5 truncates to 2
    with pytest.raises(ValueError, match="tokens"):
        evaluate("[MAX 2 9".split())
    task = ListOps()
    batch = task.sample(32, seed=5)
    for row, target in zip(batch.inputs, batch.targets[:, 0]):
        tokens = decode(row)
        assert task.min_tokens <= len(tokens) <= task.max_tokens
        assert TOKEN_ID[str(evaluate(tokens))] == target


def test_scan_snap_label_from_distinct_tokens():
    task = ScanSnap(context_len=63, p_common=0.5)
    batch = task.sample(256, seed=0)
    answer = task.bayes_answer(batch.inputs)
    assert torch.equal(answer, batch.targets[:, -1])  # 63 tokens: some distinct one appears (1 - 2^-63)
    query = batch.inputs[:, -1] - task.first_query
    assert torch.equal(query, (batch.targets[:, -1] - task.first_next) // task.next_per_query)


@pytest.mark.parametrize("bad", [dict(seq_len=63), dict(num_kv_pairs=17), dict(vocab_size=32), dict(power_a=0.0)])
def test_mqar_bad_arguments(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        MQAR(**{**dict(seq_len=64, num_kv_pairs=4, vocab_size=128), **bad})


def test_bad_seed_and_n():
    with pytest.raises(ValueError, match="seed"):
        ListOps().sample(4, seed=-1)
    with pytest.raises(ValueError, match="n="):
        MQAR().sample(0)
    assert set(SYNTHETIC_TASKS) >= {"mqar", "icl_regression", "algorithmic", "listops", "scan_snap"}
