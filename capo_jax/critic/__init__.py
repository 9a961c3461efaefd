"""The LLM critic (GenPRM): prompt rendering, verdict parsing and the backend interface.

Backends live in their own modules (`capo_jax.critic.genprm`, `capo_jax.critic.rule`) and are
imported from there, so that this package stays light.
"""
from capo_jax.critic.base import Critic, CritiqueRequest, CriticStats
from capo_jax.critic.parser import INVALID, parse_outcome_verdict, parse_verdict
from capo_jax.critic.prompt import (
    DEFAULT_OUTCOME_TEMPLATE,
    DEFAULT_TEMPLATE,
    PromptTemplate,
    format_steps,
    render_outcome_prompt,
    render_prompt,
    sanitize,
)

__all__ = [
    "Critic",
    "CritiqueRequest",
    "CriticStats",
    "DEFAULT_OUTCOME_TEMPLATE",
    "DEFAULT_TEMPLATE",
    "INVALID",
    "PromptTemplate",
    "format_steps",
    "parse_outcome_verdict",
    "parse_verdict",
    "render_outcome_prompt",
    "render_prompt",
    "sanitize",
]
