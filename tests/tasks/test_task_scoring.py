"""Scorers and the Wilson interval on hand-written cases."""
import math

import pytest

from attnlab.tasks import exact_match, string_match_all, string_match_part, wilson_interval


@pytest.mark.parametrize(
    "prediction, answers, expected",
    [
        (" 42137.", ["42137"], 1.0),
        (" 42137. Remember it.", ["42137"], 1.0),
        ("42137", ["42137"], 1.0),
        ('\n"42137"', ["42137"], 1.0),
        (" 421370.", ["42137"], 0.0),  # a longer number is a different number
        (" 4213.", ["42137"], 0.0),
        (" The pass key is 42137.", ["42137"], 0.0),  # the answer must come first
        (" a small piece of metal", ["42137"], 0.0),
        ("", ["42137"], 0.0),
        (" Paris is the capital", ["paris", "rome"], 1.0),
        (" Rome.", ["paris", "rome"], 1.0),
    ],
)
def test_exact_match(prediction, answers, expected):
    assert exact_match(prediction, answers) == expected


def test_string_match_all_counts_each_reference_once():
    refs = ["1907137", "2016989", "8313576", "7972377"]
    assert string_match_all(": 1907137, 2016989, 8313576, and 7972377.", refs) == 1.0
    assert string_match_all(": 4558597, 1907137, 1907137, and 2016989.", refs) == 0.5
    assert string_match_all("none of them", refs) == 0.0


def test_string_match_all_is_case_insensitive_and_whole_word():
    assert string_match_all("The words are: Art, BUY, shine", ["art", "buy", "shine"]) == 1.0
    assert string_match_all("start, buyer, shined", ["art", "buy", "shine"]) == 0.0
    assert string_match_all("the number is 12345678", ["1234567"]) == 0.0
    assert string_match_all("VAR ABCDE and VAR FGHIJ", ["abcde", "fghij", "klmno"]) == pytest.approx(2 / 3)


def test_string_match_part():
    assert string_match_part("it was Dolores Park", ["dolores park", "mission"]) == 1.0
    assert string_match_part("it was the Mission district", ["dolores park", "mission"]) == 1.0
    assert string_match_part("it was the Marina", ["dolores park", "mission"]) == 0.0


def test_string_match_rejects_empty_references():
    with pytest.raises(ValueError, match="references"):
        string_match_all("x", [])
    with pytest.raises(ValueError, match="references"):
        string_match_part("x", [])


def test_wilson_interval_known_values():
    z2 = 1.959963984540054**2
    lo, hi = wilson_interval(0, 5)
    assert lo == 0.0 and hi == pytest.approx(z2 / (5 + z2))  # 0.4345
    lo, hi = wilson_interval(5, 5)
    assert hi == 1.0 and lo == pytest.approx(5 / (5 + z2))  # 0.5655
    lo, hi = wilson_interval(3, 10)  # textbook value: [0.1078, 0.6032]
    assert lo == pytest.approx(0.1078, abs=1e-4) and hi == pytest.approx(0.6032, abs=1e-4)
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)


def test_wilson_interval_bad_input():
    with pytest.raises(ValueError, match="n="):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(6, 5)
    assert all(math.isfinite(x) for x in wilson_interval(2.5, 5))
