"""`llamagym_pl.decode`: our own decoding for the settings PPO trains with gives ``generate``'s
greedy replies token for token, samples exactly ``softmax(logits / temperature)``, and leaves
every other setting to ``generate`` (issue #15)."""

from __future__ import annotations

import pytest
import torch
from model_helpers import FAMILIES, build_family_model
from transformers import PreTrainedTokenizerBase

from llamagym_pl import decode as decode_module
from llamagym_pl.chat import left_pad
from llamagym_pl.decode import decode, plain_decoding, sample_tokens
from llamagym_pl.loading import build_policy
from llamagym_pl.policy import PolicyWithValueHead
from llamagym_pl.sampling import build_generation_config, generate_from_settings

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROWS = [[5, 6, 7, 8, 9, 10], [5, 6, 7], [5, 6, 7, 11, 12], [13, 6]]  # left padded: lengths differ


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def policy(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> PolicyWithValueHead:
    tokenizer: PreTrainedTokenizerBase = request.getfixturevalue(FAMILIES[request.param])
    model_dir = build_family_model(request.param, tokenizer, tmp_path_factory.mktemp("m"))
    return build_policy(str(model_dir)).eval()


def hf_generate(policy: PolicyWithValueHead, ids, mask, **settings) -> torch.Tensor:
    config = build_generation_config(settings)
    return policy.lm.generate(input_ids=ids, attention_mask=mask, generation_config=config)


@pytest.mark.parametrize("share_prefix", [False, True], ids=["whole", "prefix"])
def test_greedy_replies_are_generates_token_for_token(
    policy: PolicyWithValueHead, share_prefix: bool
) -> None:
    ids, mask = left_pad(ROWS, 0)
    settings = {"do_sample": False, "max_new_tokens": 6, "pad_token_id": 0}
    free = hf_generate(policy, ids, mask, **settings, eos_token_id=None)
    assert free.shape == (4, ids.shape[1] + 6)
    # An end-of-sequence id that row 0 writes second: it stops there and pads, the others run on.
    eos = int(free[0, ids.shape[1] + 1])
    for eos_id in (None, eos, [99, eos]):
        expected = hf_generate(policy, ids, mask, **settings, eos_token_id=eos_id)
        got = generate_from_settings(
            policy, ids, mask, share_prefix=share_prefix, **settings, eos_token_id=eos_id
        )
        assert torch.equal(got, expected)
    ended = hf_generate(policy, ids, mask, **settings, eos_token_id=eos)
    k = ids.shape[1] + free[0, ids.shape[1] :].tolist().index(eos)  # where row 0 first writes it
    assert ended[0, k] == eos and (ended[0, k + 1 :] == 0).all()  # kept, then padding


def test_decoding_stops_when_every_row_has_ended(policy: PolicyWithValueHead) -> None:
    ids, mask = left_pad(ROWS[:1], 0)
    first = int(decode(policy.lm, ids, mask, 1, do_sample=False)[0, -1])
    out = decode(policy.lm, ids, mask, 6, do_sample=False, eos_token_id=first, pad_token_id=0)
    assert out.shape == (1, ids.shape[1] + 1) and out[0, -1] == first  # the end token kept, then stop


def test_sharded_weights_decode_every_step(policy: PolicyWithValueHead, monkeypatch) -> None:
    """Under FSDP over several processes each forward gathers weights on every rank: no rank may
    stop early, so the rows that ended write padding to the last step."""
    ids, mask = left_pad(ROWS[:1], 0)
    first = int(decode(policy.lm, ids, mask, 1, do_sample=False)[0, -1])
    monkeypatch.setattr(decode_module, "gathers_weights", lambda lm: True)
    out = decode(policy.lm, ids, mask, 4, do_sample=False, eos_token_id=first, pad_token_id=0)
    assert out[0, ids.shape[1] :].tolist() == [first, 0, 0, 0]


def test_settings_beyond_the_plain_softmax_go_to_generate(policy: PolicyWithValueHead, monkeypatch) -> None:
    ids, mask = left_pad(ROWS, 0)
    base = {"do_sample": True, "max_new_tokens": 2, "pad_token_id": 0, "eos_token_id": 1}
    calls: list[str] = []
    original = policy.lm.generate
    monkeypatch.setattr(policy.lm, "generate", lambda **kw: calls.append("generate") or original(**kw))
    generate_from_settings(policy, ids, mask, **base)
    generate_from_settings(policy, ids, mask, **base, temperature=0.7)
    generate_from_settings(policy, ids, mask, **base | {"do_sample": False})
    assert calls == []  # ours
    others = ({"top_p": 0.9}, {"top_k": 5}, {"repetition_penalty": 1.3}, {"num_beams": 2, "do_sample": False})
    for extra in others:
        generate_from_settings(policy, ids, mask, **base | extra)
    assert calls == ["generate"] * 4
    config = build_generation_config({"do_sample": True, "pad_token_id": 0})  # no length: generate's default
    assert not plain_decoding(policy.lm, config, ids.shape[1])


def test_samples_follow_the_softmax_at_the_temperature() -> None:
    logits = torch.tensor([[2.0, 0.5, -1.0, float("-inf"), 1.0]]).expand(200_000, -1)
    for temperature in (1.0, 0.5, 2.0):
        torch.manual_seed(0)
        counts = torch.bincount(sample_tokens(logits, temperature), minlength=5).double()
        p = torch.softmax(logits[0] / temperature, -1).double()
        n = logits.shape[0]
        assert counts[3] == 0  # probability 0: never drawn
        sigma = (n * p * (1 - p)).sqrt().clamp(min=1.0)
        assert ((counts - n * p).abs() <= 5 * sigma).all(), (temperature, counts / n, p)


def test_samples_by_hand_inverted_cdf() -> None:
    """A uniform u picks the first token whose cumulative probability exceeds u * total."""
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    torch.manual_seed(3)
    u = torch.rand(1, 1, dtype=torch.float64).item()
    expected = next(i for i, c in enumerate([0.1, 0.3, 0.6, 1.0]) if u < c)
    torch.manual_seed(3)
    assert sample_tokens(logits).tolist() == [expected]


def test_logits_that_are_not_finite_are_refused_in_one_line() -> None:
    with pytest.raises(ValueError, match="logits are not finite"):
        sample_tokens(torch.tensor([[0.0, float("nan")], [0.0, 1.0]]))
