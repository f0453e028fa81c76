"""Few-shot classification data, prompts, label scoring, calibration and intervals (real files, real SmolLM2)."""
import math

import numpy as np
import pytest
import torch

from attnlab import attach
from attnlab.interventions import head_scale
from attnlab.tasks.classification import (
    CLASSIFICATION_TASKS,
    CONTENT_FREE,
    SPLITS,
    Example,
    bootstrap_ci,
    build_prompt,
    calibrated_predictions,
    class_log_likelihoods,
    content_free_probs,
    content_free_prompts,
    continuation_log_probs,
    get_classification_task,
    label_token_ids,
    paired_bootstrap_ci,
    read_agnews_rows,
    sample_demonstrations,
)

# ---------------------------------------------------------------- loaders on the shipped files

# Reported-split row counts from the data README (data/classification/README.md).
README_ROWS = {"sst2": 1821, "trec": 500, "cb": 56, "rte": 277}


@pytest.mark.parametrize("name", sorted(README_ROWS))
def test_reported_split_has_the_readme_row_count(name):
    assert len(CLASSIFICATION_TASKS[name].read("test")) == README_ROWS[name]


def test_agnews_file_has_7600_rows_split_into_disjoint_parts():
    rows = read_agnews_rows()
    assert len(rows) == 7600
    assert np.bincount([r.label for r in rows]).tolist() == [1900] * 4
    parts = {s: CLASSIFICATION_TASKS["agnews"].read(s) for s in SPLITS}
    assert [len(parts[s]) for s in SPLITS] == [760, 760, 6080]
    texts = [set(r.fields for r in parts[s]) for s in SPLITS]
    assert sum(len(t) for t in texts) <= 7600 and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    assert not any("#39;" in r.fields[0] or "quot;" in r.fields[0] or "\\" in r.fields[0] for r in rows)


def test_other_splits_match_the_readme_and_are_disjoint():
    sizes = {name: [len(t.read(s)) for s in SPLITS] for name, t in CLASSIFICATION_TASKS.items()}
    assert sizes == {"sst2": [999, 872, 1821], "agnews": [760, 760, 6080], "trec": [995, 500, 500],
                     "cb": [200, 50, 56], "rte": [749, 250, 277]}
    for name in ("trec", "cb", "rte"):  # dev is held out of the train file: no row in both
        t = CLASSIFICATION_TASKS[name]
        train, dev = {e.fields for e in t.read("train")}, {e.fields for e in t.read("dev")}
        assert not train & dev, name


@pytest.mark.parametrize("name", sorted(CLASSIFICATION_TASKS))
def test_rows_are_well_formed(name):
    t = CLASSIFICATION_TASKS[name]
    for split in SPLITS:
        rows = t.read(split)
        assert all(len(r.fields) == t.n_fields and all(f.strip() for f in r.fields) for r in rows)
        labels = {r.label for r in rows}
        assert labels <= set(range(len(t.labels)))
        assert len(labels) == len(t.labels), (split, labels)  # every class occurs in every split


def test_first_rows_parse_as_in_the_files():
    assert CLASSIFICATION_TASKS["sst2"].read("test")[0] == Example(("no movement , no yuks , not much of anything .",), 0)
    assert CLASSIFICATION_TASKS["trec"].read("test")[0] == Example(("How far is it from Denver to Aspen?",), 0)
    cb = CLASSIFICATION_TASKS["cb"].read("test")[1]
    assert cb.fields[1] == "there is a shipment" and cb.label == 1  # neutral
    rte = CLASSIFICATION_TASKS["rte"].read("test")[0]
    assert rte.fields[1] == "Christopher Reeve had an accident." and rte.label == 0  # not_entailment
    ag = read_agnews_rows()[0]
    assert ag.label == 2 and ag.fields[0].startswith("Fears for T N pension after talks. Unions representing")


