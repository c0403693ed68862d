"""The fault plan (core/faults.py) and the loss record it poisons (core/loss_terms.py)."""

from __future__ import annotations

import math

import pytest
import torch

from e2ed2.engine.core.faults import FaultPlan
from e2ed2.engine.core.loss_terms import GeneratorLoss, LossTerms, total_key


def test_the_plan_names_steps_and_ranks() -> None:
    plan = FaultPlan.parse("nan_loss@3, nan_gradient@2-4:rank=1, nan_loss@6-")
    loss_steps = [s for s in range(1, 9) if plan.hits("nan_loss", step=s, rank=0)]
    assert loss_steps == [3, 6, 7, 8]
    assert [s for s in range(1, 9) if plan.hits("nan_gradient", step=s, rank=1)] == [2, 3, 4]
    assert not plan.hits("nan_gradient", step=3, rank=0)
    assert not FaultPlan.from_env({}) and not FaultPlan.parse("")
    legacy = FaultPlan.from_env({"E2ED2_FAIL_SAVE_RANK": "1"})
    assert legacy.hits("fail_save", rank=1) and not legacy.hits("fail_save", rank=0)
    with pytest.raises(ValueError, match=r"E2ED2_FAULTS: 'nan_los@3' is not POINT"):
        FaultPlan.parse("nan_los@3")


def test_poisoned_terms_are_a_nan_loss_or_a_finite_loss_with_a_nan_gradient() -> None:
    weight = torch.tensor(2.0, requires_grad=True)
    total = weight * 3.0
    generated = GeneratorLoss(LossTerms(total, {"l2": 6.0, "total": 6.0}))
    plan = FaultPlan.parse("nan_loss@1,nan_gradient@2")
    assert plan.on_generator_loss(generated, step=3, rank=0) is generated
    nan_loss = plan.on_generator_loss(generated, step=1, rank=0).terms
    assert not nan_loss.finite and math.isnan(float(nan_loss.total))
    assert nan_loss.logged["l2"] == 6.0 and generated.terms.finite  # the input is unchanged
    nan_gradient = plan.on_generator_loss(generated, step=2, rank=0).terms
    assert nan_gradient.finite and float(nan_gradient.total) == 6.0
    nan_gradient.total.backward()
    assert math.isnan(float(weight.grad))
    assert total_key("diffusion") == "diffusion" and total_key("e2ed2") == "total"
    with pytest.raises(ValueError, match="lack the loss's 'total'"):
        LossTerms(total, {"l2": 6.0})
