"""Diagnostics of real models, built from streaming observers and block hooks (one file per method)."""
from .column_mass import ColumnMassObserver
from .diagnostics import run_diagnostics
from .echo_heads import razor_head_scores, razor_retrieval_heads
from .head_importance import ablation_losses, head_importance
from .head_stats import HeadStatsObserver, head_stats
from .hidden_sinks import HiddenSinkObserver, hidden_sink_report, hidden_sinks
from .induction import (InductionObserver, PrevTokenObserver, induction_scores, prev_token_scores,
                        repeated_random_tokens)
from .layer_redundancy import LayerRedundancy, layer_redundancy
from .massive_activations import MassiveActivations, massive_activations
from .retrieval_heads import RetrievalObserver, RetrievalScores, retrieval_head_scores
from .sinks import SinkObserver, attention_sinks
from .thumbnails import ThumbnailObserver, pooled_map

__all__ = [
    "run_diagnostics",
    "ColumnMassObserver", "SinkObserver", "attention_sinks",
    "HiddenSinkObserver", "hidden_sinks", "hidden_sink_report",
    "HeadStatsObserver", "head_stats",
    "PrevTokenObserver", "InductionObserver", "prev_token_scores", "induction_scores", "repeated_random_tokens",
    "ThumbnailObserver", "pooled_map",
    "MassiveActivations", "massive_activations",
    "LayerRedundancy", "layer_redundancy",
    "head_importance", "ablation_losses",
    "razor_head_scores", "razor_retrieval_heads",
    "RetrievalObserver", "RetrievalScores", "retrieval_head_scores",
]
