"""`RolloutDataModule`: fresh, whole episodes from Gymnasium envs every epoch."""

from __future__ import annotations

import random
from typing import Any, Literal

import lightning as L
from torch.utils.data import DataLoader

from llamagym_pl.agent import Agent
from llamagym_pl.buffer import MinibatchSampler, RolloutBuffer, RolloutDataset, build_buffer
from llamagym_pl.evaluation import evaluate
from llamagym_pl.rollout import InvalidActionPolicy, RolloutCollector, RolloutStats, derive_seed
from llamagym_pl.sampling import refuse_truncation
from llamagym_pl.score_buffer import ScoreBuffer, ScoreDataset, build_score_buffer
from llamagym_pl.scoring import ScoreNormalization
from llamagym_pl.scoring_rollout import ScoringCollector

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
        policy: ``generate`` (the LM writes each reply) or ``score`` (the LM scores the agent's
            candidate actions and samples from the softmax over them; GLAM / TWOSOME, see
            :mod:`llamagym_pl.scoring`). In ``score`` mode ``temperature`` divides the scores,
            and ``max_new_tokens``/``top_k``/``top_p`` are unused.
        score_normalization: how ``score`` mode turns a candidate's log-likelihood into its
            score: ``token`` (mean per token), ``word`` (sum over its word count) or ``sum``.
        max_prompt_tokens: prompt budget for long episodes, in tokens (None: every prompt holds
            the whole conversation). A turn whose conversation renders longer drops its oldest
            (observation, reply) pairs until it fits; the system prompt and the current
            observation are always kept, and a budget too small for those two alone is an error.
            Training uses exactly the shortened prompts; returns still run over whole episodes.
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
        policy: Literal["generate", "score"] = "generate",
        score_normalization: ScoreNormalization = "token",
        max_prompt_tokens: int | None = None,
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
        for name, value in {
            "num_envs": num_envs,
            "steps_per_env": steps_per_env,
            "episodes_per_env": episodes_per_env,
            "max_new_tokens": max_new_tokens,
        }.items():
            if value is not None and value < 1:
                raise ValueError(f"data.{name}={value} must be >= 1")
        if max_prompt_tokens is not None and max_prompt_tokens < 1:
            raise ValueError(f"data.max_prompt_tokens={max_prompt_tokens} must be >= 1 (or null: no budget)")
        if max_env_errors < 0:
            raise ValueError(f"data.max_env_errors={max_env_errors} must be >= 0 (0: abort on the first)")
        if temperature <= 0:
            raise ValueError(f"data.temperature={temperature} must be > 0 (use greedy evaluation instead)")
        refuse_truncation({"top_k": top_k, "top_p": top_p}, "data.{}")
        self.save_hyperparameters(ignore=["agent"])
        self.agent = agent
        self.collector: RolloutCollector | None = None
        self.eval_collector: RolloutCollector | None = None
        self.buffer: RolloutBuffer | None = None
        self.score_buffer: ScoreBuffer | None = None  # policy: score only
        self.last_stats: RolloutStats | None = None

    @property
    def budget(self) -> dict[str, int]:
        """The training rollout's size, as :meth:`RolloutCollector.collect` takes it:
        ``{"steps_per_env": n}`` or ``{"episodes_per_env": n}``."""
        if self.hparams.episodes_per_env is not None:
            return {"episodes_per_env": self.hparams.episodes_per_env}
        steps = self.hparams.steps_per_env
        return {"steps_per_env": DEFAULT_STEPS_PER_ENV if steps is None else steps}

    def make_collector(self, num_envs: int) -> RolloutCollector:
        """A collector with this module's env, agent and generation settings."""
        hp = self.hparams
        scoring = {"normalization": hp.score_normalization} if hp.policy == "score" else {}
        return (ScoringCollector if scoring else RolloutCollector)(
            env_id=hp.env_id,
            env_kwargs=hp.env_kwargs,
            agent=self.agent,
            num_envs=num_envs,
            max_new_tokens=hp.max_new_tokens,
            temperature=hp.temperature,
            top_k=hp.top_k,
            top_p=hp.top_p,
            invalid_action=hp.invalid_action,
            fallback_action=hp.fallback_action,
            invalid_penalty=hp.invalid_penalty,
            max_episode_steps=hp.max_episode_steps,
            max_env_errors=hp.max_env_errors,
            max_prompt_tokens=hp.max_prompt_tokens,
            **scoring,
        )

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.collector is None:
            self.collector = self.make_collector(self.hparams.num_envs)
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
        module = self.trainer.lightning_module
        epoch = self.trainer.current_epoch
        rank = self.trainer.global_rank
        # The trainer's precision (e.g. bf16-mixed autocast), as in training_step: else the PPO
        # ratio of an unchanged policy would not be 1.
        with self.trainer.precision_plugin.forward_context():
            stats = self.collector.collect(
                module.policy,
                module.tokenizer,
                seed=self.hparams.seed,
                epoch=epoch,
                rank=rank,
                **self.budget,
            )
        self.last_stats = stats
        self.buffer = build_buffer(module.tokenizer, stats.episodes, temperature=self.hparams.temperature)
        dataset, lengths = RolloutDataset(self.buffer), self.buffer.train_lengths
        if self.hparams.policy == "score":  # minibatches of turns: one scored action each
            norm = self.hparams.score_normalization
            self.score_buffer = build_score_buffer(module.tokenizer, stats.episodes, self.buffer, norm)
            dataset, lengths = ScoreDataset(self.score_buffer), self.score_buffer.turn_lengths
        sampler = MinibatchSampler(
            lengths,
            module.hparams.num_minibatches,
            module.hparams.update_epochs,
            seed=derive_seed(self.hparams.seed, epoch, rank, 4),
        )
        # batch_size=None: the sampler yields whole minibatches of row (or turn) indices.
        return DataLoader(dataset, sampler=sampler, batch_size=None)

    def sample_transcripts(self, k: int) -> list[str]:
        """A few conversations of the last rollout, rendered for TensorBoard's text tab."""
        if self.last_stats is None:
            return []
        episodes = self.last_stats.episodes
        picks = random.Random(len(episodes)).sample(episodes, min(k, len(episodes)))
        out = []
        for ep in picks:
            lines = [f"**system**: {ep.system_prompt}"]
            for t, response in enumerate(ep.responses):
                lines.append(f"**user**: {ep.observations[t]}")
                flag = " *(invalid)*" if ep.invalid[t] else ""
                lines.append(f"**assistant**: {response}{flag}  (reward {ep.rewards[t]:+.2f})")
            lines.append(f"return {ep.env_return:+.2f}, {'terminated' if ep.terminated else 'truncated'}")
            out.append("  \n".join(lines))
        return out
