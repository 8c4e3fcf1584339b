"""Grading: final-answer extraction and math equivalence in a pool of worker processes.

Never evaluates model text as code; every answer has a hard timeout. See docs/grading.md.
"""

from egrc_jax.grading.equivalence import exact_match, is_equivalent, normalize, unsafe_reason
from egrc_jax.grading.extract import boxed_answer, extract_answer, split_reasoning, to_text
from egrc_jax.grading.pool import GradeResult, GraderPool, exact_match_grade, grade_responses

__all__ = [
  "GradeResult",
  "GraderPool",
  "boxed_answer",
  "exact_match",
  "exact_match_grade",
  "extract_answer",
  "grade_responses",
  "is_equivalent",
  "normalize",
  "split_reasoning",
  "to_text",
  "unsafe_reason",
]
