"""The offline digit metric: a classifier that reads held-out digits, a Fréchet distance that
separates real digits from non-digits, and the ``e2ed2 evaluate`` command's error paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg

from e2ed2.engine.cli import main as cli_main
from e2ed2.engine.data import DataConfig
from e2ed2.engine.evaluate import DigitEvaluator, frechet_distance, real_data_metrics


@pytest.fixture(scope="module")
def evaluator() -> DigitEvaluator:
    # One classifier for the module (training it is the slow part, ~10-30 s on 2 cores).
    return DigitEvaluator(DataConfig())


def test_frechet_distance_matches_the_matrix_square_root_formula() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 6))
    b = rng.normal(size=(300, 6)) @ np.diag([1, 2, 3, 0.5, 1, 4]) + 0.7
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(
        cov_a + cov_b - 2 * linalg.sqrtm(cov_a @ cov_b).real
    )
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    # A singular covariance (fewer distinct rows than dimensions) still gives a finite value.
    assert np.isfinite(frechet_distance(np.repeat(a[:3], 10, axis=0), b))


def test_classifier_reads_held_out_digits(evaluator: DigitEvaluator) -> None:
    scores = evaluator.score(evaluator.holdout.images, evaluator.holdout.labels)
    assert scores.accuracy > 0.95
    shuffled = evaluator.holdout.labels[torch.randperm(len(evaluator.holdout.labels))]
    assert evaluator.score(evaluator.holdout.images, shuffled).accuracy < 0.3


def test_fd_separates_real_digits_from_noise_and_blur(evaluator: DigitEvaluator) -> None:
    floor = evaluator.noise_floor(num_draws=3)
    real_fd = floor["train_real"]["fd_mean"]
    assert floor["train_real"]["accuracy_mean"] > 0.95
    # The per-class mean image is what an L2-regressed sampler tends to: perfectly conditioned,
    # no diversity. The metric must rank it far behind real digits, and noise behind both.
    assert floor["class_means"]["fd"] > 5 * real_fd
    assert floor["gaussian_noise"]["fd"] > 3 * floor["class_means"]["fd"]
    assert floor["gaussian_noise"]["accuracy"] < 0.3


def test_evaluate_cli_names_a_missing_export(tmp_path, capsys) -> None:
    assert cli_main(["evaluate", str(tmp_path / "nowhere")]) == 2
    assert "e2ed2_config.toml" in capsys.readouterr().err


def test_real_data_metrics_names_missing_weights(tmp_path) -> None:
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    missing = tmp_path / "inception.pth"
    with pytest.raises(FileNotFoundError, match="inception.pth"):
        real_data_metrics(images, images, inception_weights=missing)
    missing.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="clip"):
        real_data_metrics(images, images, inception_weights=missing, clip_model=tmp_path / "clip")