def test_bad_names_and_splits():
    with pytest.raises(ValueError, match="unknown classification task name='sst5'; known: agnews, cb, rte, sst2, trec"):
        get_classification_task("sst5")
    with pytest.raises(ValueError, match="unknown split='validation'"):
        CLASSIFICATION_TASKS["sst2"].read("validation")


# ---------------------------------------------------------------- prompts


def test_sst2_prompt_is_the_calibrate_before_use_format():
    t = CLASSIFICATION_TASKS["sst2"]
    demos = [Example(("a gem .",), 1), Example(("dull .",), 0)]
    assert build_prompt(t, demos, ("fine .",)) == (
        "Review: a gem .\nSentiment: Positive\n\nReview: dull .\nSentiment: Negative\n\nReview: fine .\nSentiment:")
    assert build_prompt(t, [], ("fine .",)) == "Review: fine .\nSentiment:"


def test_pair_and_instruction_prompts():
    cb = CLASSIFICATION_TASKS["cb"]
    assert build_prompt(cb, [Example(("P1", "H1"), 2)], ("P2", "H2")) == (
        "P1\nquestion: H1. true, false, or neither?\nanswer: true\n\n"
        "P2\nquestion: H2. true, false, or neither?\nanswer:")
    trec = CLASSIFICATION_TASKS["trec"]
    p = build_prompt(trec, [Example(("What is X?",), 5)], ("Who?",))
    assert p.startswith("Classify the questions based on whether their answer type is a Number, Location, Person, "
                        "Description, Entity, or Abbreviation.\n\nQuestion: What is X?\nAnswer Type: Ab\n\n")
    assert p.endswith("Question: Who?\nAnswer Type:")
    with pytest.raises(ValueError, match="takes 2 field"):
        build_prompt(cb, [], ("only one",))


def test_content_free_prompts_fill_every_field():
    rte = CLASSIFICATION_TASKS["rte"]
    prompts = content_free_prompts(rte, [Example(("P", "H."), 1)])
    assert CONTENT_FREE == ("N/A", "", "[MASK]") and len(prompts) == 3
    assert prompts[0] == "P\nquestion: H. True or False?\nanswer: True\n\nN/A\nquestion: N/A True or False?\nanswer:"
    assert prompts[1].endswith("\n\n\nquestion:  True or False?\nanswer:")


def test_demonstrations_are_seeded_and_checked():
    pool = CLASSIFICATION_TASKS["sst2"].read("train")
    a, b = sample_demonstrations(pool, 4, 0), sample_demonstrations(pool, 4, 0)
    assert a == b and len(set(a)) == 4 and set(a) <= set(pool)
    assert sample_demonstrations(pool, 4, 1) != a
    assert sample_demonstrations(pool, 0, 0) == []
    with pytest.raises(ValueError, match="shots=1000 exceeds the 999 rows"):
        sample_demonstrations(pool, 1000, 0)
    with pytest.raises(ValueError, match="shots=-1"):
        sample_demonstrations(pool, -1, 0)


# ---------------------------------------------------------------- calibration and intervals (hand-computed)


def test_content_free_probs_average_raw_probabilities_then_normalise():
    cf = np.log([[0.6, 0.1], [0.2, 0.1]])  # raw mean (0.4, 0.1) -> (0.8, 0.2)
    np.testing.assert_allclose(content_free_probs(cf), [0.8, 0.2])


def test_calibration_divides_by_the_content_free_probabilities():
    p_cf = np.array([0.8, 0.2])
    # Row 0: label probs (0.7, 0.3) -> (0.875, 1.5): calibration flips it to class 1.
    # Row 1: (0.9, 0.1) -> (1.125, 0.5): stays class 0. Row 2: unnormalised logs, same as (0.2, 0.8).
    ll = np.log([[0.7, 0.3], [0.9, 0.1], [0.02, 0.08]])
    assert ll.argmax(1).tolist() == [0, 0, 1]
    assert calibrated_predictions(ll, p_cf).tolist() == [1, 0, 1]
    assert calibrated_predictions(ll, np.array([0.5, 0.5])).tolist() == [0, 0, 1]  # uniform p_cf changes nothing


