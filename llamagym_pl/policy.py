"""Policy = a Hugging Face causal LM plus our own value head, evaluated in one forward pass."""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from llamagym_pl.decode import decode_with_config, plain_decoding
from llamagym_pl.lm_calls import lm_call_names

log = logging.getLogger(__name__)


class ValueHead(nn.Module):
    """A linear critic on the LM's last hidden state: ``(B, L, H) -> (B, L)``.

    Kept in float32 whatever the LM's dtype or the trainer's precision, because value targets
    are small returns whose regression suffers from bf16 rounding.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        # Start near V=0 so the first advantages are close to the raw returns.
        nn.init.normal_(self.summary.weight, std=0.01)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        # Under autocast (bf16-mixed) the linear would run in bf16 even on float32 inputs.
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return self.summary(hidden.float()).squeeze(-1)  # (B, L)


class NoCritic(nn.Module):
    """The value head of a critic-free policy (``model.advantage_estimator``: ``grpo``, ``gigpo``):
    no parameters, every value 0, so nothing is built, trained or saved for a critic."""

    def forward(self, hidden: Tensor) -> Tensor:
        return torch.zeros(hidden.shape[:-1], dtype=torch.float32, device=hidden.device)  # (B, L)


class PolicyWithValueHead(nn.Module):
    """Wraps a causal LM (plain, peft or quantized) and a :class:`ValueHead`.

    ``forward`` returns next-token logits and per-position values from the same pass; the value
    at position ``i`` estimates the return of the state whose prompt ends at token ``i``. With
    ``critic=False`` there is no value head (:class:`NoCritic`: values are 0).
    """

    def __init__(self, lm: nn.Module, value_head: ValueHead | None = None, critic: bool = True) -> None:
        super().__init__()
        self.lm = lm
        if not critic:
            self.value_head: nn.Module = NoCritic()
        else:
            self.value_head = value_head if value_head is not None else ValueHead(_hidden_size(lm))

    @property
    def has_critic(self) -> bool:
        """Whether the values come from a trained value head (else they are all 0)."""
        return not isinstance(self.value_head, NoCritic)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, all_logits: bool = True
    ) -> tuple[Tensor, Tensor]:
        """Logits (B, L, V) and values (B, L). With ``all_logits=False`` the LM computes the logits
        of the last position only, (B, 1, V): the values need the hidden states alone, and the
        output layer and its full-vocabulary logits over every position cost as much as a layer."""
        _, keep = lm_call_names(self.lm)
        out = self.lm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=True,
            use_cache=False,
            **({keep: 1} if keep and not all_logits else {}),
        )
        values = self.value_head(out.hidden_states[-1])  # (B, L)
        return out.logits, values  # (B, L, V), (B, L)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor, **kwargs) -> Tensor:
        """Continue left-padded prompts (B, P), KV cache on. Given only a ``generation_config``
        (and a KV cache of their first columns) that samples from the plain softmax at a
        temperature or decodes greedily, by :func:`~llamagym_pl.decode.decode`: ``generate``'s
        forwards and distribution without its per-step cost (:func:`~llamagym_pl.decode.plain_decoding`
        says when). Anything else by the LM's own ``generate``, with ``kwargs``."""
        config, cache_kw = kwargs.get("generation_config"), lm_call_names(self.lm)[0]
        if (
            config is not None
            and set(kwargs) <= {"generation_config", cache_kw}
            and plain_decoding(self.lm, config, input_ids.shape[1])
        ):
            return decode_with_config(self.lm, input_ids, attention_mask, config, kwargs.get(cache_kw))
        return self.lm.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def _hidden_size(lm: nn.Module) -> int:
    config = getattr(lm, "config", None)
    for name in ("hidden_size", "n_embd", "d_model"):
        size = getattr(config, name, None)
        if isinstance(size, int):
            return size
    text_config = getattr(config, "text_config", None)
    if text_config is not None and isinstance(getattr(text_config, "hidden_size", None), int):
        return text_config.hidden_size
    raise ValueError(f"cannot find the hidden size in the config of {type(lm).__name__}")


