"""The differentiable reward term (DRaFT / AlignProp): the digit reward model, its loading, the
term's gradient, and a Trainer step with reward, truncation and the distance-to-base regulariser.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from e2ed2.engine.config import ConfigError, load_config
from e2ed2.engine.config.objective import ObjectiveConfig
from e2ed2.engine.eval.digits import DigitClassifier, DigitEvaluator, train_digit_classifier
from e2ed2.engine.objectives.losses import E2ED2Loss
from e2ed2.engine.objectives.reward import (
    DigitRewardMLP,
    digit_log_prob_reward,
    fit_digit_reward,
    load_reward_model,
    save_reward_model,
)


def _toy_digits(per_class: int = 12, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Ten fixed random templates plus noise: separable, so a few epochs fit them."""
    g = torch.Generator().manual_seed(7)
    templates = torch.rand(10, 1, size, size, generator=g) * 2 - 1
    labels = torch.arange(10).repeat_interleave(per_class)
    images = templates[labels] + 0.2 * torch.randn(len(labels), 1, size, size, generator=g)
    return images.clamp(-1, 1), labels


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("reward") / "reward.safetensors"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        save_reward_model(DigitRewardMLP(hidden=32), path)
    return str(path)


def test_the_reward_model_is_not_the_evaluators_network() -> None:
    """Another class, no convolutions (the evaluator is a CNN), other parameters, and another
    default seed: a reward that is the metric's own network would not be evidence."""
    images, labels = _toy_digits(per_class=3)
    reward = fit_digit_reward(images, labels, epochs=1)
    evaluator = train_digit_classifier(images, labels, epochs=1)
    assert isinstance(evaluator, DigitClassifier) and not isinstance(reward, DigitClassifier)
    assert not any(isinstance(m, nn.Conv2d) for m in reward.modules())
    assert any(isinstance(m, nn.Conv2d) for m in evaluator.modules())
    assert set(reward.state_dict()).isdisjoint(evaluator.state_dict())
    reward_seed = inspect.signature(fit_digit_reward).parameters["seed"].default
    evaluator_seed = inspect.signature(DigitEvaluator).parameters["seed"].default
    assert reward_seed != evaluator_seed


def test_fit_digit_reward_learns_its_data_and_round_trips_through_the_file(tmp_path) -> None:
    images, labels = _toy_digits()
    model = fit_digit_reward(images, labels, seed=3, epochs=10)
    accuracy = (model(images).argmax(1) == labels).float().mean().item()
    assert accuracy > 0.9, accuracy
    path = tmp_path / "r.safetensors"
    save_reward_model(model, path)
    loaded = load_reward_model(path)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    assert torch.equal(loaded(images), model(images))
    # Any resolution: the MLP average-pools to the digits' native 8x8.
    big = torch.nn.functional.interpolate(images, size=16, mode="nearest")
    assert torch.allclose(loaded(big), model(images), atol=1e-5)


def test_the_reward_term_is_minus_the_mean_log_prob_and_its_gradient_reaches_the_sample(
    reward_file,
) -> None:
    loss_fn = E2ED2Loss(ObjectiveConfig(l2_weight=0, reward_weight=2.0, reward_path=reward_file))
    assert loss_fn.needs_pixels and loss_fn.needs_labels
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(4, 1, 16, 16, generator=g).tanh().requires_grad_(True)
    labels = torch.tensor([3, 3, 7, 7])
    terms = loss_fn(sample, torch.zeros_like(sample), samples_per_prompt=2, labels=labels)
    expected = -digit_log_prob_reward(loss_fn.reward_model, sample, labels).mean()
    assert torch.allclose(terms["reward"], expected) and terms["reward"] > 0
    assert torch.allclose(terms["total"], 2.0 * terms["reward"])
    terms["total"].backward()
    grad = sample.grad
    assert torch.isfinite(grad).all() and (grad.abs().sum(dim=(1, 2, 3)) > 0).all()
    # A small step against the gradient raises the prompted digit's log-probability.
    with torch.no_grad():
        before = digit_log_prob_reward(loss_fn.reward_model, sample, labels)
        after = digit_log_prob_reward(loss_fn.reward_model, sample - 1e-2 * grad, labels)
    assert (after > before).all(), (before, after)
    with pytest.raises(ValueError, match="no labels"):
        loss_fn(sample, torch.zeros_like(sample))


