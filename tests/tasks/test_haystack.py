"""The KJV haystack, the sentence splitter and depth placement."""
import random

import pytest

from attnlab.tasks import NOISE, insert_at_depths, kjv_text, split_sentences
from attnlab.tasks.haystack import haystack_words, random_start


def test_kjv_text_is_clean_prose():
    text = kjv_text()
    assert text.startswith("In the beginning God created the heavens and the earth.")
    assert len(text.split()) > 700_000
    assert not any(c.isdigit() for c in text)  # verse numbers stripped, so task numbers are unique
    assert "  " not in text


def test_split_sentences():
    text = "In the beginning. And God said, Let there be light: and there was light!  Where art thou? Amen"
    assert split_sentences(text) == [
        "In the beginning.",
        "And God said, Let there be light: and there was light!",
        "Where art thou?",
        "Amen",
    ]
    assert split_sentences('He said, "Go." And they went.') == ['He said, "Go."', "And they went."]
    assert split_sentences("") == []


def test_haystack_words_wraps_and_is_contiguous():
    k = len(NOISE.split())
    words = haystack_words("noise", 2 * k + 3, 0)
    assert " ".join(words[:k]) == NOISE
    assert words[k : 2 * k] == words[:k]
    n = len(kjv_text().split())
    tail = haystack_words("kjv", 10, n - 3)
    assert tail[3:] == haystack_words("kjv", 7, 0)


def test_random_start_is_a_sentence_start_and_seeded():
    rng1, rng2 = random.Random(1), random.Random(1)
    starts = [random_start("kjv", rng1) for _ in range(5)]
    assert starts == [random_start("kjv", rng2) for _ in range(5)]
    words = kjv_text().split()
    for s in starts:
        assert words[s - 1].rstrip("'\")]").endswith((".", "!", "?"))


def test_unknown_source():
    with pytest.raises(ValueError, match="source"):
        haystack_words("essays", 10)


@pytest.mark.parametrize("depth, before", [(0.0, 0), (0.3, 1), (0.5, 2), (0.9, 4), (1.0, 4)])
def test_insert_at_depths_picks_nearest_boundary(depth, before):
    sentences = ["Aaaa.", "Bbbb.", "Cccc.", "Dddd."]  # boundaries at 0, 0.25, 0.5, 0.75, 1
    out = insert_at_depths(sentences, [(depth, "NEEDLE.")]).split(" ")
    assert out.index("NEEDLE.") == before


def test_insert_at_depths_keeps_order_on_one_boundary():
    out = insert_at_depths(["A.", "B."], [(0.5, "X1."), (0.5, "X2."), (0.0, "X0.")])
    assert out == "X0. A. X1. X2. B."
