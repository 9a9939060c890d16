"""The policy and PPO's critic as one module for the training loop (``alignline rl``)."""

from __future__ import annotations

import torch


class ActorCritic(torch.nn.Module):
    """The policy and PPO's critic as one module, so the one training loop optimises and checkpoints both."""

    def __init__(self, policy, critic):
        super().__init__()
        self.policy, self.critic = policy, critic

    def get_input_embeddings(self):  # what the loop's telemetry reads of a causal LM
        return self.policy.get_input_embeddings()

    def get_output_embeddings(self):
        return self.policy.get_output_embeddings()

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        for m in (self.policy, self.critic):
            m.gradient_checkpointing_enable(**kwargs)


def policy_and_critic(model):
    return (model.policy, model.critic) if isinstance(model, ActorCritic) else (model, None)
