"""Pure numerical statistics for rollout decisions.

Functions on numbers only (numpy and scipy, nothing else of safeshift), so
they can be tested on their own by Monte-Carlo and against scipy:

* :mod:`~safeshift.stats.sequential`: always-valid confidence sequences and
  p-values for differences between arms (the guardrail decisions);
* :mod:`~safeshift.stats.clustered`: unit-level (cluster-robust) variance of
  ratio metrics measured per request under randomisation by unit;
* :mod:`~safeshift.stats.srm`: sequential sample-ratio-mismatch check;
* :mod:`~safeshift.stats.drift`: PSI, Jensen-Shannon, Wasserstein, chi-square
  for distribution drift and shadow comparison;
* :mod:`~safeshift.stats.power`: units per arm a stage needs;
* :mod:`~safeshift.stats.bandits`: Thompson-sampling allocation among candidates.
"""

from safeshift.stats.bandits import ArmStats, BanditKind, probability_best, thompson_allocation
from safeshift.stats.clustered import cluster_ratio, diff_ratios
from safeshift.stats.drift import (
    PSI_THRESHOLD,
    DriftResult,
    chi_square_classes,
    histogram_counts,
    histogram_edges,
    jensen_shannon,
    psi,
    wasserstein_from_histograms,
)
from safeshift.stats.power import (
    MAX_SAMPLES_PER_ARM,
    fixed_horizon_samples_per_arm,
    proportion_variance,
    sequential_samples_per_arm,
)
from safeshift.stats.sequential import (
    Estimate,
    Interval,
    Side,
    always_valid_p_value,
    boundary_multiplier,
    confidence_sequence,
    confidence_sequence_one_sample,
    diff_means,
    diff_proportions,
    fixed_horizon_interval,
    mixture_rho2,
    one_sample_mean,
    one_sample_proportion,
)
from safeshift.stats.srm import SRMResult, count_dispersion, srm_log_bayes_factor, srm_test

__all__ = [
    "MAX_SAMPLES_PER_ARM",
    "PSI_THRESHOLD",
    "ArmStats",
    "BanditKind",
    "DriftResult",
    "Estimate",
    "Interval",
    "SRMResult",
    "Side",
    "always_valid_p_value",
    "boundary_multiplier",
    "chi_square_classes",
    "cluster_ratio",
    "confidence_sequence",
    "confidence_sequence_one_sample",
    "count_dispersion",
    "diff_means",
    "diff_proportions",
    "diff_ratios",
    "fixed_horizon_interval",
    "fixed_horizon_samples_per_arm",
    "histogram_counts",
    "histogram_edges",
    "jensen_shannon",
    "mixture_rho2",
    "one_sample_mean",
    "one_sample_proportion",
    "probability_best",
    "proportion_variance",
    "psi",
    "sequential_samples_per_arm",
    "srm_log_bayes_factor",
    "srm_test",
    "thompson_allocation",
    "wasserstein_from_histograms",
]
