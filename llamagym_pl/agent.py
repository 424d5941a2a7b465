"""The user-facing `Agent`: three methods turn a Gymnasium env into a conversation.

A subclass says how the agent talks (`get_system_prompt`), how it sees the env
(`format_observation`) and how its words become an action (`extract_action`). The training
machinery (rollouts, PPO) lives elsewhere and only calls these three methods, so the same
subclass serves the Lightning path (`python -m llamagym_pl.fit`) and the LlamaGym-style
imperative loop (`agent.act(obs)` ...).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llamagym_pl.imperative import ImperativeTrainer


class Agent(ABC):
    """Base class of every agent; subclass it and implement the three abstract methods.

    Args:
        model: Only for the imperative LlamaGym loop: a Hugging Face causal LM. The Lightning
            path builds the model from the YAML config and leaves this ``None``.
        tokenizer: Only for the imperative loop: the model's tokenizer.
        device: Only for the imperative loop: a device string or ``torch.device``.
        generate_config_dict: Only for the imperative loop: generation settings.
        ppo_config_dict: Only for the imperative loop: PPO settings (see
            :class:`~llamagym_pl.imperative_setup.ImperativeConfig`).
        action_space: Only for the imperative loop: the env's action space, to check replies
            against and draw fallback actions from (also settable as ``agent.action_space``).

    The imperative loop (``act``, ``assign_reward``, ``terminate_episode``, ``train``, ``eval``)
    is LlamaGym's API; its trainer is built on the first ``act`` (see
    :mod:`llamagym_pl.imperative`).
    """

    action_space: Any = None
    action_names: list[str] | None = None
    """Optional names of a ``Discrete`` space's actions: index ``i`` is ``action_names[i]``. With
    ``data.policy: score`` they are the candidate actions the LM scores (see
    :meth:`candidate_actions`), and a chosen name maps back to its index."""

    def __init__(
        self,
        model: Any = None,
        tokenizer: Any = None,
        device: Any = None,
        generate_config_dict: dict[str, Any] | None = None,
        ppo_config_dict: dict[str, Any] | None = None,
        *,
        action_space: Any = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.generate_config_dict = dict(generate_config_dict or {})
        self.ppo_config_dict = dict(ppo_config_dict or {})
        if action_space is not None:  # else keep a subclass's class attribute
            self.action_space = action_space
        self._imperative: ImperativeTrainer | None = None
        self._imperative_training = True

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

    def candidate_actions(self, observation: Any, info: dict[str, Any]) -> list[str]:
        """The action texts the policy chooses among at this step (``data.policy: score`` only).

        Default: the env's ``info["admissible_commands"]`` (TextWorld-style envs list the valid
        commands of each state) when present, else :attr:`action_names`. Override it for
        anything else; a chosen text is played as ``action_names.index(text)`` when it is one of
        :attr:`action_names`, else as ``extract_action(text)``.
        """
        commands = info.get("admissible_commands") if isinstance(info, dict) else None
        if commands is not None:
            return list(commands)
        if self.action_names is not None:
            return list(self.action_names)
        raise ValueError(
            f"{type(self).__name__} has no candidate actions for data.policy: score: set its "
            "action_names (one name per Discrete action), override candidate_actions(observation, "
            "info), or use an env whose info has 'admissible_commands'"
        )

    def first_action_name(self, response: str) -> int:
        """The index in :attr:`action_names` of the first action name the reply says.

        A helper for :meth:`extract_action` of ``Discrete`` envs: names are matched as whole
        words, case-insensitively, and the first in the reply wins ("Hit, then stick." is hit). Raises
        ``ValueError`` when the reply names none, so the rollout applies its invalid-action policy.
        """
        if not self.action_names:
            raise ValueError(
                f"{type(self).__name__}.action_names is not set: first_action_name has no names to find"
            )
        index = {name.lower(): i for i, name in enumerate(self.action_names)}
        # Longest names first, so that "move left" wins over "move" where both are names.
        names = "|".join(re.escape(name) for name in sorted(index, key=len, reverse=True))
        found = re.search(rf"(?<!\w)({names})(?!\w)", response, flags=re.IGNORECASE)
        if found is not None:
            return index[found.group(1).lower()]
        raise ValueError(f"no action name ({'/'.join(self.action_names)}) in reply {response!r}")

    # ------------------------------------------------------------------ LlamaGym's imperative loop
    def act(self, observation: Any, info: dict[str, Any] | None = None) -> Any:
        """Reply to ``observation`` and return the env action: always a valid one.

        A reply that ``extract_action`` rejects gets the configured fallback action (counted in
        the stats as ``rollout/invalid_actions``). In eval mode the reply is greedy. ``info``
        (the env's, optional) reaches :meth:`candidate_actions` with ``policy: score``.
        """
        return self.imperative.act(observation, info)

    def assign_reward(self, reward: float) -> None:
        """Reward of the last ``act`` turn (calling it twice for one turn adds the rewards)."""
        if getattr(self, "_imperative", None) is None:
            raise RuntimeError("assign_reward() was called before act(): a reward belongs to an act() turn")
        self.imperative.assign_reward(reward)

    def terminate_episode(self, truncated: bool = False, next_observation: Any = None) -> dict[str, float]:
        """End the episode; runs a PPO update when a batch of episodes is full.

        Returns the update's stats (TensorBoard names, e.g. ``train/approx_kl``,
        ``rollout/return_mean``), or ``{}`` when no update ran. Pass ``truncated=True`` with
        ``next_observation`` when a time limit, not the env, ended the episode.
        """
        return self.imperative.terminate_episode(truncated, next_observation)

    def train(self, mode: bool = True) -> Agent:
        """Training mode (the default): sampled replies, episodes recorded and trained on."""
        if getattr(self, "_imperative", None) is not None:
            self._imperative.set_training(mode)
        self._imperative_training = mode
        return self

    def eval(self) -> Agent:
        """Inference mode: greedy replies, nothing recorded, no training."""
        return self.train(False)

    @property
    def training(self) -> bool:
        return getattr(self, "_imperative_training", True)

    @property
    def current_episode_messages(self) -> list[dict[str, str]]:
        """The chat so far (as LlamaGym exposed it); empty before the first ``act``."""
        trainer = getattr(self, "_imperative", None)
        ep = trainer.episode if trainer is not None else None
        if ep is None or not ep.observations:
            return []
        from llamagym_pl.chat import build_messages

        return build_messages(trainer.tokenizer, ep.system_prompt, ep.observations, ep.responses)

    @property
    def current_episode_rewards(self) -> list[float]:
        """Per-turn rewards of the episode so far (as LlamaGym exposed them)."""
        trainer = getattr(self, "_imperative", None)
        return list(trainer.episode.rewards) if trainer is not None and trainer.episode else []

    @property
    def imperative(self) -> ImperativeTrainer:
        """The engine of the imperative loop (built on first use, from the constructor's model,
        tokenizer, device and config dicts): its ``episode`` in play, the finished ``episodes``
        waiting for an update, ``num_updates``, ``policy`` and ``device``."""
        if getattr(self, "_imperative", None) is None:
            # Imported here: the Lightning path never builds the imperative engine.
            from llamagym_pl.imperative import ImperativeTrainer

            self._imperative = ImperativeTrainer(
                self,
                getattr(self, "model", None),
                getattr(self, "tokenizer", None),
                getattr(self, "device", None),
                getattr(self, "generate_config_dict", None),
                getattr(self, "ppo_config_dict", None),
                training=self.training,
            )
        return self._imperative
