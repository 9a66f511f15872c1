"""kronlik: the Gaussian log-likelihood with covariance M ⊗ K + I_T ⊗ Σ, and its gradients.

``vec(Y) ~ N(0, U)``, ``U = M ⊗ K + I_T ⊗ Σ``, ``Y`` of shape (T, D), ``vec(Y) = Y.reshape(-1)``.
The public functions are in :mod:`kronlik.structured`, the forms of M in :mod:`kronlik.forms`,
kernels over time in :mod:`kronlik.kernels` (state-space kernels for O(T) work in
:mod:`kronlik.statespace`), the one structured core in ``kronlik._core`` (with
the noise models in ``kronlik._noise`` and missing entries in ``kronlik._missing``), the dense and
exact references in :mod:`kronlik.reference`, information matrices in :mod:`kronlik.information`,
fitting in :mod:`kronlik.fitting` (the command line's model in ``kronlik._fit_model``), and
multi-trait mixed models (covariates, ML/REML, heritability, association scans) in
:mod:`kronlik.mixed` and :mod:`kronlik.scan`, and M = G Gᵀ with G sharded by rows over devices in
:mod:`kronlik.sharding`.
"""

from . import datasets, kernels, reference, statespace
from ._checks import default_floating_dtype
from ._validate import Validation, validate
from .fitting import FitResult, fit, fit_log_var
from .forms import Diagonal, EighFactor, LowRank, psd_tolerance
from .gradcheck import GradientReport, check_gradients
from .information import fisher_information, fisher_log_var, hessian_log_var
from .mixed import (
    MixedFit,
    environmental_correlation,
    fit_mixed,
    genetic_correlation,
    genetic_correlation_test,
    gls,
    heritability,
    heritability_interval,
    information_mixed,
    loglik_mixed,
)
from .scan import ScanResult, scan
from .sharding import ShardedLowRank, row_mesh, shard_rows
from .statespace import StateSpace
from .structured import (
    factorize,
    grad_log_var,
    grad_sigma,
    loglik,
    loglik_diag,
    loglik_diag_rotated,
    predict,
    solve,
)

__version__ = "0.4.0"

__all__ = [
    "Diagonal",
    "MixedFit",
    "ScanResult",
    "ShardedLowRank",
    "StateSpace",
    "EighFactor",
    "FitResult",
    "GradientReport",
    "LowRank",
    "Validation",
    "check_gradients",
    "datasets",
    "default_floating_dtype",
    "environmental_correlation",
    "fit_mixed",
    "genetic_correlation",
    "genetic_correlation_test",
    "gls",
    "heritability",
    "heritability_interval",
    "information_mixed",
    "loglik_mixed",
    "scan",
    "shard_rows",
    "statespace",
    "factorize",
    "fit",
    "fisher_information",
    "fisher_log_var",
    "fit_log_var",
    "grad_log_var",
    "grad_sigma",
    "hessian_log_var",
    "kernels",
    "loglik",
    "loglik_diag",
    "loglik_diag_rotated",
    "predict",
    "psd_tolerance",
    "reference",
    "row_mesh",
    "solve",
    "validate",
]
