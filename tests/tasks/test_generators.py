"""Task generators with the real SmolLM2 tokenizer: seeded, exact-ish lengths, needles once at their depth."""
import collections
import re

import pytest

from attnlab.tasks import (
    make_common_words,
    make_multikey,
    make_multivalue,
    make_needle,
    make_passkey,
    make_variable_tracking,
    needle_grid,
    depth_grid,
    split_sentences,
)
from attnlab.tasks import needle as needle_mod
from attnlab.tasks import passkey as passkey_mod

GENERATORS = [
    make_passkey, make_needle, make_multikey, make_multivalue, make_variable_tracking, make_common_words,
]
TOLERANCE = 16  # tokens a prompt may fall short of `length` (one haystack word or list item, plus slack)


@pytest.fixture(scope="module")
def tok(smollm):
    return smollm[1]


def _user_body(sample, instruction, question):
    """The context between the instruction and the question."""
    body = sample.prompt.split(instruction + "\n\n", 1)[1]
    return body.split("\n\n" + question, 1)[0]


@pytest.mark.parametrize("make", GENERATORS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("length", [400, 1024, 3000])
def test_length_is_hit_and_never_exceeded(tok, make, length):
    for s in make(tok, length, 2, seed=3):
        assert length - TOLERANCE <= len(s.input_ids) <= length
        assert s.metadata["length"] == length
        # The ids are the prompt's tokens (the chat template already holds the special tokens).
        assert list(s.input_ids) == tok(s.prompt, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("make", GENERATORS, ids=lambda f: f.__name__)
def test_seeded_and_deterministic(tok, make):
    a, b = make(tok, 600, 2, seed=7), make(tok, 600, 2, seed=7)
    assert a == b
    c = make(tok, 600, 2, seed=8)
    assert [s.prompt for s in a] != [s.prompt for s in c]
    assert a[0].prompt != a[1].prompt  # samples within one call differ too


@pytest.mark.parametrize("make", GENERATORS, ids=lambda f: f.__name__)
def test_chat_template_and_question_last(tok, make):
    s = make(tok, 500, 1, seed=0)[0]
    assert s.prompt.startswith("<|im_start|>")
    tail = s.prompt.rsplit("<|im_start|>assistant\n", 1)
    assert len(tail) == 2 and "?" not in tail[1] and "Answer with" in tail[0].rsplit("\n\n", 1)[1]
    plain = make(tok, 500, 1, seed=0, chat=False)[0]
    assert "<|im_start|>" not in plain.prompt and len(plain.input_ids) <= 500


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.35, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("make, module", [(make_passkey, passkey_mod), (make_needle, needle_mod)],
                         ids=["passkey", "needle"])
def test_needle_once_at_depth_on_a_sentence_boundary(tok, make, module, depth):
    for s in make(tok, 1500, 2, seed=11, depth=depth):
        question = module.QUESTION.format(key=s.metadata.get("key"))
        context = _user_body(s, module.INSTRUCTION, question)
        needle = s.metadata["needle"]
        assert context.count(needle) == 1
        assert s.prompt.count(s.answers[0]) == needle.count(s.answers[0])  # nowhere but in the needle
        i = context.index(needle)
        before, after = context[:i].rstrip(), context[i + len(needle):].lstrip()
        assert before == "" or re.search(r"[.!?]['\")\]]?$", before), before[-40:]
        total = len(before) + len(after) + 1
        # The nearest boundary is at most one sentence (the one around the target point) away.
        around = max(len((split_sentences(before) or [""])[-1]), len((split_sentences(after) or [""])[0]))
        assert abs(len(before) / total - depth) <= (around + 2) / total


def test_multikey_needles(tok):
    for s in make_multikey(tok, 1200, 3, seed=2, n_keys=4):
        m = s.metadata
        assert len(set(m["keys"])) == 4 and len(set(m["values"])) == 4
        assert s.answers == (m["values"][m["asked"]],)
        for k, v in zip(m["keys"], m["values"]):
            assert s.prompt.count(f"special magic numbers for {k} is: {v}.") == 1
            assert s.prompt.count(v) == 1
        assert f"magic number for {m['keys'][m['asked']]} mentioned" in s.prompt


def test_multivalue_needles(tok):
    for s in make_multivalue(tok, 1200, 3, seed=2, n_values=4):
        key = s.metadata["key"]
        assert len(set(s.answers)) == 4
        for v in s.answers:
            assert s.prompt.count(f"special magic numbers for {key} is: {v}.") == 1


def test_variable_tracking_chain_in_order(tok):
    for s in make_variable_tracking(tok, 1000, 3, seed=4, n_hops=4):
        names, value = s.answers, s.metadata["value"]
        assert len(set(names)) == 5
        positions = [s.prompt.index(f"VAR {names[0]} = {value}.")]
        positions += [s.prompt.index(f"VAR {b} = VAR {a}.") for a, b in zip(names, names[1:])]
        assert positions == sorted(positions)
        assert all(s.prompt.count(f"VAR {n} =") == 1 for n in names)


def test_common_words_frequencies(tok):
    for s in make_common_words(tok, 1500, 2, seed=5, n_common=10, freq_common=6, freq_rare=2):
        listing = s.prompt.split("appear many times.\n\n", 1)[1].split("\n\nWhat are", 1)[0]
        items = re.findall(r"(\d+)\. (\w+)", listing)
        assert [int(i) for i, _ in items] == list(range(1, len(items) + 1))
        counts = collections.Counter(w for _, w in items)
        assert {w: counts[w] for w in s.answers} == {w: 6 for w in s.answers}
        rare = {w: c for w, c in counts.items() if w not in s.answers}
        assert rare and set(rare.values()) == {2} and len(rare) == s.metadata["n_rare"]


def test_noise_haystack(tok):
    s = make_passkey(tok, 600, 1, seed=0, haystack="noise")[0]
    assert "The grass is green. The sky is blue." in s.prompt
    assert len(s.input_ids) <= 600


def test_needle_grid_covers_every_cell(tok):
    samples = needle_grid(tok, [300, 500], depth_grid(3), n_samples=1, seed=0)
    cells = [(s.metadata["length"], s.metadata["depth"]) for s in samples]
    assert cells == [(L, d) for L in (300, 500) for d in (0.0, 0.5, 1.0)]
    assert len({s.answers for s in samples}) == 6
    assert depth_grid(1) == [0.5]


@pytest.mark.parametrize("make", GENERATORS, ids=lambda f: f.__name__)
def test_bad_arguments(tok, make):
    with pytest.raises(ValueError, match="length"):
        make(tok, 0, 1)
    with pytest.raises(ValueError, match="n_samples"):
        make(tok, 500, 0)
    with pytest.raises(ValueError, match="n_samples"):
        make(tok, 500, -2)
    with pytest.raises(ValueError, match="too small"):
        make(tok, 40, 1)  # template and question alone are longer


def test_bad_task_parameters(tok):
    with pytest.raises(ValueError, match="depth"):
        make_needle(tok, 500, 1, depth=1.5)
    with pytest.raises(ValueError, match="source"):
        make_passkey(tok, 500, 1, haystack="essays")
    with pytest.raises(ValueError, match="freq_common"):
        make_common_words(tok, 500, 1, freq_common=2, freq_rare=2)
    with pytest.raises(ValueError, match="n_keys"):
        make_multikey(tok, 500, 1, n_keys=0)
    with pytest.raises(ValueError, match="chat"):
        make_passkey(_NoTemplate(tok), 500, 1, chat=True)


class _NoTemplate:
    """The real tokenizer with its chat template hidden, as a base model's tokenizer would be."""

    chat_template = None

    def __init__(self, tok):
        self._tok = tok

    def __call__(self, *a, **k):
        return self._tok(*a, **k)
