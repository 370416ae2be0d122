"""fisher_optim: the Fisher penalty and the curvature measurements behind it, for PyTorch.

Jastrzebski et al., "Catastrophic Fisher Explosion: Early Phase Fisher Matrix Impacts
Generalization", ICML 2021; Wen et al., "An Empirical Study of Large-Batch Stochastic
Gradient Descent with Structured Covariance Noise", AISTATS 2020.
"""

from fisher_optim import _requires  # noqa: F401  (first: the torch floor, checked at import)
from fisher_optim.activation_pattern import ActivationPattern
from fisher_optim.batch import Batch
from fisher_optim.differentiation import MODES, FiniteDifferenceWarning, penalty_gradient
from fisher_optim.fisher_noise_sgd import COVARIANCES, FISHERS, FisherNoiseSGD
from fisher_optim.fisher_penalty_sgd import FisherPenaltySGD
from fisher_optim.ghost_batchnorm import GhostBatchNorm, convert_to_ghost_batchnorm
from fisher_optim.likelihoods import LIKELIHOODS, Bernoulli, Categorical, Gaussian, Likelihood
from fisher_optim.monitor import CurvatureMonitor, FisherExplosionWarning, FisherMonitor
from fisher_optim.penalty import PENALTIES, fisher_penalty
from fisher_optim.safeguard import SpikeGuard
from fisher_optim.targets import causal_target_rows

#: The package version, read by pyproject.toml (the one place it is written).
__version__ = "0.3.0"

__all__ = [
    "COVARIANCES",
    "FISHERS",
    "LIKELIHOODS",
    "MODES",
    "PENALTIES",
    "ActivationPattern",
    "Batch",
    "Bernoulli",
    "Categorical",
    "CurvatureMonitor",
    "FiniteDifferenceWarning",
    "FisherExplosionWarning",
    "FisherMonitor",
    "FisherNoiseSGD",
    "FisherPenaltySGD",
    "Gaussian",
    "GhostBatchNorm",
    "Likelihood",
    "SpikeGuard",
    "__version__",
    "causal_target_rows",
    "convert_to_ghost_batchnorm",
    "fisher_penalty",
    "penalty_gradient",
]
