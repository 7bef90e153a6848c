"""Text side of megamed: prompt templates, tokenizers, IU reports, CheXpert label statistics.

A leaf package (depends only on megamed.data.layout/fetch). Only the light prompt functions are
imported here; `megamed.text.tokenizer`, `.reports` and `.labels` are imported where used.
"""
from __future__ import annotations

from megamed.text.prompts import (FINDING_PROMPTS, NORMAL_PROMPT, parse_prompt,  # noqa: F401
                                  prompt_from_labels)

__all__ = ["FINDING_PROMPTS", "NORMAL_PROMPT", "parse_prompt", "prompt_from_labels"]
