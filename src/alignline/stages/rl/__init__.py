"""``alignline rl``: online RL with a group policy gradient (GRPO, Dr. GRPO, RLOO, REINFORCE++) or PPO.

One iteration (design section 4, "Online RL"): draw ``rollout.prompts`` prompts -> the engine samples
``rollout.group_size`` (G) responses each from the current policy -> the reward function scores them ->
no-grad passes give the sampling policy's, the reference's and the critic's per-token values (the G responses
of a prompt share one row, :mod:`alignline.train.groups`) -> the estimator turns rewards into advantages
(:mod:`alignline.advantages`) -> ``loss.epochs`` passes of the clipped-ratio loss through the one training loop.
The rollout is a shard on disk (:mod:`alignline.stages.rl.rollout`) written before it is trained on.

The whole run is one call of :func:`alignline.train.loop.train` whose "epochs" are the iterations: the plan of
iteration k is a fixed number of micro-batches of :class:`~alignline.stages.rl.rollout.ResponseRef` items, and the
loop's per-epoch hook (``epoch_start``, :meth:`~alignline.stages.rl.rollout.RolloutSource.start_iteration`) makes
iteration k's rollout before its first step, sampled then with the weights the loop holds at that moment (or read
back from its shard after a resume). So optimizer state, schedule, checkpoints and exact resume are the loop's own.

Modules: :mod:`~alignline.stages.rl.config` (the settings), :mod:`~alignline.stages.rl.sampling` (the engine
side), :mod:`~alignline.stages.rl.rollout` (one rollout), :mod:`~alignline.stages.rl.step` (the loss step, the
plan, the collate), :mod:`~alignline.stages.rl.evaluation` (the held-out evaluation) and
:mod:`~alignline.stages.rl.stage` (the body, ``run``).
"""

from alignline.stages.rl.config import RLConfig
from alignline.stages.rl.stage import run

__all__ = ["RLConfig", "run"]
