"""Curvature measurements: Tr(F), per-example gradient norms, Tr(H), λ_max(H).

One concept per module:

* :mod:`.fisher` - :func:`fisher_trace` (Tr(F), Jastrzebski et al. ICML 2021, Eq. 2) and
  :func:`minibatch_fisher_trace` (Tr(F_B), what the Fisher penalty regularises);
* :mod:`.per_example` - per-example gradient norms by ghost norms in one batched backward
  (:func:`per_example_grad_norms`, :func:`per_example_sq_norms`) and the mean gradients of
  groups of examples (:func:`group_gradient_stats`);
* :mod:`.hutchinson` - :func:`hessian_trace`, by Hutchinson (1989) or Hutch++ (Meyer et al.
  2021), and the matrix-free :func:`hutchinson` / :func:`hutchpp`;
* :mod:`.eigenvalue` - :func:`top_hessian_eigenvalue` (λ_H^1, the largest), the top-k
  :func:`hessian_eigenvalues` (Lanczos, with residuals and a convergence flag), and
  :func:`lanczos` / :func:`power_iteration`;
* :mod:`.covariance` - the gradient covariance K (Jastrzebski et al. ICLR 2020):
  :func:`gradient_covariance_trace`, :func:`gradient_covariance_eigenvalues` from the
  N×N Gram matrix of per-example gradients (:func:`per_example_gradient_gram`).

The per-example engine behind the norms, Tr(F) and K exists once: :mod:`.layers` (one
rule per layer family: its per-example squared norms, Gram matrix, batch dimension and
what it accepts), :mod:`.ghost` (the batched pass that feeds the rules) and
:mod:`.examples` (the first-example check and the ``vmap``/loop per-example gradients of
everything else, shared with :class:`fisher_optim.FisherNoiseSGD`).

Every measurement leaves the model exactly as found: parameters, buffers, ``.grad`` and
training flags.
"""

from .covariance import (
    GradientCovariance,
    gradient_covariance,
    gradient_covariance_eigenvalues,
    gradient_covariance_trace,
    per_example_gradient_gram,
)
from .eigenvalue import (
    EigenEstimate,
    EigenSpectrum,
    hessian_eigenvalues,
    is_converged,
    lanczos,
    power_iteration,
    top_hessian_eigenvalue,
)
from .fisher import LABEL_MODES, fisher_trace, minibatch_fisher_trace
from .hessian import DISTRIBUTIONS, HessianOperator, random_probe
from .hutchinson import TRACE_METHODS, TraceEstimate, hessian_trace, hutchinson, hutchpp
from .per_example import (
    group_gradient_stats,
    per_example_grad_norms,
    per_example_sq_norms,
    target_cotangents,
)

__all__ = [
    "DISTRIBUTIONS",
    "LABEL_MODES",
    "TRACE_METHODS",
    "EigenEstimate",
    "EigenSpectrum",
    "GradientCovariance",
    "HessianOperator",
    "TraceEstimate",
    "fisher_trace",
    "gradient_covariance",
    "gradient_covariance_eigenvalues",
    "gradient_covariance_trace",
    "group_gradient_stats",
    "hessian_eigenvalues",
    "hessian_trace",
    "hutchinson",
    "hutchpp",
    "is_converged",
    "lanczos",
    "minibatch_fisher_trace",
    "per_example_grad_norms",
    "per_example_gradient_gram",
    "per_example_sq_norms",
    "power_iteration",
    "random_probe",
    "target_cotangents",
    "top_hessian_eigenvalue",
]
