"""Tests of the Thompson-sampling allocation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate
from scipy import stats as sps

from safeshift.stats import ArmStats, probability_best, thompson_allocation


def _bern(name: str, n: float, rate: float) -> ArmStats:
    return ArmStats(name=name, n=n, successes=round(n * rate))


def test_equal_shares_until_every_arm_has_min_units() -> None:
    arms = [_bern("a", 5000, 0.05), _bern("b", 5000, 0.2), _bern("c", 99, 0.1)]
    shares = thompson_allocation(arms, min_units=100, rng=np.random.default_rng(0))
    assert shares == {
        "a": pytest.approx(1 / 3),
        "b": pytest.approx(1 / 3),
        "c": pytest.approx(1 / 3),
    }
    assert thompson_allocation(arms, min_units=99, rng=np.random.default_rng(0))["b"] > 0.9


@pytest.mark.parametrize("top_two", [False, True])
def test_clearly_best_arm_gets_the_most_and_floor_holds(top_two: bool) -> None:
    arms = [
        _bern("a", 3000, 0.05),
        _bern("b", 3000, 0.08),
        _bern("c", 3000, 0.05),
        _bern("d", 3000, 0.04),
    ]
    shares = thompson_allocation(arms, floor=0.05, top_two=top_two, rng=np.random.default_rng(1))
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-12)
    assert max(shares, key=lambda k: shares[k]) == "b"
    assert min(shares.values()) >= 0.05 - 1e-12
    # lower-is-better flips the choice (e.g. an error rate)
    low = thompson_allocation(arms, higher_is_better=False, rng=np.random.default_rng(1))
    assert max(low, key=lambda k: low[k]) == "d"


def test_impossible_floor_gives_equal_split() -> None:
    arms = [_bern(x, 1000, r) for x, r in [("a", 0.1), ("b", 0.3), ("c", 0.2)]]
    shares = thompson_allocation(arms, floor=0.4, rng=np.random.default_rng(2))
    assert all(s == pytest.approx(1 / 3) for s in shares.values())


def test_probability_best_bernoulli_matches_numerical_integral() -> None:
    a, b = _bern("a", 400, 0.10), _bern("b", 380, 0.12)
    pa = sps.beta(1 + a.successes, 1 + a.n - a.successes)
    pb = sps.beta(1 + b.successes, 1 + b.n - b.successes)
    # P(B > A) = integral f_B(x) F_A(x) dx
    exact, _ = integrate.quad(lambda x: pb.pdf(x) * pa.cdf(x), 0, 1, limit=200)
    draws = 200_000
    got = probability_best([a, b], draws=draws, rng=np.random.default_rng(3))
    assert got["b"] == pytest.approx(exact, abs=4 * math.sqrt(exact * (1 - exact) / draws))
    assert got["a"] + got["b"] == pytest.approx(1.0)


def test_probability_best_gaussian_matches_closed_form() -> None:
    rng = np.random.default_rng(4)
    xa = rng.normal(10.0, 2.0, size=300)
    xb = rng.normal(10.3, 3.0, size=500)
    arms = [
        ArmStats("a", xa.size, sum=xa.sum(), sumsq=(xa * xa).sum()),
        ArmStats("b", xb.size, sum=xb.sum(), sumsq=(xb * xb).sum()),
    ]
    se = math.sqrt(xa.var(ddof=1) / xa.size + xb.var(ddof=1) / xb.size)
    exact = sps.norm.cdf((xb.mean() - xa.mean()) / se)
    draws = 200_000
    got = probability_best(arms, kind="gaussian", draws=draws, rng=np.random.default_rng(5))
    assert got["b"] == pytest.approx(exact, abs=4 * math.sqrt(exact * (1 - exact) / draws))


def test_top_two_matches_simulated_russo_procedure() -> None:
    """The expected allocation equals the frequencies of Russo's resampling procedure."""
    arms = [_bern("a", 500, 0.10), _bern("b", 500, 0.115), _bern("c", 500, 0.09)]
    beta = 0.5
    shares = thompson_allocation(
        arms,
        top_two=True,
        top_two_beta=beta,
        floor=0.0,
        draws=400_000,
        rng=np.random.default_rng(6),
    )
    rng = np.random.default_rng(7)
    params = [(1 + a.successes, 1 + a.n - a.successes) for a in arms]
    pool = np.column_stack([rng.beta(x, y, size=600_000) for x, y in params]).argmax(axis=1)
    steps, pos = 40_000, 0
    played = np.zeros(3)
    coins = rng.random(steps) < beta
    for t in range(steps):
        leader = pool[pos]
        pos += 1
        if coins[t]:
            played[leader] += 1
            continue
        while pool[pos] == leader:
            pos += 1
        played[pool[pos]] += 1
        pos += 1
    freq = played / steps
    for i, name in enumerate("abc"):
        assert shares[name] == pytest.approx(freq[i], abs=0.015)


