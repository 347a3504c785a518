"""The candidate's circuit breaker; it lives in :mod:`safeshift.breaker`, shared with library
mode (one implementation of the serving protection, see :mod:`safeshift.serving`)."""

from safeshift.breaker import BreakerState, CircuitBreaker

__all__ = ["BreakerState", "CircuitBreaker"]