DROPOUT_LAYERS = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


def disable_dropout(module: nn.Module) -> int:
    """Set every dropout probability in ``module`` to 0; return how many were above 0.

    PPO's ratio compares the update's log-probs (train mode: Lightning's ``training_step``) with
    the rollout's (eval mode), so any dropout left on makes the ratio differ from 1 before any
    update (issue #12). Switching the policy to eval mode instead would also switch off
    gradient checkpointing, which Hugging Face models run only in train mode; so, as TRL's
    ``disable_dropout_in_model``, the probabilities go to 0 once, when the policy is built.

    Turned off: dropout layers (the LM's, LoRA's ``lora_dropout``); float attributes of any
    submodule named ``*drop*``, which Hugging Face attention passes to its kernel as a number
    (Llama, Qwen2: ``attention_dropout``; ``layerdrop``); and the same fields of every
    submodule's config (GPT-2's ``attn_pdrop``...), which some models read at forward time.
    """
    count = 0
    configs: dict[int, object] = {}
    for sub in module.modules():
        if isinstance(sub, DROPOUT_LAYERS):
            count += int(sub.p > 0)
            sub.p = 0.0
        count += _zero_drop_fields(sub)
        config = vars(sub).get("config")  # shared by many submodules: zeroed once
        if hasattr(config, "__dict__") and not isinstance(config, nn.Module):
            configs[id(config)] = config
    count += sum(_zero_drop_fields(config) for config in configs.values())
    return count


def _zero_drop_fields(obj: object) -> int:
    """Set ``obj``'s float attributes named ``*drop*`` that are above 0 to 0; return how many."""
    names = [k for k, v in vars(obj).items() if "drop" in k.lower() and isinstance(v, float) and v > 0]
    for name in names:
        setattr(obj, name, 0.0)
    return len(names)


def is_peft(lm: nn.Module) -> bool:
    """Whether ``lm`` is a peft model (it has ``disable_adapter``, ``merge_and_unload``...)."""
    return hasattr(lm, "peft_config") and hasattr(lm, "disable_adapter")


HALF_DTYPES = (torch.bfloat16, torch.float16)


def half_precision_trainable(module: nn.Module) -> list[str]:
    """Names of ``module``'s trainable parameters stored in bfloat16 or float16.

    AdamW cannot train those: an update smaller than half the weight's rounding step (bf16 keeps
    8 significant bits) is lost, so most weights never change (lr 1e-5, 10 steps: 15% of a bf16
    model's weights changed at all). Mixed precision keeps float32 weights instead.
    """
    return [name for name, p in module.named_parameters() if p.requires_grad and p.dtype in HALF_DTYPES]


def drop_frozen(module: nn.Module, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Keep only the entries of ``module``'s trainable parameters (LoRA weights, value head).

    For checkpoints of LoRA runs: the frozen base is rebuilt bit for bit from ``name_or_path``,
    so saving it again would only multiply the checkpoint size (~1000x for a 1B model).
    """
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    return {k: v for k, v in state_dict.items() if k in trainable}


def fill_frozen(module: nn.Module, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`drop_frozen`: add ``module``'s own entries for what ``state_dict`` lacks.

    Raises if a trainable parameter is missing, so a strict ``load_state_dict`` still catches a
    checkpoint of another configuration (e.g. another ``lora_r`` or target modules).
    """
    missing = [n for n, p in module.named_parameters() if p.requires_grad and n not in state_dict]
    if missing:
        raise KeyError(f"checkpoint lacks {len(missing)} trainable weights, e.g. {missing[:3]}")
    # Parameters and persistent buffers only: a 4-bit layer's state_dict also holds
    # quantization-state entries that load_state_dict would reject as unexpected.
    names = {n for n, _ in module.named_parameters(remove_duplicate=False)}
    names |= {n for n, _ in module.named_buffers(remove_duplicate=False)}
    own = {k: v for k, v in module.state_dict().items() if k in names and k not in state_dict}
    return own | state_dict
