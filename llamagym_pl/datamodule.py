"""`RolloutDataModule`: fresh, whole episodes from Gymnasium envs every epoch."""

from __future__ import annotations

import random
from typing import Any, Literal

import lightning as L
from torch.utils.data import DataLoader

from llamagym_pl.actions import Rollout, RolloutDataset, ScoreNormalization, make_style
from llamagym_pl.agent import Agent
from llamagym_pl.buffer import build_buffer
from llamagym_pl.episode import InvalidActionPolicy, derive_seed
from llamagym_pl.evaluation import evaluate
from llamagym_pl.guards import check_ranges
from llamagym_pl.minibatches import MinibatchSampler
from llamagym_pl.rollout import RolloutCollector
from llamagym_pl.sampling import refuse_truncation
from llamagym_pl.stats import transcript

DEFAULT_STEPS_PER_ENV = 8
"""The epoch size when neither ``steps_per_env`` nor ``episodes_per_env`` is set."""


class RolloutDataModule(L.LightningDataModule):
    """Plays ``num_envs`` envs with the current policy and serves the rollout as minibatches.

    ``train_dataloader`` is called again every epoch (the Trainer runs with
    ``reload_dataloaders_every_n_epochs=1``), so each epoch trains on episodes played by the
    policy as it is at that epoch's start. The rollout plays whole episodes: none is cut, so every
    state of a long episode is trained on and ``rollout/return_mean`` averages whole episodes.
    An env whose episodes may never end needs ``max_episode_steps`` (see
    :meth:`~llamagym_pl.rollout.RolloutCollector.collect`).

    Args:
        agent: the :class:`~llamagym_pl.agent.Agent` (``class_path`` in YAML).
        env_id: Gymnasium env id.
        env_kwargs: keyword arguments for ``gym.make``.
        num_envs: envs played side by side; their replies are generated in one batch.
        steps_per_env: epoch size in turns: each env starts episodes until it has played this
            many turns, and the episode running then plays to its end (default 8 when
            ``episodes_per_env`` is unset too). Without a time limit, an env that plays more than
            100 times this in one rollout stops training with an error naming ``max_episode_steps``.
        episodes_per_env: epoch size in whole episodes per env, instead of ``steps_per_env``
            (set one of the two). No runaway check here: an env whose episodes may never end
            needs ``max_episode_steps``.
        max_new_tokens: reply length limit in tokens.
        temperature: sampling temperature; PPO scores log-probs, entropy and the KL penalty at the
            same temperature (the distribution sampled from).
        top_k: kept so old configs parse; only 0 (off) is accepted: PPO scores replies with the
            full softmax, never a top-k truncated one.
        top_p: kept so old configs parse; only 1.0 (off) is accepted, as for ``top_k``.
        invalid_action: ``random`` or ``fixed``: the action played when a reply is invalid.
        fallback_action: the action for ``invalid_action: fixed``.
        invalid_penalty: reward added on an invalid reply (e.g. -0.1; the logged env return
            excludes it).
        max_episode_steps: optional Gymnasium time limit (truncation, bootstrapped). Needed by an
            env whose episodes may never end: rollouts play every episode to its end.
        seed: run seed; env and sampling seeds derive from (seed, epoch, rank, env, episode).
        num_transcripts: sample conversations logged as text every ``transcript_every`` epochs.
        transcript_every: epochs between transcript logs.
        eval_episodes: greedy episodes per evaluation (Lightning validation, every
            ``trainer.check_val_every_n_epoch`` epochs); always the same seeded deals.
        eval_num_envs: envs played side by side during evaluation.
        max_env_errors: env faults (``step``/``reset`` raising, non-finite reward) tolerated per
            rollout: each drops its episode, resets that env and is counted in
            ``rollout/env_errors``; one more aborts training (see
            :class:`~llamagym_pl.rollout.RolloutCollector`).
        env_timeout_s: seconds an ``env.step``/``env.reset`` may take (None: no limit); one that
            takes longer is interrupted and counts as an env fault, like one that raises (its
            episode dropped, the env reset with its next seed). Uses SIGALRM: Unix, and the main
            thread, where Lightning runs the rollout.
        policy: ``generate`` (the LM writes each reply) or ``score`` (the LM scores the agent's
            candidate actions and samples from the softmax over them; GLAM / TWOSOME, see
            :mod:`llamagym_pl.actions.score`). In ``score`` mode ``temperature`` divides the scores,
            and ``max_new_tokens``/``top_k``/``top_p`` are unused.
        score_normalization: how ``score`` mode turns a candidate's log-likelihood into its
            score: ``token`` (mean per token), ``word`` (sum over its word count) or ``sum``.
        max_prompt_tokens: prompt budget for long episodes, in tokens (None: every prompt holds
            the whole conversation). A turn whose conversation renders longer drops its oldest
            (observation, reply) pairs until it fits; the system prompt and the current
            observation are always kept, and a budget too small for those two alone is an error.
            Training uses exactly the shortened prompts; returns still run over whole episodes.
        group_size: episodes per group for the critic-free estimators
            (``model.advantage_estimator``: ``grpo``, ``gigpo``): envs side by side in groups of
            this many play each episode from the same reset seed (the same initial state), and
            a group's envs play equally many episodes (see
            :class:`~llamagym_pl.rollout.RolloutCollector`). ``num_envs`` must be a multiple of it;
            a group never spans DDP ranks. 1: no groups (GAE). Evaluation never groups.
    """

    def __init__(
        self,
        agent: Agent,
        env_id: str = "Blackjack-v1",
        env_kwargs: dict[str, Any] | None = None,
        num_envs: int = 16,
        steps_per_env: int | None = None,
        episodes_per_env: int | None = None,
        max_new_tokens: int = 8,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        invalid_action: InvalidActionPolicy = "random",
        fallback_action: Any = None,
        invalid_penalty: float = 0.0,
        max_episode_steps: int | None = None,
        seed: int = 0,
        num_transcripts: int = 2,
        transcript_every: int = 10,
        eval_episodes: int = 2000,
        eval_num_envs: int = 100,
        max_env_errors: int = 10,
        env_timeout_s: float | None = None,
        policy: Literal["generate", "score"] = "generate",
        score_normalization: ScoreNormalization = "token",
        max_prompt_tokens: int | None = None,
        group_size: int = 1,
    ) -> None:
        super().__init__()
        if not isinstance(agent, Agent):
            raise TypeError(
                f"data.agent must be an llamagym_pl.Agent subclass instance, got {type(agent).__name__}"
            )
        if steps_per_env is not None and episodes_per_env is not None:
            raise ValueError(
                f"data.steps_per_env={steps_per_env} and data.episodes_per_env={episodes_per_env}: "
                "set one of the two (the other to null)"
            )
        self.save_hyperparameters(ignore=["agent"])
        check_ranges("data.{}", **self.hparams)
        refuse_truncation({"top_k": top_k, "top_p": top_p}, "data.{}")
        self.agent = agent
        self.collector: RolloutCollector | None = None
        self.eval_collector: RolloutCollector | None = None
        self.rollout: Rollout | None = None  # the latest, for the module to prepare and train on

    @property
    def budget(self) -> dict[str, int]:
        """The training rollout's size, as :meth:`RolloutCollector.collect` takes it:
        ``{"steps_per_env": n}`` or ``{"episodes_per_env": n}``."""
        if self.hparams.episodes_per_env is not None:
            return {"episodes_per_env": self.hparams.episodes_per_env}
        steps = self.hparams.steps_per_env
        return {"steps_per_env": DEFAULT_STEPS_PER_ENV if steps is None else steps}

    def make_collector(self, num_envs: int, group_size: int = 1) -> RolloutCollector:
        """A collector with this module's env, agent and policy style (``group_size``: see
        :class:`~llamagym_pl.rollout.RolloutCollector`)."""
        hp = self.hparams
        style = make_style(
            hp.policy,
            self.agent,
            hp.temperature,
            hp.max_new_tokens,
            hp.score_normalization,
            top_k=hp.top_k,
            top_p=hp.top_p,
        )
        names = (
            "invalid_action",
            "fallback_action",
            "invalid_penalty",
            "max_episode_steps",
            "max_env_errors",
            "env_timeout_s",
        )
        settings = {name: hp[name] for name in (*names, "max_prompt_tokens")}
        return RolloutCollector(
            hp.env_id, hp.env_kwargs, self.agent, num_envs, style, **settings, group_size=group_size
        )

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.collector is None:
            self.collector = self.make_collector(self.hparams.num_envs, self.hparams.group_size)
        if stage in ("fit", "validate") and self.eval_collector is None:
            self.eval_collector = self.make_collector(self.hparams.eval_num_envs)

    def teardown(self, stage: str) -> None:
        for collector in (self.collector, self.eval_collector):
            if collector is not None:
                collector.close()
        self.collector = self.eval_collector = None

    def val_dataloader(self) -> DataLoader:
        # One placeholder batch: PPOModule.validation_step plays the evaluation episodes itself.
        return DataLoader([0], batch_size=None)

    def evaluate(self, policy, tokenizer, num_episodes: int | None = None) -> dict:
        """Greedy evaluation on the fixed evaluation deals (see :func:`evaluation.evaluate`)."""
        if self.eval_collector is None:
            self.eval_collector = self.make_collector(self.hparams.eval_num_envs)
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        episodes = num_episodes if num_episodes is not None else self.hparams.eval_episodes
        # Under DDP each rank plays its share of the episodes, on its own seeded deals.
        share = -(-episodes // world)
        return evaluate(policy, tokenizer, self.eval_collector, share, self.hparams.seed, rank)

    def train_dataloader(self) -> DataLoader:
        """Play this epoch's rollout (:attr:`rollout`) and serve it as the module's minibatches."""
        module = self.trainer.lightning_module
        epoch, rank = self.trainer.current_epoch, self.trainer.global_rank
        # The trainer's precision (e.g. bf16-mixed autocast), as in training_step: else the PPO
        # ratio of an unchanged policy would not be 1.
        with self.trainer.precision_plugin.forward_context():
            stats = self.collector.collect(
                module.policy, module.tokenizer, seed=self.hparams.seed, epoch=epoch, rank=rank, **self.budget
            )
        style = self.collector.style
        buffer = build_buffer(module.tokenizer, stats.episodes, temperature=style.temperature)
        style.encode(module.tokenizer, stats.episodes, buffer)
        self.rollout = Rollout(stats, buffer, style, self.transcripts(stats.episodes, epoch))
        sampler = MinibatchSampler(
            buffer.train_lengths,
            module.hparams.num_minibatches,
            module.hparams.update_epochs,
            seed=derive_seed(self.hparams.seed, epoch, rank, 4),
        )
        # batch_size=None: the sampler yields whole minibatches of row (or turn) indices.
        return DataLoader(RolloutDataset(buffer, style), sampler=sampler, batch_size=None)

    def transcripts(self, episodes: list, epoch: int) -> list[str]:
        """A few conversations of the rollout every ``transcript_every`` epochs, for TensorBoard."""
        every, count = self.hparams.transcript_every, self.hparams.num_transcripts
        if count < 1 or every < 1 or epoch % every:
            return []
        picks = random.Random(len(episodes)).sample(episodes, min(count, len(episodes)))
        return [transcript(ep) for ep in picks]