def test_top_two_keeps_measuring_the_runner_up_when_one_arm_dominates() -> None:
    arms = [_bern("a", 20_000, 0.10), _bern("b", 20_000, 0.14), _bern("c", 20_000, 0.05)]
    ts = thompson_allocation(arms, floor=0.0, rng=np.random.default_rng(8))
    ttts = thompson_allocation(arms, floor=0.0, top_two=True, rng=np.random.default_rng(8))
    assert ts["b"] > 0.99
    # Russo (2016): the leader gets about beta, the rest goes to challengers
    assert ttts["b"] == pytest.approx(0.5, abs=0.02)
    assert ttts["a"] > ttts["c"]
    assert sum(ttts.values()) == pytest.approx(1.0)


@pytest.mark.parametrize("top_two", [False, True])
def test_simulated_bandit_concentrates_on_the_best_arm(top_two: bool) -> None:
    rng = np.random.default_rng(9)
    true_rates = {"a": 0.10, "b": 0.11, "c": 0.14}
    n = dict.fromkeys(true_rates, 0.0)
    s = dict.fromkeys(true_rates, 0.0)
    batch = 500
    shares: dict[str, float] = {}
    for _ in range(60):
        arms = [ArmStats(k, n[k], successes=s[k]) for k in true_rates]
        shares = thompson_allocation(arms, top_two=top_two, draws=2000, rng=rng)
        units = rng.multinomial(batch, [shares[k] for k in true_rates])
        for k, u in zip(true_rates, units, strict=True):
            n[k] += u
            s[k] += rng.binomial(u, true_rates[k])
    assert n["c"] > 0.4 * sum(n.values())
    if top_two:
        # measuring the runner-up identifies the best arm with confidence
        final = [ArmStats(k, n[k], successes=s[k]) for k in true_rates]
        assert probability_best(final, rng=rng)["c"] > 0.99
        # Russo (2016): the leader's share tends to beta, the runner-up keeps being measured
        assert shares["c"] == pytest.approx(0.5, abs=0.05)
    else:
        assert max(n, key=lambda k: n[k]) == "c"
        assert shares["c"] > 0.6


def test_gaussian_arms_without_enough_units_are_still_drawn() -> None:
    arms = [
        ArmStats("a", 0),
        ArmStats("b", 1, sum=3.0, sumsq=9.0),
        ArmStats("c", 50, 0, 100.0, 260.0),
    ]
    p = probability_best(arms, kind="gaussian", rng=np.random.default_rng(10))
    assert sum(p.values()) == pytest.approx(1.0)
    assert all(v > 0 for v in p.values())


def test_validation() -> None:
    with pytest.raises(ValueError):
        thompson_allocation([ArmStats("a", 10), ArmStats("a", 10)])
    with pytest.raises(ValueError):
        probability_best([ArmStats("a", 10), ArmStats("b", 10)], kind="poisson")  # type: ignore[arg-type]
    assert thompson_allocation([ArmStats("only", 1000, 5)]) == {"only": 1.0}
