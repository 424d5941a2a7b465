"""Exact expected return of a Blackjack checkpoint's greedy policy, without sampling noise.

``python bench/blackjack_exact.py --config experiments/blackjack.yaml --ckpt_path <ckpt> [...] [fit flags]``

A 20,000-episode evaluation has a standard error of ~0.007, a third of the gap between "stick at
>= 17" (-0.079) and optimal (-0.0466). Here the policy's action in every observation
``(player sum, dealer card, usable ace)`` is read from the model once, and its expected return
is computed by dynamic programming over Gymnasium ``Blackjack-v1``'s rules (infinite deck, dealer
draws to 17 and stands on soft 17, ``natural=False, sab=False``). It also prints the cells where
the greedy policy differs from the optimal one. A measuring tool only: nothing in training uses it.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable (bench.*)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CARDS = {card: (4 / 13 if card == 10 else 1 / 13) for card in range(1, 11)}
Policy = Callable[[int, int, int], float]
"""``policy(player_value, dealer_card, usable_ace) -> P(hit)``; ``None`` for the optimal policy."""


def hand_value(total: int, ace: bool) -> int:
    return total + 10 if ace and total + 10 <= 21 else total


@functools.cache
def dealer_outcomes(total: int, ace: bool) -> dict[int, float]:
    """Distribution of the dealer's final value from a hand (0: bust)."""
    value = hand_value(total, ace)
    if value >= 17:
        return {value if value <= 21 else 0: 1.0}
    out: dict[int, float] = {}
    for card, p in CARDS.items():
        if total + card > 21:
            out[0] = out.get(0, 0.0) + p
            continue
        for final, q in dealer_outcomes(total + card, ace or card == 1).items():
            out[final] = out.get(final, 0.0) + p * q
    return out


@functools.cache
def stand_value(player: int, dealer_card: int) -> float:
    """Expected reward of standing on ``player`` against the dealer's shown card."""
    out = 0.0
    for hidden, p in CARDS.items():
        for final, q in dealer_outcomes(dealer_card + hidden, dealer_card == 1 or hidden == 1).items():
            out += p * q * ((final < player) - (final > player))
    return out


def expected_return(policy: Policy | None) -> float:
    """Expected return per episode of ``policy`` (exact; ``None``: the optimal policy)."""

    @functools.cache
    def value(total: int, ace: bool, dealer_card: int) -> float:
        player = hand_value(total, ace)
        stand = stand_value(player, dealer_card)
        hit = sum(
            p * (-1.0 if total + card > 21 else value(total + card, ace or card == 1, dealer_card))
            for card, p in CARDS.items()
        )
        if policy is None:
            return max(stand, hit)
        p_hit = policy(player, dealer_card, int(ace and total + 10 <= 21))
        return p_hit * hit + (1 - p_hit) * stand

    return sum(
        CARDS[a] * CARDS[b] * CARDS[d] * value(a + b, a == 1 or b == 1, d)
        for a in CARDS
        for b in CARDS
        for d in CARDS
    )


@functools.cache
def _optimal_value(total: int, ace: bool, dealer_card: int) -> float:
    return max(stand_value(hand_value(total, ace), dealer_card), _hit_value(total, ace, dealer_card))


def _hit_value(total: int, ace: bool, dealer_card: int) -> float:
    """Expected return of hitting once, then playing optimally."""
    return sum(
        p * (-1.0 if total + card > 21 else _optimal_value(total + card, ace or card == 1, dealer_card))
        for card, p in CARDS.items()
    )


def optimal_action(player: int, dealer_card: int, usable: int) -> int | None:
    """1 hit / 0 stick, the optimal action in an observation (None: both exactly as good)."""
    # A hand of value v with a usable ace has a raw total of v - 10; without one, the ace (if
    # any) can never count 11 again, so the hand plays like a raw total of v.
    total, ace = (player - 10, True) if usable else (player, False)
    gap = _hit_value(total, ace, dealer_card) - stand_value(player, dealer_card)
    return None if abs(gap) < 1e-12 else int(gap > 0)


OBSERVATIONS = [(v, d, u) for u in (0, 1) for v in range(12 if u else 4, 22) for d in range(1, 11)]


def greedy_actions(config: str, ckpt_path: str, overrides: list[str] = ()) -> dict[tuple[int, int, int], int]:
    """The checkpoint's greedy action in every observation, read as evaluation plays it;
    ``overrides``: fit flags the run was trained with beyond its config (e.g.
    ``--model.advantage_estimator grpo``)."""
    from bench.policy_probe import candidate_logits, first_turn_conversations, load_policy

    module, data = load_policy(config, ckpt_path, overrides)
    policy, tokenizer, agent = module.policy, module.tokenizer, data.agent
    env_kwargs = data.hparams.env_kwargs or {}
    if data.hparams.env_id != "Blackjack-v1" or env_kwargs.get("natural") or env_kwargs.get("sab", True):
        raise SystemExit("blackjack_exact: the config must play Blackjack-v1 with natural: false, sab: false")
    conversations = first_turn_conversations(module, data, OBSERVATIONS)
    if data.hparams.policy == "score":
        logits = candidate_logits(module, data, conversations)
        return dict(zip(OBSERVATIONS, logits.argmax(-1).tolist(), strict=True))
    # Generate mode: the greedy reply as evaluation generates it, parsed (-1: invalid).
    style = data.make_collector(1).style
    replies = [
        r.text for r in style.reply(policy, tokenizer, conversations, [(o, {}) for o in OBSERVATIONS], True)
    ]
    actions = {}
    for obs, reply in zip(OBSERVATIONS, replies, strict=True):
        try:
            actions[obs] = int(agent.extract_action(reply))
        except ValueError:
            actions[obs] = -1
    return actions


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--ckpt_path", required=True, nargs="+", help="one or more checkpoints")
    args, overrides = parser.parse_known_args(
        argv
    )  # the rest: fit flags, e.g. --model.advantage_estimator grpo
    sys.argv = sys.argv[:1]  # LightningCLI reads sys.argv when given args too
    stick17 = expected_return(lambda v, d, u: float(v < 17))
    print(
        f"reference: optimal {expected_return(None):+.4f}, stick at >= 17 {stick17:+.4f}, "
        f"always stick {expected_return(lambda v, d, u: 0.0):+.4f}"
    )
    for ckpt in args.ckpt_path:
        actions = greedy_actions(args.config, ckpt, overrides)
        invalid = [o for o, a in actions.items() if a not in (0, 1)]
        if invalid:
            print(f"{ckpt}: {len(invalid)} observations get an invalid greedy reply; no exact value")
            continue
        ret = expected_return(lambda v, d, u, actions=actions: float(actions[(v, d, u)]))
        wrong = [o for o in OBSERVATIONS if optimal_action(*o) not in (None, actions[o])]
        print(
            f"{ckpt}: exact greedy return {ret:+.4f}; differs from optimal in {len(wrong)} of "
            f"{len(OBSERVATIONS)} observations: "
            + " ".join(f"{v}{'s' if u else ''}v{d}" for v, d, u in wrong)  # 18sv9: soft 18 vs a 9
        )


if __name__ == "__main__":
    main()
