"""Simulator contract, failure capture, worker pools, registry (in-process, entry points)."""

import textwrap

import jax
import numpy as np
import pytest

from sbi_engine import (
    ConfigError,
    JaxSimulator,
    Parameter,
    ShapeError,
    UnknownSimulatorError,
    get_simulator,
    list_simulators,
    register_simulator,
)
from sbi_engine import simulator as simulator_mod
from sbi_engine.simulator import row_keys
from tests import toy_simulators as toys

KEY = jax.random.PRNGKey(0)


def test_jax_simulator_batched_equals_loop_and_is_deterministic():
    sim = toys.gauss()
    theta = np.asarray(sim.prior.sample(KEY, 16))
    x = np.asarray(sim.simulate(KEY, theta))
    assert x.shape == (16, 2) and x.dtype == np.float32
    keys = row_keys(KEY, 0, 16)
    loop = np.stack([np.asarray(toys.gauss_fn(keys[i], theta[i], None)) for i in range(16)])
    np.testing.assert_allclose(x, loop, rtol=1e-6, equal_nan=True)
    np.testing.assert_array_equal(x, np.asarray(sim.simulate(KEY, theta)))
    assert not np.allclose(x, np.asarray(sim.simulate(jax.random.PRNGKey(1), theta)))


def test_row_keys_do_not_depend_on_batching():
    a = np.asarray(row_keys(KEY, 0, 10))
    b = np.concatenate([np.asarray(row_keys(KEY, 0, 4)), np.asarray(row_keys(KEY, 4, 6))])
    np.testing.assert_array_equal(a, b)


def test_nuisances_default_to_nominal_and_shift_output():
    sim = toys.shifted()
    theta = np.zeros((2000, 2), np.float32)
    x0 = np.asarray(sim.simulate(KEY, theta))
    x1 = np.asarray(sim.simulate(KEY, theta, np.full((2000, 1), 0.5, np.float32)))
    assert abs(x0.mean()) < 0.01 and abs(x1.mean() - 0.5) < 0.01
    with pytest.raises(ShapeError, match="nu: expected shape \\(n, 1\\)"):
        sim.simulate(KEY, theta, np.zeros((2000, 2)))
    with pytest.raises(ShapeError, match="'shift' = 0.9 is outside"):
        sim.simulate(KEY, theta, np.full((2000, 1), 0.9))


@pytest.mark.parametrize(
    ("theta", "match"),
    [
        (np.zeros((3, 3)), "expected shape \\(n, 2\\), got \\(3, 3\\)"),
        (np.array([[0.0, np.nan]]), "row 0, 'b' is nan"),
        (np.array([[0.0, 0.0], [2.0, 0.0]]), "row 1, 'a' = 2 is outside the prior support"),
        ("abc", "numeric array"),
    ],
)
def test_bad_theta_is_a_named_error(theta, match):
    with pytest.raises(ShapeError, match=match):
        toys.gauss().simulate(KEY, theta)


def test_blackbox_failures_become_counted_nan_rows():
    sim = toys.flaky()
    theta = np.array([[0.0, 0.0], [0.9, 0.0], [-0.95, 0.0], [0.0, 0.95], [0.1, 0.1]], np.float32)
    keys = np.asarray(row_keys(KEY, 0, 5))
    x, report = sim.simulate_rows(keys, theta)
    assert np.isfinite(x[[0, 4]]).all()
    assert np.isnan(x[1:4]).all()
    assert report.total == 5 and report.invalid == 3
    assert report.errors["RuntimeError"] == 1
    assert report.errors["wrong shape (3,), expected (2,)"] == 1
    assert report.errors["non-finite output"] == 1
    # Each row's randomness depends only on its key: same rows, same numbers.
    x2, _ = sim.simulate_rows(keys[[0, 4]], theta[[0, 4]])
    np.testing.assert_array_equal(x2, x[[0, 4]])


def test_blackbox_process_pool_matches_serial_and_uses_workers():
    sim = toys.pid()
    theta = np.linspace(-0.5, 0.5, 40, dtype=np.float32)[:, None]
    keys = np.asarray(row_keys(KEY, 0, 40))
    serial, _ = sim.simulate_rows(keys, theta)
    pooled, report = sim.simulate_rows(keys, theta, workers=2)
    np.testing.assert_array_equal(serial[:, 0], pooled[:, 0])
    assert report.invalid == 0
    assert len(set(pooled[:, 1].tolist())) == 2  # two distinct worker processes


def test_registry_in_process_and_errors():
    register_simulator("toy_registered", toys.gauss, overwrite=True)
    try:
        assert "toy_registered" in list_simulators()
        assert get_simulator("TOY_Registered").name == "toy_gauss"
        with pytest.raises(ConfigError, match="already registered"):
            register_simulator("toy_registered", toys.gauss)
    finally:
        simulator_mod._REGISTRY.pop("toy_registered", None)
    with pytest.raises(UnknownSimulatorError, match="unknown simulator 'nope'; known: .*two_moons"):
        get_simulator("nope")


def test_entry_point_plugin_is_discovered(tmp_path, monkeypatch):
    """A third-party package registering through the `sbi_engine.simulators` group."""
    pkg = tmp_path / "my_plugin"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent("""
        import jax
        from sbi_engine import JaxSimulator, Parameter

        def build(scale=1.0):
            return JaxSimulator("plugged", [Parameter("mu", -5, 5)], ["y"],
                                lambda key, theta, nu: theta + scale * jax.random.normal(key, (1,)),
                                description="a plug-in")
    """))
    dist = tmp_path / "my_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[sbi_engine.simulators]\nplugged = my_plugin:build\nbroken = my_plugin:missing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert {"plugged", "broken"} <= set(list_simulators())
    sim = get_simulator("plugged")
    assert sim.description == "a plug-in" and sim.dim_x == 1
    assert get_simulator("plugged", scale=0.0).simulate(KEY, [[2.0]])[0, 0] == 2.0
    with pytest.raises(UnknownSimulatorError, match="plug-in 'my_plugin:missing' failed to load"):
        get_simulator("broken")
    with pytest.raises(ConfigError, match="bad options"):
        get_simulator("plugged", nonsense=1)


def test_simulator_spec_validation():
    p = [Parameter("a", 0, 1)]
    with pytest.raises(ConfigError, match="lowercase"):
        JaxSimulator("Bad Name", p, ["x"], toys.gauss_fn)
    with pytest.raises(ConfigError, match="duplicate parameter names \\['a'\\]"):
        JaxSimulator("dup", p + p, ["x"], toys.gauss_fn)
    with pytest.raises(ConfigError, match="at least one observable"):
        JaxSimulator("noobs", p, [], toys.gauss_fn)
