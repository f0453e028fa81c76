"""In-context linear regression, with the Bayes-optimal ridge baseline computed alongside.

Paper: "In-Context Linear Regression Demystified: Training Dynamics and Mechanistic
Interpretability of Multi-Head Softmax Attention" (paper 6). Each example draws a task
beta ~ N(0, I_d / d), L pairs x_i ~ N(0, I_d), y_i = beta^T x_i + eps with eps ~ N(0, sigma^2), and a
query x_q. Tokens are z_i = [x_i; y_i] and z_q = [x_q; 0]; the model predicts y_q at the last
position. Under this prior the posterior mean of beta is ridge regression with lambda = d sigma^2,
so ``ridge_predict`` is the Bayes-optimal predictor and its error the floor any model can reach.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .synthetic import Batch, ValueTask, check_positive, generator


@dataclass(frozen=True)
class LinearRegressionICL(ValueTask):
    """Paper 6's setting.

    Attributes:
        dim: d, the covariate dimension (paper: 5).
        n_pairs: L, the in-context examples (paper: 8 d = 40).
        noise_var: sigma^2 (paper: 0.1).
    """

    dim: int = 5
    n_pairs: int = 40
    noise_var: float = 0.1
    causal = False  # the query attends to every pair; only the last position is scored

    def __post_init__(self) -> None:
        check_positive(dim=self.dim, n_pairs=self.n_pairs)
        if not self.noise_var >= 0:
            raise ValueError(f"`noise_var` must be >= 0; got noise_var={self.noise_var}")

    @property
    def in_dim(self) -> int:
        return self.dim + 1

    @property
    def seq_len(self) -> int:
        return self.n_pairs + 1

    def sample(self, n: int, seed: int = 0) -> Batch:
        """inputs (n, L + 1, d + 1) float32 tokens [x; y] with y_q = 0; targets (n, L + 1), NaN except y_q."""
        check_positive(n=n)
        g = generator(seed)
        d, L = self.dim, self.n_pairs
        beta = torch.randn(n, d, generator=g, dtype=torch.float64) / math.sqrt(d)
        x = torch.randn(n, L + 1, d, generator=g, dtype=torch.float64)
        y = (x @ beta[:, :, None]).squeeze(-1) + math.sqrt(self.noise_var) * torch.randn(n, L + 1, generator=g, dtype=torch.float64)
        tokens = torch.cat([x, y[..., None]], dim=-1)
        tokens[:, -1, -1] = 0.0  # the query's y is what we ask for
        targets = torch.full((n, L + 1), float("nan"), dtype=torch.float64)
        targets[:, -1] = y[:, -1]
        return Batch(tokens.float(), targets.float())

    def ridge_predict(self, batch: Batch) -> Tensor:
        """The posterior-mean (Bayes-optimal) prediction of y_q for each example: (n,) float64.

        beta_hat = (X^T X + d sigma^2 I)^{-1} X^T y over the L context pairs, prediction x_q^T beta_hat.
        """
        z = batch.inputs.double()
        x, y, xq = z[:, :-1, :-1], z[:, :-1, -1], z[:, -1, :-1]  # (n, L, d), (n, L), (n, d)
        gram = x.transpose(1, 2) @ x + self.dim * self.noise_var * torch.eye(self.dim, dtype=torch.float64)
        beta = torch.linalg.solve(gram, (x.transpose(1, 2) @ y[..., None])).squeeze(-1)
        return (xq * beta).sum(-1)

    def gd_one_step_predict(self, batch: Batch, lr: float | None = None) -> Tensor:
        """One step of gradient descent from beta = 0, the predictor a one-layer attention model learns.

        Paper 6 finds that trained one-layer multi-head softmax attention implements (a debiased form
        of) ``lr * x_q^T X^T y / L``. With ``lr=None`` the step is the population optimum
        ``1 / (1 + (d + 1) / L + sigma^2 d / L)`` (from E[(X^T X / L)^2] = (1 + (d + 1) / L) I).
        Returns (n,) float64.
        """
        z = batch.inputs.double()
        x, y, xq = z[:, :-1, :-1], z[:, :-1, -1], z[:, -1, :-1]
        d, L = self.dim, self.n_pairs
        lr = 1.0 / (1 + (d + 1) / L + self.noise_var * d / L) if lr is None else lr
        return lr * (xq[:, None, :] @ (x.transpose(1, 2) @ y[..., None])).view(-1) / L

    def gd_one_step_mse(self, batch: Batch) -> float:
        """Squared error of ``gd_one_step_predict``: about 1 + sigma^2 - 1 / (1 + (d+1)/L + sigma^2 d/L),
        0.240 in the paper's setting, more than twice the ridge floor (~0.115)."""
        return (self.gd_one_step_predict(batch) - batch.targets[:, -1].double()).square().mean().item()

    def ridge_mse(self, batch: Batch) -> float:
        """The Bayes-optimal baseline's squared error on ``batch`` (the same metric as ``score``)."""
        return (self.ridge_predict(batch) - batch.targets[:, -1].double()).square().mean().item()
