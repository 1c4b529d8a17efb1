"""Rewards: judge templates and parsers, judgment rewards, Kendall τ, rule verifiers, hacking guards.

Modules (model-backed reward sources live beside these, e.g. ``rewards/sources.py``):

* :mod:`.judges` — judge prompt templates (pointwise / pairwise / pairwise-scores / listwise),
  rendered through a tokenizer's chat template.
* :mod:`.parsers` — never-raising parsers of judge outputs → :class:`ParseResult`.
* :mod:`.judgment` — rewards for training judges (score match, verdict, position consistency,
  Kendall τ, format).
* :mod:`.ranking` — :func:`kendall_tau` (URPO formula).
* :mod:`.verifiers` — :class:`MathVerifier` (math-verify), :class:`ExactMatchVerifier`.
* :mod:`.guards` — reward-hacking guards and :class:`GuardCounter`.

Keep this package's import light (no jax / model imports at module level): verifier worker
processes import it on start-up.
"""

from jaxrl_rm.rewards.guards import (
    GUARD_NAMES,
    MASTER_KEY_PHRASES,
    GuardConfig,
    GuardCounter,
    check_text,
    count_reasons,
    guard_rewards,
    guard_texts,
    is_master_key,
    is_prompt_echo,
    is_repetition,
)
from jaxrl_rm.rewards.judges import (
    PLACEHOLDERS,
    TEMPLATE_NAMES,
    JudgeTemplate,
    get_template,
    judge_template,
)
from jaxrl_rm.rewards.judgment import (
    apply_format_penalty,
    format_reward,
    kendall_tau_reward,
    position_consistency_reward,
    score_match_reward,
    scores_to_rewards,
    verdict_reward,
)
from jaxrl_rm.rewards.parsers import (
    PARSERS,
    ParseResult,
    parse_batch,
    parse_listwise,
    parse_listwise_tags,
    parse_pairwise,
    parse_pairwise_scores,
    parse_pointwise,
    verdict_from_scores,
)
from jaxrl_rm.rewards.ranking import kendall_tau, tau_to_reward
from jaxrl_rm.rewards.verifiers import (
    ANSWER_FORMATS,
    ExactMatchVerifier,
    MathVerifier,
    VerifierOutput,
    VerifyResult,
    exact_match,
    extract_answer,
    gsm8k_answer,
    normalize_answer,
    verify_math,
)

__all__ = [
    # guards
    "GUARD_NAMES",
    "MASTER_KEY_PHRASES",
    "GuardConfig",
    "GuardCounter",
    "check_text",
    "count_reasons",
    "guard_rewards",
    "guard_texts",
    "is_master_key",
    "is_prompt_echo",
    "is_repetition",
    # judges
    "PLACEHOLDERS",
    "TEMPLATE_NAMES",
    "JudgeTemplate",
    "get_template",
    "judge_template",
    # judgment
    "apply_format_penalty",
    "format_reward",
    "kendall_tau_reward",
    "position_consistency_reward",
    "score_match_reward",
    "scores_to_rewards",
    "verdict_reward",
    # parsers
    "PARSERS",
    "ParseResult",
    "parse_batch",
    "parse_listwise",
    "parse_listwise_tags",
    "parse_pairwise",
    "parse_pairwise_scores",
    "parse_pointwise",
    "verdict_from_scores",
    # ranking
    "kendall_tau",
    "tau_to_reward",
    # verifiers
    "ANSWER_FORMATS",
    "ExactMatchVerifier",
    "MathVerifier",
    "VerifierOutput",
    "VerifyResult",
    "exact_match",
    "extract_answer",
    "gsm8k_answer",
    "normalize_answer",
    "verify_math",
]
