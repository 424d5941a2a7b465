"""A checkpoint's policy read on chosen observations, for the measuring tools
(``bench/blackjack_exact.py``, ``bench/frozenlake_policy.py``): loaded as ``evaluate`` loads it,
prompts built as the rollout builds a first turn's, candidates scored as score mode scores them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def load_policy(config: str, ckpt_path: str, overrides: Sequence[str] = ()) -> tuple[Any, Any]:
    """``(module, datamodule)`` of ``config`` (plus fit flags ``overrides``) with the weights of
    ``ckpt_path``, the policy in eval mode."""
    from llamagym_pl.evaluate import load_weights
    from llamagym_pl.fit import build_cli

    cli = build_cli(["--config", config, *overrides], run_fit=False)
    load_weights(cli.model, ckpt_path)
    cli.model.policy.eval()
    return cli.model, cli.datamodule


def first_turn_conversations(module: Any, data: Any, observations: Sequence[Any]) -> list[Any]:
    """Each observation as the first turn of an episode: the system prompt and its text."""
    from llamagym_pl.chat import build_messages

    agent = data.agent
    return [
        build_messages(module.tokenizer, agent.get_system_prompt(), [agent.format_observation(o)], [])
        for o in observations
    ]


def candidate_logits(module: Any, data: Any, conversations: list[Any]) -> Any:
    """Score mode's logits over the agent's ``action_names`` in each conversation, (N, C), before
    the temperature (``data.policy: score``)."""
    import torch

    from llamagym_pl.actions.candidates import prompt_logits
    from llamagym_pl.actions.scoring import candidate_logprob_sums
    from llamagym_pl.spans import encode_candidates

    tokenizer = module.tokenizer
    candidates = [data.agent.action_names] * len(conversations)
    encoded = encode_candidates(tokenizer, conversations, candidates)
    with torch.no_grad():
        sums = candidate_logprob_sums(module.policy, encoded, tokenizer.pad_token_id)
    return prompt_logits(sums, encoded, candidates, data.hparams.score_normalization)
