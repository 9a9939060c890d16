"""Config loading: stage-specific block defaults survive partial overrides, and --help-config shows them."""

from alignline.config import describe, load_config
from alignline.stages.dpo import DPOConfig
from alignline.stages.tso import TSOConfig


def test_partial_override_updates_a_stage_default_block_instead_of_replacing_it():
    """DPO's training defaults are lr 5e-7, batch 4 x accumulation 8, warm-up 100, 2 epochs (Xwin); setting only
    train.lr must keep the other four, not fall back to TrainSettings' class defaults (batch 8, accumulation 1)."""
    cfg = load_config(DPOConfig, None, ["model=m", "data.train=t.jsonl", "train.lr=1e-5"])
    t = cfg.train
    assert (t.lr, t.batch_size, t.grad_accum, t.warmup_steps, t.epochs) == (1e-5, 4, 8, 100, 2)


def test_tso_keeps_its_optimizer_and_loss_defaults_under_a_partial_override():
    """TSO's defaults: dual-clip loss, AdamW betas (0.9, 0.95), lr 5e-7; train.max_steps=1 changes only max_steps."""
    cfg = load_config(TSOConfig, None, ["model=m", "data.train=t.jsonl", "train.max_steps=1"])
    assert cfg.train.max_steps == 1 and cfg.train.adam_betas == (0.9, 0.95) and cfg.train.lr == 5e-7
    assert cfg.loss.type == "dual_clip"


def test_help_config_shows_the_stage_defaults_of_nested_blocks():
    rows = {name: default for name, default, _ in describe(TSOConfig)}
    assert rows["loss.type"] == "'dual_clip'" and rows["train.adam_betas"] == "(0.9, 0.95)"
    assert rows["model"] == "required"


def test_a_check_across_settings_reads_as_its_message():
    """A config-level check (score's judge needs its model) names its settings itself: the error is that message,
    not "setting ''" followed by the whole config."""
    import pytest

    from alignline.errors import ConfigError
    from alignline.stages.score import ScoreConfig

    with pytest.raises(ConfigError) as info:
        load_config(ScoreConfig, None, ["prompts=p.jsonl", "responses=r.jsonl"])
    assert str(info.value) == ("invalid ScoreConfig from defaults + overrides:\n  reward_model is required for "
                               "judge=reward_model "
                               "(a directory saved by `alignline rm`); or set judge=evaluator evaluator.model=PATH")
