"""Empirical privacy audits of trained models: canaries, membership inference, exposure, extraction, one-run ε.

Pure statistics live in `stats` (no torch), model-facing measurements in `scoring` and `extraction`, canary
generation in `canaries`, and [`run_privacy_audit`] puts them together. None of it knows a model class.
"""

from .audit import AuditReport, membership_scores, run_privacy_audit
from .canaries import Canary, CanarySet, append_canaries, load_canaries, make_canaries, save_canaries
from .extraction import ExtractionResult, extraction_test, token_edit_distance
from .scoring import greedy_continuations, sequence_log_perplexity
from .stats import exposure, one_run_audit, one_run_epsilon_lower_bound, one_run_p_value, roc_auc, tpr_at_fpr

__all__ = [
    "AuditReport",
    "Canary",
    "CanarySet",
    "ExtractionResult",
    "append_canaries",
    "exposure",
    "extraction_test",
    "greedy_continuations",
    "load_canaries",
    "make_canaries",
    "membership_scores",
    "one_run_audit",
    "one_run_epsilon_lower_bound",
    "one_run_p_value",
    "roc_auc",
    "run_privacy_audit",
    "save_canaries",
    "sequence_log_perplexity",
    "token_edit_distance",
    "tpr_at_fpr",
]