def test_bootstrap_interval_matches_the_normal_approximation():
    v = np.array([1, 0] * 200)  # p = 0.5, n = 400: se = 0.025, 95% half width ~0.049
    lo, hi = bootstrap_ci(v, n_boot=4000, seed=1)
    assert lo < 0.5 < hi
    assert abs((hi - lo) / 2 - 1.96 * 0.025) < 0.006
    assert bootstrap_ci([1, 1, 1]) == (1.0, 1.0)
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci([])


def test_paired_bootstrap_is_narrower_than_unpaired_for_correlated_rows():
    rng = np.random.default_rng(0)
    before = (rng.random(300) < 0.6).astype(int)
    after = before.copy()
    after[:12] = 1 - after[:12]  # 12 flips out of 300
    lo, hi = paired_bootstrap_ci(before, after, seed=0)
    d = after.mean() - before.mean()
    assert lo <= d <= hi and hi - lo < 0.06  # unpaired intervals of each accuracy are ~0.11 wide
    assert paired_bootstrap_ci(before, before) == (0.0, 0.0)
    with pytest.raises(ValueError, match="same rows"):
        paired_bootstrap_ci([1, 0], [1])


# ---------------------------------------------------------------- label scoring on SmolLM2


def _brute_force(model, prompt, cont):
    """log p(cont | prompt) from one forward over prompt + cont (batch 1, no cache)."""
    ids = torch.tensor([list(prompt) + list(cont)])
    with torch.no_grad():
        logp = model(ids).logits[0].double().log_softmax(-1)  # (T, V)
    return sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(cont))


def test_batched_continuations_match_one_forward_each(smollm):
    model, tok = smollm
    prompt = tok("Review: a gem of a film .\nSentiment:")["input_ids"]
    conts = [tok(w, add_special_tokens=False)["input_ids"] for w in (" Positive", " Abbreviation", " not so sure", " Ok")]
    assert [len(c) for c in conts][:3] == [1, 3, 3]
    got = continuation_log_probs(model, prompt, conts)
    want = [_brute_force(model, prompt, c) for c in conts]
    np.testing.assert_allclose(got.numpy(), want, atol=2e-4)


def test_batched_continuations_under_an_attached_modifier(smollm):
    model, tok = smollm
    prompt = tok("Question: Who wrote Hamlet?\nAnswer Type:")["input_ids"]
    conts = [tok(w, add_special_tokens=False)["input_ids"] for w in (" Person", " Abbreviation")]
    plain = continuation_log_probs(model, prompt, conts)
    with head_scale(model, heads=[(l, h) for l in range(4, 10) for h in range(9)], scale=0.0):
        got = continuation_log_probs(model, prompt, conts)
        want = [_brute_force(model, prompt, c) for c in conts]
    np.testing.assert_allclose(got.numpy(), want, atol=2e-4)
    assert not torch.allclose(got, plain, atol=1e-3)  # the modifier was active on both forwards


def test_class_scores_sum_label_word_alternatives(smollm):
    model, tok = smollm
    t = CLASSIFICATION_TASKS["agnews"]
    ids = label_token_ids(t, tok)
    assert len(ids) == 4 and len(ids[3]) == 2  # Technology or Science
    prompt = tok(build_prompt(t, [], ("NASA launches a new telescope to study distant galaxies.",)))["input_ids"]
    ll = class_log_likelihoods(model, prompt, ids)
    words = continuation_log_probs(model, prompt, [w for ws in ids for w in ws]).numpy()
    np.testing.assert_allclose(ll[:3], words[:3])
    np.testing.assert_allclose(ll[3], math.log(math.exp(words[3]) + math.exp(words[4])))
    with pytest.raises(ValueError, match="at least one token"):
        continuation_log_probs(model, prompt, [[]])
