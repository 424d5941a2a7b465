"""The user-facing `Agent`: three methods turn a Gymnasium env into a conversation.

A subclass says how the agent talks (`get_system_prompt`), how it sees the env
(`format_observation`) and how its words become an action (`extract_action`). The training
machinery (rollouts, PPO) lives elsewhere and only calls these three methods, so the same
subclass serves the Lightning path (`python -m llamagym_pl.fit`) and the LlamaGym-style
imperative loop (`agent.act(obs)` ...).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any


class Agent(ABC):
    """Base class of every agent; subclass it and implement the three abstract methods.

    Args:
        model: Only for the imperative LlamaGym loop: a Hugging Face causal LM. The Lightning
            path builds the model from the YAML config and leaves this ``None``.
        tokenizer: Only for the imperative loop: the model's tokenizer.
        device: Only for the imperative loop: a device string or ``torch.device``.
        generate_config_dict: Only for the imperative loop: generation settings.
        ppo_config_dict: Only for the imperative loop: PPO settings.
    """

    def __init__(
        self,
        model: Any = None,
        tokenizer: Any = None,
        device: Any = None,
        generate_config_dict: dict[str, Any] | None = None,
        ppo_config_dict: dict[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.generate_config_dict = dict(generate_config_dict or {})
        self.ppo_config_dict = dict(ppo_config_dict or {})

    @abstractmethod
    def get_system_prompt(self) -> str:
        """The system message that opens every episode's conversation."""

    @abstractmethod
    def format_observation(self, observation: Any) -> str:
        """Render one env observation as the text of a user message."""

    @abstractmethod
    def extract_action(self, response: str) -> Any:
        """Parse the model's reply into an env action.

        Raise (any exception) or return a value outside the env's action space when the reply
        names no valid action: the rollout then applies its configured invalid-action policy
        (fallback action, optional penalty) and counts it, so turns and rewards stay in step.
        """
