"""Command-line overrides: ``none`` is None only where a key is optional."""

from __future__ import annotations

import pytest

from e2ed2.engine.config.base import ConfigError
from e2ed2.engine.config.loader import load_config


def test_none_word_is_the_policy_name_for_literal_keys() -> None:
    config = load_config(None, ["trajectory.checkpoint=none", "model.vae_path=none"])
    assert config.trajectory.checkpoint == "none"
    assert type(config.trajectory.checkpoint) is str
    assert config.model.vae_path is None


def test_none_word_for_a_required_int_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"run\.max_steps='none' has type str, expected int"):
        load_config(None, ["run.max_steps=none"])


def test_diffusion_objective_refuses_a_trigflow_sampler() -> None:
    """The denoising loss noises with a beta or flow schedule; scm has neither (it used to fail
    at the first training step with an AttributeError)."""
    overrides = ["objective.kind=diffusion", "sampler.kind=scm", "sampler.prediction_type=trigflow"]
    with pytest.raises(ConfigError, match=r"objective.kind='diffusion' cannot train a sampler"):
        load_config("scratch", overrides)
    # The same sampler under the e2ed2 objective is a valid config.
    assert load_config("scratch", overrides[1:]).sampler.kind == "scm"
