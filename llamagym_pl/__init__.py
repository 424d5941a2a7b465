"""llamagym_pl: fine-tune LLM agents with online RL (PPO) in Gymnasium envs, on Lightning."""

from llamagym_pl.agent import Agent

__all__ = ["Agent"]
__version__ = "0.1.0"