def test_loading_errors_name_the_path(tmp_path) -> None:
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_reward_model(missing)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="garbage.safetensors.*not a safetensors"):
        load_reward_model(garbage)
    # The evaluator's classifier is a valid safetensors file but not a reward model.
    evaluator = tmp_path / "evaluator.safetensors"
    save_file({k: v.contiguous() for k, v in DigitClassifier().state_dict().items()}, evaluator)
    with pytest.raises(ValueError, match="evaluator.safetensors.*architecture None"):
        load_reward_model(evaluator)
    wrong = tmp_path / "wrong_shapes.safetensors"
    state = {k: v for k, v in DigitRewardMLP(hidden=16).state_dict().items() if "net.5" not in k}
    save_file(state, wrong, metadata={"architecture": "digit_reward_mlp_v1", "hidden": "16"})
    with pytest.raises(ValueError, match="wrong_shapes.safetensors.*do not fit"):
        load_reward_model(wrong)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        E2ED2Loss(ObjectiveConfig(reward_weight=1, reward_path=str(missing)))


def test_reward_config_is_checked_up_front() -> None:
    with pytest.raises(ValueError, match="reward_path"):
        ObjectiveConfig(reward_weight=1.0)
    with pytest.raises(ValueError, match="reward_weight must be a finite number >= 0"):
        ObjectiveConfig(reward_weight=-1.0, reward_path="r.safetensors")
    with pytest.raises(ValueError, match="kind='e2ed2' only"):
        ObjectiveConfig(kind="diffusion", reward_weight=1.0, reward_path="r.safetensors")
    assert ObjectiveConfig(l2_weight=0, reward_weight=1, reward_path="r").weights == {"reward": 1}
    with pytest.raises(ConfigError, match="data.source='digits'"):
        load_config(
            None,
            [
                "data.source=shards",
                "data.shard_dir=/nonexistent",
                "objective.reward_weight=1",
                "objective.reward_path=r.safetensors",
            ],
        )


def test_one_trainer_step_with_reward_truncation_and_the_distance_to_the_base(
    tmp_path, reward_file
) -> None:
    """Reward on the last sampler step only (DRaFT-K: truncation last_k, k = 1), m = 2 samples
    per prompt (the labels are repeated like the latents), and the distance to the frozen base
    (teacher = base with its own sampler and K steps: exactly 0 at the first step)."""
    from e2ed2.engine.train.trainer import Trainer

    trainer = Trainer(
        load_config(
            None,
            [
                f"run.output_dir={tmp_path}",
                "run.max_steps=1",
                "run.batch_per_rank=2",
                "run.num_sample_images=0",
                "run.export_at_end=false",
                "run.deepspeed_config=none",
                "model.num_layers=1",
                "data.resolution=8",
                "trajectory.num_steps=2",
                "trajectory.samples_per_prompt=2",
                "trajectory.truncation=last_k",
                "trajectory.grad_steps=1",
                "objective.l2_weight=0",
                "objective.reward_weight=1",
                f"objective.reward_path={reward_file}",
                "objective.teacher_weight=0.5",
                "objective.teacher_sampler=lcm",
                "objective.teacher_steps=2",
            ],
        )
    )
    before = [p.detach().clone() for p in trainer.engine.module.parameters()]
    terms = trainer.train_step(iter(trainer.loader))
    assert terms["teacher"] == 0.0
    assert 0 < terms["reward"] < 20 and terms["total"] == pytest.approx(terms["reward"])
    after = list(trainer.engine.module.parameters())
    assert any(not torch.equal(b, a) for b, a in zip(before, after, strict=True))


def test_the_reward_model_command_writes_a_loadable_file(tmp_path, capsys) -> None:
    from e2ed2.engine.cli.main import main

    out = tmp_path / "reward.safetensors"
    assert main(["reward-model", str(out), "--epochs", "1", "--resolution", "8"]) == 0
    assert "held-out accuracy" in capsys.readouterr().out
    model = load_reward_model(out)
    assert isinstance(model, DigitRewardMLP)
    assert main(["reward-model", str(tmp_path / "no_such_dir" / "r.safetensors")]) == 2
