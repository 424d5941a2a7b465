"""`PPOModule`: the policy LM with its value head, trained with our clipped PPO loss.

One Lightning epoch is one PPO iteration: :class:`~llamagym_pl.datamodule.RolloutDataModule`
plays a fresh rollout with the current policy and hands it over (its ``rollout``: the buffer, its
statistics and the action style), :meth:`PPOModule.on_train_epoch_start` prepares it (old
log-probs, values, KL, advantages with GAE, or with a critic-free estimator over groups of
episodes), then every training batch is one minibatch step of the clipped surrogate + value +
entropy loss (no value term without a critic).
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.precision import HalfPrecision, Precision
from torch import Tensor

from llamagym_pl import ppo
from llamagym_pl.actions import Rollout
from llamagym_pl.estimators import EstimatorName, group_estimator
from llamagym_pl.guards import NonFiniteLoss, check_checkpoint_fits, check_ranges
from llamagym_pl.kl import KLController, ReferencePolicy
from llamagym_pl.loading import LoadOptions, Quantization, build_policy, load_tokenizer
from llamagym_pl.policy import drop_frozen, fill_frozen
from llamagym_pl.stats import RolloutStats, metrics_from_totals, rollout_totals
from llamagym_pl.update import Minibatch, make_optimizer, minibatch_loss, minibatch_size, prepare_rollout


class PPOModule(L.LightningModule):
    """PPO over multi-turn LLM conversations.

    Args:
        name_or_path: Hugging Face model id, local directory, or ``tiny`` (offline default:
            a small Llama built locally and trained from scratch).
        dtype: weights dtype: ``float32``, ``bfloat16``, ``float16`` or ``auto``.
        trust_remote_code: allow model code from the hub (off: it runs arbitrary code).
        learning_rate: AdamW learning rate.
        lr_schedule: ``constant``, or ``linear`` decay to 0 over ``trainer.max_epochs``.
        weight_decay: AdamW weight decay.
        adam_eps: AdamW epsilon (1e-5 as in CleanRL).
        gamma: discount per turn.
        gae_lambda: GAE lambda.
        update_epochs: passes over each rollout.
        num_minibatches: minibatches per pass (a fixed count: the same number of optimizer steps
            on every DDP rank).
        clip_coef: PPO ratio clip.
        clip_vloss: clip the value update around the old values.
        vf_coef: value loss weight.
        ent_coef: entropy bonus weight (over response tokens).
        max_grad_norm: gradient norm clip.
        target_kl: stop this epoch's remaining updates once approx-KL exceeds it (None: never).
        norm_adv: normalize advantages to zero mean and unit variance, once per rollout over every
            turn of every DDP rank (not per minibatch: a per-minibatch mean is an action-dependent
            baseline wherever minibatches depend on lengths, which depend on the actions).
        prepare_batch_size: episode rows (score mode: turns) per forward pass of the preparation
            pass (old log-probs, values), no grad.
        quantization: ``none``, ``4bit`` (NF4, QLoRA) or ``8bit`` base weights via bitsandbytes;
            needs ``lora_r > 0``.
        quant_compute_dtype: dtype of 4-bit matmuls (None: ``dtype``).
        gradient_checkpointing: recompute activations in backward to save memory.
        lora_r: LoRA rank (0: off, every LM weight trains). With LoRA only the adapter and the
            value head train, and checkpoints hold only those (the base is reloaded).
        lora_alpha: LoRA scaling numerator (the update is scaled by ``lora_alpha / lora_r``).
        lora_dropout: dropout on the LoRA input, saved in the adapter's config only: PPO trains
            with every dropout off, so that its ratios are exact
            (:func:`~llamagym_pl.policy.disable_dropout`).
        lora_target_modules: module names to adapt, or ``all-linear`` (every linear layer but
            the output head, whatever the architecture calls them).
        kl_coef: weight of the KL penalty to the initial policy, subtracted from each turn's
            reward (0: off). The reference is the LoRA base with the adapter disabled, or a
            frozen copy of the initial model without LoRA (see :mod:`llamagym_pl.kl`).
        target_kl_ref: adapt ``kl_coef`` toward this per-turn KL (None: fixed coefficient).
        kl_horizon: the adaptive controller's horizon, in turns.
        max_nonfinite_steps: a minibatch whose loss is NaN/inf is skipped (no update; counted in
            ``train/nonfinite_steps``, and logged); this many in a row abort training.
        advantage_estimator: ``gae`` (a value head, GAE), or a critic-free one over groups of
            ``data.group_size`` episodes from one initial state (:mod:`llamagym_pl.estimators`):
            ``grpo`` (each episode's return against its group's) or ``gigpo`` (that, plus each
            turn's return-to-go against the turns of its group from the same observation). The
            critic-free ones build no value head and have no value loss (``vf_coef``,
            ``clip_vloss``, ``gae_lambda`` and ``norm_adv`` unused).
        group_std_norm: divide group advantages by the group's standard deviation (GRPO);
            False: only subtract the group mean (Dr. GRPO).
        step_advantage_weight: ``gigpo``'s weight of the step-level (anchor-state) advantage.
    """

    def __init__(
        self,
        name_or_path: str = "tiny",
        dtype: str = "float32",
        trust_remote_code: bool = False,
        learning_rate: float = 3e-4,
        lr_schedule: Literal["constant", "linear"] = "constant",
        weight_decay: float = 0.0,
        adam_eps: float = 1e-5,
        gamma: float = 1.0,
        gae_lambda: float = 0.95,
        update_epochs: int = 4,
        num_minibatches: int = 4,
        clip_coef: float = 0.2,
        clip_vloss: bool = True,
        vf_coef: float = 0.5,
        ent_coef: float = 0.0,
        max_grad_norm: float = 1.0,
        target_kl: float | None = None,
        norm_adv: bool = True,
        prepare_batch_size: int = 64,
        quantization: Quantization = "none",
        quant_compute_dtype: str | None = None,
        gradient_checkpointing: bool = False,
        lora_r: int = 0,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        lora_target_modules: str | list[str] = "all-linear",
        kl_coef: float = 0.0,
        target_kl_ref: float | None = None,
        kl_horizon: int = 10_000,
        max_nonfinite_steps: int = 3,
        advantage_estimator: EstimatorName = "gae",
        group_std_norm: bool = True,
        step_advantage_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_ranges("model.{}", **self.hparams)
        self._nonfinite = NonFiniteLoss(max_nonfinite_steps)
        self.tokenizer = load_tokenizer(name_or_path, trust_remote_code)
        # build_policy's arguments are hyperparameters of the same names (name_or_path, dtype, lora_r ...).
        policy_args = [
            "name_or_path",
            "lora_r",
            "lora_alpha",
            "lora_dropout",
            "lora_target_modules",
            *LoadOptions.__annotations__,
        ]
        self.estimator = group_estimator(advantage_estimator, group_std_norm, step_advantage_weight)
        critic = self.estimator is None
        self.policy = build_policy(**{name: self.hparams[name] for name in policy_args}, critic=critic)
        self.kl_ctl = KLController(kl_coef, target_kl_ref, kl_horizon)
        # Not a submodule: never saved, trained or switched to train mode (see ReferencePolicy).
        self.reference = ReferencePolicy(self.policy) if kl_coef > 0 else None
        self.rollout: Rollout | None = None  # this epoch's, from the DataModule
        self._train_metrics = EpochSums()  # this epoch's minibatch diagnostics
        self._stop_epoch = False

    def on_train_epoch_start(self) -> None:
        self._stop_epoch = False
        self._nonfinite.skipped = 0
        self._train_metrics = EpochSums()
        self.rollout = rollout = self.trainer.datamodule.rollout
        metrics = self._rollout_metrics(rollout.stats)
        hp, kl_coef = self.hparams, self.kl_ctl.value
        # Old log-probs under the trainer's precision (autocast), as the training step's new ones.
        with self.trainer.precision_plugin.forward_context():
            prepared = prepare_rollout(
                self.policy,
                rollout.buffer,
                rollout.style,
                hp.gamma,
                hp.gae_lambda,
                hp.prepare_batch_size,
                self.reference,
                kl_coef,
                norm_adv=hp.norm_adv,
                reduce=self._sum_over_ranks,
                estimator=self.estimator,
            )
        metrics.update(prepared)
        if self.reference is not None:
            metrics["train/kl_coef"] = kl_coef
            # Every DDP rank must adapt the coefficient identically: use the ranks' mean KL.
            kl = torch.tensor(metrics["train/kl_ref"], device=self.device)
            kl = self.trainer.strategy.reduce(kl, reduce_op="mean")
            turns = int(rollout.buffer.turn_mask.sum()) * self.trainer.world_size
            self.kl_ctl.update(float(kl), n_steps=turns)
        # Rollout metrics are already global; the preparation's means differ per rank: average them.
        self.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=True)
        self._log_transcripts(rollout.transcripts)
        if "rollout/return_mean" in metrics:
            # Shown live in the progress bar; the full name is in TensorBoard.
            self.log("return", metrics["rollout/return_mean"], prog_bar=True, logger=False, on_epoch=True)

    def _rollout_metrics(self, stats: RolloutStats) -> dict[str, float]:
        """Rollout metrics over the episodes of every DDP rank (sums reduced, then averaged)."""
        totals = rollout_totals(stats)
        world = self.trainer.world_size
        if world > 1:
            packed = torch.tensor(list(totals.values()), dtype=torch.float64, device=self.device)
            packed = self.trainer.strategy.reduce(packed, reduce_op="sum")
            totals = dict(zip(totals, packed.tolist(), strict=True))
        return metrics_from_totals(totals, world)

    def _sum_over_ranks(self, value: Tensor) -> Tensor:
        """``value`` summed over DDP ranks (advantage moments: one normalization per rollout)."""
        if self.trainer.world_size == 1:
            return value
        return self.trainer.strategy.reduce(value.to(self.device), reduce_op="sum").cpu()

    def _any_rank(self, flag: bool) -> bool:
        """True if ``flag`` is true on any DDP rank: skip decisions must agree, or DDP hangs."""
        if self.trainer.world_size == 1:
            return flag
        value = torch.tensor(float(flag), device=self.device)
        return bool(self.trainer.strategy.reduce(value, reduce_op="sum") > 0)

    def _log_transcripts(self, transcripts: list[str]) -> None:
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                for i, text in enumerate(transcripts):
                    logger.experiment.add_text(f"transcripts/{i}", text, self.global_step)

    # ----------------------------------------------------------------- PPO update
    def training_step(self, batch: Minibatch, batch_idx: int) -> Tensor | None:
        if self._stop_epoch:
            return None  # target_kl reached: Lightning skips backward and the optimizer step
        hp = self.hparams
        loss, metrics = minibatch_loss(
            self.rollout.style, self.policy, batch, hp.clip_coef, hp.clip_vloss, hp.vf_coef, hp.ent_coef
        )
        # Under DDP a NaN on one rank must skip the step on all of them (else DDP hangs).
        seen = loss if not self._any_rank(not bool(torch.isfinite(loss))) else loss.new_tensor(float("nan"))
        if self._nonfinite.skip(seen if torch.isfinite(loss) else loss, self.current_epoch, batch_idx):
            return None  # Lightning skips backward and the optimizer step
        approx_kl = metrics["train/approx_kl"]
        if hp.target_kl is not None and self._any_rank(bool(approx_kl > hp.target_kl)):
            self._stop_epoch = True
        self._train_metrics.add(metrics, minibatch_size(batch))
        if self.trainer.progress_bar_callback is not None:
            self.log("kl", approx_kl, prog_bar=True, on_step=True, on_epoch=False, logger=False)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        results = self.trainer.datamodule.evaluate(self.policy, self.tokenizer)
        metrics = {f"eval/{k}": float(v) for k, v in results.items()}
        # Each rank evaluates its own share of seeded deals; the logged numbers are rank means.
        self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=1, sync_dist=True)
        self.log(
            "eval", metrics["eval/return_mean"], prog_bar=True, logger=False, batch_size=1, sync_dist=True
        )

    def on_train_epoch_end(self) -> None:
        means = self._train_metrics.means()
        if means is not None:
            # Each metric's mean over the epoch's minibatches, weighted by their sizes and over
            # every DDP rank, as Lightning's epoch mean of per-step logs: one log, no per-step sync.
            metrics, size = means
            self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=size, sync_dist=True)
        buf = self.rollout.buffer
        if self.policy.has_critic:
            ev = ppo.explained_variance(buf.old_values, buf.returns, buf.turn_mask)
            self.log("train/explained_variance", ev, on_step=False, on_epoch=True, sync_dist=True)
        self.log("train/learning_rate", self.trainer.optimizers[0].param_groups[0]["lr"], on_epoch=True)
        self.log("train/nonfinite_steps", float(self._nonfinite.skipped), on_epoch=True)
        # The last step's gradients would stay allocated through the next rollout and preparation
        # (a model's size again); every step's backward starts from None anyway.
        for optimizer in self.trainer.optimizers:
            optimizer.zero_grad(set_to_none=True)

    # ----------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["kl_controller"] = self.kl_ctl.state_dict()
        if self.hparams.lora_r > 0:
            checkpoint["state_dict"] = drop_frozen(self, checkpoint["state_dict"])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "kl_controller" in checkpoint:
            self.kl_ctl.load_state_dict(checkpoint["kl_controller"])
        if "state_dict" not in checkpoint:
            return  # FSDP's strategy has loaded (and removed) the weights itself
        source = self._trainer.ckpt_path if self._trainer is not None else "the checkpoint"
        check_checkpoint_fits(self, checkpoint, source)
        if self.hparams.lora_r > 0:
            # The frozen base was rebuilt from name_or_path in __init__: keep its weights.
            checkpoint["state_dict"] = fill_frozen(self, checkpoint["state_dict"])

    # ----------------------------------------------------------------- optimization
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        params = [p for p in self.policy.parameters() if p.requires_grad]
        max_epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 0
        # Fused only under plain precision: Lightning's mixed precision (AMP, FSDP's) cannot clip a
        # fused optimizer's gradients, which unscale inside its step.
        fused = type(self.trainer.precision_plugin) in (Precision, HalfPrecision)
        optimizer, scheduler = make_optimizer(
            params, hp.learning_rate, hp.adam_eps, hp.weight_decay, hp.lr_schedule, max_epochs, fused
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        # max_grad_norm is a PPO hyperparameter, so it lives here rather than on the Trainer.
        self.clip_gradients(
            optimizer, gradient_clip_val=self.hparams.max_grad_norm, gradient_clip_algorithm="norm"
        )


class EpochSums:
    """An epoch's minibatch diagnostics, summed as Lightning's ``on_epoch`` logs with a
    ``batch_size`` sum them (in float32, ``value * size`` step by step), without its per-step
    work: one ``log_dict`` at the epoch's end gives the same weighted means."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.size = 0

    def add(self, metrics: dict[str, Tensor], size: int) -> None:
        for name, value in metrics.items():
            value = value.detach().float() * size
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.size += size

    def means(self) -> tuple[dict[str, Tensor], int] | None:
        """``({name: weighted mean}, total size)``, or None when no minibatch was logged."""
        if not self.size:
            return None
        return {name: total / self.size for name, total in self.sums.items()}, self.size
