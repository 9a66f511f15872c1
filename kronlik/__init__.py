"""kronlik: the Gaussian log-likelihood with covariance M ⊗ K + I_T ⊗ Σ, and its gradients.

``vec(Y) ~ N(0, U)``, ``U = M ⊗ K + I_T ⊗ Σ``, ``Y`` of shape (T, D), ``vec(Y) = Y.reshape(-1)``.
The structured math is in :mod:`kronlik.structured`, the dense references in
:mod:`kronlik.reference`, the gradient cross-check in :mod:`kronlik.gradcheck`.
"""

from . import reference
from ._checks import default_floating_dtype
from ._validate import validate
from .fitting import FitResult, fit, fit_log_var
from .gradcheck import GradientReport, check_gradients
from .structured import (
    EighFactor,
    LowRank,
    factorize,
    grad_log_var,
    grad_sigma,
    loglik,
    loglik_diag,
    loglik_diag_rotated,
    predict,
    solve,
)

__version__ = "0.1.0"

__all__ = [
    "EighFactor",
    "FitResult",
    "LowRank",
    "factorize",
    "fit",
    "fit_log_var",
    "loglik_diag_rotated",
    "predict",
    "GradientReport",
    "check_gradients",
    "default_floating_dtype",
    "grad_log_var",
    "grad_sigma",
    "loglik",
    "loglik_diag",
    "reference",
    "solve",
    "validate",
]
