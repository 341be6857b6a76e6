"""Small simulators used by the tests (module-level so worker processes can import them)."""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from sbi_engine import BlackBoxSimulator, JaxSimulator, Parameter

PARAMS = (Parameter("a", -1.0, 1.0), Parameter("b", -1.0, 1.0))


def gauss_fn(key, theta, nu):
    """x = theta + 0.1 * noise, NaN when a > 0.95 (a simulated failure region)."""
    x = theta + 0.1 * jax.random.normal(key, theta.shape)
    return jnp.where(theta[0] > 0.95, jnp.nan, x)


def shifted_fn(key, theta, nu):
    """x = theta + nu + noise: a simulator with one nuisance parameter."""
    return theta + nu[0] + 0.1 * jax.random.normal(key, theta.shape)


def flaky_fn(theta, nu, rng):
    """Black-box: raises for a > 0.8, NaN for b > 0.9, wrong shape for a < -0.9."""
    if theta[0] > 0.8:
        raise RuntimeError("solver diverged")
    if theta[0] < -0.9:
        return np.zeros(3)
    x = theta + 0.1 * rng.normal(size=2)
    if theta[1] > 0.9:
        x[0] = np.nan
    return x


def noise_batch_fn(theta, nu, rng):
    """Batched black-box: ``x (n, 2) = θ + noise`` from one generator for the batch."""
    return theta + 0.1 * rng.normal(size=theta.shape)


def pid_fn(theta, nu, rng):
    """Black-box returning the worker's pid in x[1] (to see that workers are used)."""
    return np.array([theta[0] + 0.1 * rng.normal(), float(os.getpid())])


def slow_fn(theta, nu, rng):
    time.sleep(0.002)
    return theta + 0.1 * rng.normal(size=2)


def gauss() -> JaxSimulator:
    return JaxSimulator("toy_gauss", PARAMS, ("x1", "x2"), gauss_fn, description="toy")


def shifted() -> JaxSimulator:
    return JaxSimulator("toy_shifted", PARAMS, ("x1", "x2"), shifted_fn,
                        nuisances=(Parameter("shift", -0.5, 0.5, nominal=0.0),))


def flaky() -> BlackBoxSimulator:
    return BlackBoxSimulator("toy_flaky", PARAMS, ("x1", "x2"), flaky_fn)


def noise_batch() -> BlackBoxSimulator:
    return BlackBoxSimulator("toy_noise_batch", PARAMS, ("x1", "x2"), noise_batch_fn,
                             batched=True)


def pid() -> BlackBoxSimulator:
    return BlackBoxSimulator("toy_pid", PARAMS[:1], ("x", "pid"), pid_fn)


def slow() -> BlackBoxSimulator:
    return BlackBoxSimulator("toy_slow", PARAMS, ("x1", "x2"), slow_fn)
