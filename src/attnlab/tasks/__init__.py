"""Long-context tasks generated offline: passkey, needle in a haystack, RULER's multi-key,
multi-value, variable tracking and common-words extraction; exact-match scorers.

Every generator is `make_<task>(tokenizer, length, n_samples, seed=0, **params) -> list[Sample]`:
seeded, at most `length` tokens of that tokenizer, chat template applied when the tokenizer has
one, question at the end. `attnlab.eval.TASKS` pairs each generator with its scorer.
Few-shot classification (SST-2, AG News, TREC, CB, RTE) lives in `classification`.
"""
from .base import Sample, build_prompt, fit_length, insert_at_depths
from .classification import CLASSIFICATION_TASKS, ClassificationTask, Example, get_classification_task
from .common_words import make_common_words
from .haystack import NOISE, kjv_text, split_sentences
from .multikey import make_multikey
from .multivalue import make_multivalue
from .needle import depth_grid, make_needle, needle_grid
from .passkey import make_passkey
from .scoring import exact_match, string_match_all, string_match_part, wilson_interval
from .variable_tracking import make_variable_tracking

__all__ = [
    "Sample", "build_prompt", "fit_length", "insert_at_depths",
    "NOISE", "kjv_text", "split_sentences",
    "make_passkey", "make_needle", "needle_grid", "depth_grid",
    "make_multikey", "make_multivalue", "make_variable_tracking", "make_common_words",
    "exact_match", "string_match_all", "string_match_part", "wilson_interval",
    "CLASSIFICATION_TASKS", "ClassificationTask", "Example", "get_classification_task",
]

# Synthetic training tasks (seeded tensors + exact scorers) for attnlab.train and `attnlab bench quality`.
from .algorithmic import Algorithmic
from .linear_regression import LinearRegressionICL
from .listops import ListOps
from .mqar import MQAR, recall_answers
from .scan_snap import ScanSnap
from .synthetic import IGNORE, Batch

SYNTHETIC_TASKS = {"mqar": MQAR, "icl_regression": LinearRegressionICL, "algorithmic": Algorithmic,
                   "listops": ListOps, "scan_snap": ScanSnap}
__all__ += ["Batch", "IGNORE", "MQAR", "recall_answers", "LinearRegressionICL", "Algorithmic", "ListOps", "ScanSnap",
            "SYNTHETIC_TASKS"]
