"""KL penalty toward a reference policy (the model as it was before training).

Why a reward penalty and not a loss term: the reference KL is folded into each turn's reward,
``r_t -= kl_coef * sum_{i in turn t} (log pi(a_i) - log pi_ref(a_i))``, before GAE, as in
Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences") and InstructGPT.
The penalty is then credited through the value function like any other reward, so it shapes
*future* turns too (a turn that drifts the conversation off-distribution pays later), and the
PPO loss itself stays the plain clipped surrogate. A loss term (GRPO-style) would only see the
current token. The per-token sum is the "k1" estimator: unbiased for KL(pi || pi_ref) over the
turn's tokens, though single samples can be negative. In score mode the acting policy is the
softmax over candidate actions, so the penalty is ``log pi(a) - log pi_ref(a)`` of the chosen
candidate under it (see :meth:`llamagym_pl.actions.ScoreStyle.prepare`). Both are taken at the
sampling temperature, the distributions the policy acts with.

:class:`ReferencePolicy` gives pi_ref without a second copy when the policy has a LoRA adapter
(the base model with the adapter switched off *is* the initial policy, since LoRA starts with
B = 0), and from a frozen deep copy otherwise. :class:`KLController` keeps the coefficient,
fixed or adapted toward a target (Ziegler et al. 2019, Sec. 2.2).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from llamagym_pl.policy import PolicyWithValueHead, is_peft


class ReferencePolicy:
    """The reference (initial) policy, to score actions with (:meth:`as_policy`).

    Deliberately not an ``nn.Module``: its copy (if any) is invisible to ``state_dict`` (not
    saved in checkpoints; rebuilt from ``name_or_path`` on resume, since it must equal the
    initial weights), to ``parameters()`` (never in the optimizer) and to ``.train()`` (always
    in eval mode).
    """

    def __init__(self, policy: PolicyWithValueHead) -> None:
        self._lm = policy.lm
        self._value_head = policy.value_head
        self.shares_weights = is_peft(policy.lm)
        self.frozen: nn.Module | None = None  # the initial LM's copy; None: the LoRA base is the reference
        if not self.shares_weights:
            self.frozen = copy.deepcopy(policy.lm).requires_grad_(False).eval()

    @contextlib.contextmanager
    def _reference_lm(self, device: torch.device) -> Iterator[nn.Module]:
        """The initial LM: the frozen copy, or the peft model with its adapter switched off."""
        if self.frozen is not None:
            yield self.frozen.to(device).eval()  # .to is a no-op after the first call
            return
        was_training = self._lm.training
        self._lm.eval()  # no LoRA dropout (it is bypassed anyway with the adapter off)
        try:
            with self._lm.disable_adapter():
                yield self._lm
        finally:
            self._lm.train(was_training)

    @contextlib.contextmanager
    def as_policy(self, device: torch.device) -> Iterator[Any]:
        """The reference as a policy (its LM with our value head, in eval mode) for the block: each
        style scores its actions with the same forward as the policy's, under no grad (generated
        replies: :func:`llamagym_pl.actions.rows.row_forward`, which computes logits at the reply
        tokens only; scored candidates: :func:`llamagym_pl.actions.scoring.candidate_forward`)."""
        with self._reference_lm(device) as lm:
            yield SimpleNamespace(lm=lm, value_head=self._value_head, training=False)


def turn_kl(
    logprobs: Tensor, ref_logprobs: Tensor, action_mask: Tensor, turn_index: Tensor, num_turns: int
) -> Tensor:
    """Per-turn sum of ``logprobs - ref_logprobs`` over the turn's response tokens.

    logprobs, ref_logprobs: (E, L) token log-probs (position i scores token i). action_mask:
    (E, L) bool. turn_index: (E, L) the turn of each response token, -1 elsewhere.
    Returns (E, num_turns) float32; 0 for turns without tokens.
    """
    diff = torch.where(action_mask.bool(), logprobs.float() - ref_logprobs.float(), 0.0)  # (E, L)
    out = torch.zeros(logprobs.shape[0], num_turns, dtype=torch.float32, device=logprobs.device)
    return out.scatter_add_(1, turn_index.clamp(min=0), diff)  # (E, T)


class KLController:
    """The reference-KL coefficient: fixed, or adaptive toward ``target``.

    Adaptive (Ziegler et al. 2019, eq. 2; TRL's ``AdaptiveKLController``): after each rollout
    with measured KL ``kl`` over ``n_steps`` actions,

        kl_coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon

    so the coefficient grows while the policy drifts past the target and shrinks below it, by at
    most 20% per ``horizon`` actions. The current value is training state: it is saved in and
    restored from checkpoints (``state_dict`` / ``load_state_dict``).
    """

    def __init__(self, kl_coef: float, target: float | None = None, horizon: int = 10_000) -> None:
        if kl_coef < 0:
            raise ValueError(f"model.kl_coef={kl_coef} must be >= 0 (0 turns the KL penalty off)")
        if target is not None and (target <= 0 or kl_coef == 0):
            raise ValueError(
                f"model.target_kl_ref={target} needs target > 0 and a starting kl_coef > 0 "
                f"(got {kl_coef}): the adaptive controller only rescales the coefficient"
            )
        if horizon <= 0:
            raise ValueError(f"model.kl_horizon={horizon} must be > 0")
        self.value = float(kl_coef)
        self.target = target
        self.horizon = horizon

    def update(self, kl: float, n_steps: int) -> None:
        if self.target is None:
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        return {"kl_coef": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["kl_coef"])
