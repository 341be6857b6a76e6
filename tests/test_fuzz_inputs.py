"""Fuzzed user inputs: observation files, θ arrays, experiment TOML (issue 9).

Every bad input must give one :class:`SbiEngineError` whose message names the field
(on the CLI: exit code 2 and a single ``error: ...`` line, no traceback); nothing in a
data file is ever unpickled. Hypothesis generates the inputs; ``pytest
--hypothesis-show-statistics`` prints how many cases each test ran.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sbi_engine import BoxUniform
from sbi_engine.cli import _load_array, main
from sbi_engine.errors import ConfigError, SbiEngineError, ShapeError
from sbi_engine.experiment import load_spec, resolve, to_toml
from sbi_engine.npe import NPEConfig, train_npe
from sbi_engine.posterior import Posterior, load_posterior
from sbi_engine.simulate import simulate
from sbi_engine.simulator import get_simulator


def fuzz(max_examples: int) -> settings:
    """Modest, deadline-free settings: the machine running the suite may be loaded."""
    return settings(max_examples=max_examples, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])
X_DIM = 3


class Evil:
    """Unpickling this creates ``marker``: proof that a loader executed pickled code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def one_error_line(code: int, err: str, *needles: str) -> str:
    """The CLI contract for bad input: exit 2, one ``error:`` line naming the problem."""
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny trained posterior, θ (2,) in [-1, 1]², x (3,), saved once for the module."""
    rng = np.random.default_rng(0)
    theta = rng.uniform(-1, 1, size=(256, 2)).astype(np.float32)
    x = np.c_[theta, theta.sum(1)] + 0.1 * rng.normal(size=(256, X_DIM))
    cfg = NPEConfig.for_estimator("maf", hidden=16, transforms=2, max_epochs=2)
    res = train_npe(jax.random.PRNGKey(0), theta, x.astype(np.float32), config=cfg,
                    prior=BoxUniform([-1.0, -1.0], [1.0, 1.0]), progress=False)
    path = tmp_path_factory.mktemp("fuzz_model") / "model"
    res.posterior.save(path)
    return path


@pytest.fixture(scope="module")
def posterior(model) -> Posterior:
    return load_posterior(model)


# ------------------------------------------------------------------------------------
# 1. observation files: `sbi-engine sample MODEL --observation FILE`
# ------------------------------------------------------------------------------------

_DTYPES = st.one_of(
    hnp.floating_dtypes(), hnp.integer_dtypes(), hnp.unsigned_integer_dtypes(),
    hnp.boolean_dtypes(), hnp.complex_number_dtypes(), hnp.unicode_string_dtypes(),
    hnp.byte_string_dtypes(), hnp.datetime64_dtypes(), hnp.timedelta64_dtypes())
_SHAPES = st.sampled_from([(X_DIM,), (1, X_DIM), (4, X_DIM), (), (0,), (0, X_DIM), (2,),
                           (X_DIM, 1), (2, 2, X_DIM), (X_DIM + 1,), (1, 1, X_DIM)])
_ARRAYS = st.one_of(
    hnp.arrays(_DTYPES, _SHAPES),
    hnp.arrays(np.float64, _SHAPES, elements=st.floats(allow_nan=True, allow_infinity=True)),
    hnp.arrays(np.float64, st.just((X_DIM,)),
               elements=st.floats(-1e300, 1e300) | st.sampled_from([np.nan, np.inf, 1e39])))


def _load_checked(posterior, path):
    with warnings.catch_warnings():  # the CLI would print a warning beside the error line
        warnings.simplefilter("error")
        x = _load_array(str(path), "--observation")
        return posterior.check_x(x, field="--observation")


def _expect_valid_or_named(posterior, path):
    """``_load_array`` + ``check_x``: a finite (X,)/(m, X) array, else a ShapeError."""
    try:
        arr, batched = _load_checked(posterior, path)
    except ShapeError as err:
        assert str(err).startswith("--observation:"), err
        return None
    assert arr.dtype == np.float32 and np.isfinite(arr).all()
    assert arr.shape[-1] == X_DIM and arr.ndim == (2 if batched else 1)
    return arr


@fuzz(150)
@given(arr=_ARRAYS)
def test_npy_observation_any_dtype_and_shape(posterior, tmp_path, arr):
    path = tmp_path / "x.npy"
    np.save(path, arr, allow_pickle=False)
    got = _expect_valid_or_named(posterior, path)
    if got is not None:  # accepted only real numbers of the right shape
        assert arr.dtype.kind in "iuf"
        assert np.allclose(got.reshape(-1), arr.astype(np.float32).reshape(-1))


@fuzz(60)
@given(rows=st.lists(st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                                        st.integers(-10**30, 10**30),
                                        st.text(max_size=4)), min_size=0, max_size=5),
                     min_size=0, max_size=4),
       sep=st.sampled_from([",", ";", " ", "\t", ", "]), suffix=st.sampled_from([".csv", ".txt"]))
def test_text_observation(posterior, tmp_path, rows, sep, suffix):
    path = tmp_path / f"x{suffix}"
    path.write_text("\n".join(sep.join(map(str, r)) for r in rows))
    _expect_valid_or_named(posterior, path)


@fuzz(80)
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".npy", ".csv", ".txt", ".npz",
                                                              ".json", ""]),
       npy_header=st.booleans())
def test_garbage_bytes_observation(posterior, tmp_path, data, suffix, npy_header):
    if npy_header and suffix == ".npy":  # a valid magic string, then garbage
        data = b"\x93NUMPY\x01\x00" + data
    path = tmp_path / f"x{suffix}"
    path.write_bytes(data)
    _expect_valid_or_named(posterior, path)


@fuzz(30)
@given(cut=st.integers(0, 200), shape=_SHAPES)
def test_truncated_npy_observation(posterior, tmp_path, cut, shape):
    buf = io.BytesIO()
    np.save(buf, np.ones(shape, np.float32))
    raw = buf.getvalue()
    assume(cut < len(raw))
    path = tmp_path / "x.npy"
    path.write_bytes(raw[:cut])
    _expect_valid_or_named(posterior, path)


def test_pickled_observation_is_refused_without_running_it(posterior, model, tmp_path,
                                                            capsys):
    marker = tmp_path / "PWNED"
    obj = np.empty(X_DIM, dtype=object)
    obj[:] = [Evil(marker)] * X_DIM
    np.save(tmp_path / "evil.npy", obj, allow_pickle=True)
    (tmp_path / "raw.npy").write_bytes(pickle.dumps(Evil(marker)))
    (tmp_path / "raw.csv").write_bytes(pickle.dumps(Evil(marker)))
    for name in ("evil.npy", "raw.npy", "raw.csv"):
        with pytest.raises(ShapeError, match="--observation"):
            _load_checked(posterior, tmp_path / name)
        code = main(["sample", str(model), "--observation", str(tmp_path / name),
                     "--num", "5", "--out", str(tmp_path / "s.npy")])
        one_error_line(code, capsys.readouterr().err, "--observation")
    assert not marker.exists()
    assert not (tmp_path / "s.npy").exists()


_CLI_CASES = st.one_of(
    st.tuples(st.just(".npy"), _ARRAYS),
    st.tuples(st.sampled_from([".csv", ".txt", ".npz", ".npy"]), st.binary(max_size=64)),
)


@fuzz(20)
@given(case=_CLI_CASES)
def test_cli_sample_bad_observation_one_line(model, tmp_path, capsys, case):
    """End to end: a bad file is exit 2 with one ``error: --observation ...`` line."""
    suffix, content = case
    path = tmp_path / f"x{suffix}"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        assume(not (content.dtype.kind in "iuf" and content.shape in ((X_DIM,), (1, X_DIM))
                    and np.isfinite(content.astype(np.float64)).all()
                    and (np.abs(content.astype(np.float64)) < 3e38).all()))
        np.save(path, content, allow_pickle=False)
    out = tmp_path / "s.npy"
    out.unlink(missing_ok=True)
    code = main(["sample", str(model), "--observation", str(path), "--num", "3",
                 "--out", str(out)])
    captured = capsys.readouterr()
    if code == 0:  # only a valid batch (m, X) can get here
        assert np.load(out, allow_pickle=False).shape[-1] == 2
        return
    one_error_line(code, captured.err, "--observation")
    assert not out.exists()


def test_observation_whose_z_score_overflows_names_the_observation(model, posterior, tmp_path,
                                                                    capsys):
    """3e38 is a finite float32, but (x - mean) / std is not: the flow returns NaN for it.

    Hypothesis once drew this; sampling then failed with an acceptance error that did not
    name the observation."""
    np.save(tmp_path / "x.npy", np.full(X_DIM, 3e38, np.float32), allow_pickle=False)
    code = main(["sample", str(model), "--observation", str(tmp_path / "x.npy"), "--num", "3",
                 "--out", str(tmp_path / "s.npy")])
    one_error_line(code, capsys.readouterr().err, "--observation", "no finite θ")
    assert not (tmp_path / "s.npy").exists()
    batch = np.stack([np.zeros(X_DIM), np.full(X_DIM, -3e38)]).astype(np.float32)
    for reject in (True, False):
        with pytest.raises(ShapeError, match=r"^x\[1\]: the estimator returns no finite θ"):
            posterior.sample(jax.random.PRNGKey(0), 3, batch, reject_outside_prior=reject)
    assert posterior.sample(jax.random.PRNGKey(0), 3, batch[0]).shape == (3, 2)


def test_npz_bool_and_complex_observations_are_refused(posterior, tmp_path):
    x = np.zeros(X_DIM)
    np.savez(tmp_path / "x.npz", x=x)
    (tmp_path / "renamed.npy").write_bytes((tmp_path / "x.npz").read_bytes())
    np.save(tmp_path / "bool.npy", x.astype(bool))
    np.save(tmp_path / "complex.npy", x.astype(complex))
    for name, needle in (("x.npz", "expected a .npy or .csv"), ("renamed.npy", "npz archive"),
                         ("bool.npy", "dtype bool"), ("complex.npy", "dtype complex")):
        with pytest.raises(ShapeError, match=needle):
            _load_checked(posterior, tmp_path / name)
    for bad in (x.astype(complex) + 1j, x.astype(str), np.array(["a", "b", "c"])):
        with pytest.raises(ShapeError, match="x: expected a numeric array"):
            posterior.check_x(bad)


def test_cli_sample_empty_and_missing_files(model, tmp_path, capsys):
    for suffix in (".npy", ".csv", ".txt"):
        (tmp_path / f"empty{suffix}").write_bytes(b"")
        code = main(["sample", str(model), "--observation", str(tmp_path / f"empty{suffix}"),
                     "--out", str(tmp_path / "s.npy")])
        one_error_line(code, capsys.readouterr().err, "--observation")
    code = main(["sample", str(model), "--observation", str(tmp_path / "nope.npy"),
                 "--out", str(tmp_path / "s.npy")])
    one_error_line(code, capsys.readouterr().err, "--observation", "does not exist")


# ------------------------------------------------------------------------------------
# 2. θ arrays: simulate(sim, num, seed, theta=...) and pyloric's simulate_features
# ------------------------------------------------------------------------------------

_THETA = st.one_of(
    hnp.arrays(np.float64, st.sampled_from([(2,), (1, 2), (3, 2), (0, 2), (2, 3), (4,), (),
                                            (2, 2, 2), (3, 1)]),
               elements=st.floats(allow_nan=True, allow_infinity=True, width=64)),
    hnp.arrays(np.float64, st.tuples(st.integers(1, 4), st.just(2)),
               elements=st.floats(-1.5, 1.5)),
    hnp.arrays(hnp.unicode_string_dtypes(), st.just((2, 2))),
    st.lists(st.one_of(st.floats(), st.text(max_size=2), st.none()), max_size=3),
)


@fuzz(40)
@given(theta=_THETA)
def test_simulate_theta(theta):
    """two_moons (prior U[-1, 1]²): valid rows simulate, anything else is a ShapeError."""
    sim = get_simulator("two_moons")
    try:
        result = simulate(sim, None, 0, theta=theta, progress=False)
    except ShapeError as err:
        assert str(err).startswith("theta:"), err
        return
    except ConfigError as err:  # zero rows: num is inferred as 0
        assert str(err).startswith("num:"), err
        return
    arr = np.asarray(theta, np.float32).reshape(-1, 2)
    assert np.isfinite(arr).all() and (np.abs(arr) <= 1).all()
    assert result.x.shape == (arr.shape[0], 2)


def test_complex_theta_is_refused():
    with pytest.raises(ShapeError, match="theta"):
        get_simulator("two_moons").check_theta(np.array([[0.5 + 3j, 0.1]]))


@fuzz(30)
@given(shape=st.sampled_from([(30,), (2, 30), (32,), (2, 31, 1), (), (0, 30), (1, 32),
                              (0, 31)]))
def test_pyloric_simulate_features_rejects_wrong_shapes(shape):
    from simulators.pyloric.simulator import simulate_features

    with pytest.raises(ShapeError, match="theta"):
        simulate_features(jax.random.PRNGKey(0), np.zeros(shape))


@fuzz(20)
@given(row=st.integers(0, 1), col=st.integers(0, 30),
       value=st.sampled_from([np.nan, np.inf, -np.inf, "a", 1 + 2j, None]))
def test_pyloric_simulate_features_rejects_bad_values(row, col, value):
    from simulators.pyloric.simulator import simulate_features

    theta = np.ones((2, 31), dtype=object if isinstance(value, str | complex | None) else float)
    theta[row, col] = value
    with pytest.raises(ShapeError, match="theta"):
        simulate_features(jax.random.PRNGKey(0), theta)


@fuzz(30)
@given(row=st.integers(0, 2), col=st.integers(0, 30),
       value=st.sampled_from([np.nan, np.inf, -np.inf, 1e9, -1e9]))
def test_pyloric_engine_theta_checks(row, col, value):
    """Through the registered simulator (what simulate() calls): NaN and out-of-prior θ."""
    sim = get_simulator("pyloric")
    theta = np.array(sim.prior.sample(jax.random.PRNGKey(0), 3))
    theta[row, col] = value
    with pytest.raises(ShapeError, match=f"theta: row {row}, '{sim.parameters[col].name}'"):
        sim.check_theta(theta)


# ------------------------------------------------------------------------------------
# 3. experiment TOML: load_spec / resolve / `sbi-engine run FILE --dry-run`
# ------------------------------------------------------------------------------------

BASE = {
    "name": "fuzz", "type": "npe", "seeds": [0],
    "data": {"simulator": "two_moons", "num_simulations": 500, "num_test": 100},
    "npe": {"estimator": "maf", "max_epochs": 3, "batch_size": 50, "learning_rate": 1e-3,
            "flow": {"hidden": 16, "transforms": 2}},
    "evaluation": {"observations": [1], "num_posterior_samples": 200, "c2st": "fast",
                   "sbc": 20, "sbc_samples": 20},
}
_PATHS = [("name",), ("type",), ("seeds",), ("data", "simulator"),
          ("data", "num_simulations"), ("data", "num_test"), ("npe", "estimator"),
          ("npe", "max_epochs"), ("npe", "batch_size"), ("npe", "learning_rate"),
          ("npe", "flow"), ("npe", "flow", "hidden"), ("npe", "flow", "transforms"),
          ("evaluation", "observations"), ("evaluation", "num_posterior_samples"),
          ("evaluation", "c2st"), ("evaluation", "sbc"), ("evaluation", "sbc_samples")]
_SCALARS = st.one_of(st.booleans(), st.integers(-2**63, 2**63 - 1),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))
_VALUES = st.one_of(_SCALARS, st.lists(_SCALARS, max_size=3),
                    st.dictionaries(st.text(max_size=5), _SCALARS, max_size=2))
_KEYS = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1,
                max_size=10)


def test_base_spec_resolves():
    assert len(resolve(BASE)) == 1


def _set(spec, path, value):
    node = spec
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value


@fuzz(120)
@given(path=st.sampled_from(_PATHS), value=_VALUES)
def test_wrong_type_or_range_is_a_config_error(path, value):
    spec = copy.deepcopy(BASE)
    _set(spec, path, value)
    try:
        resolve(spec)
    except ConfigError:
        pass  # the message content is checked by test_experiment.py; here: no other type


@fuzz(60)
@given(table=st.sampled_from([(), ("data",), ("npe",), ("npe", "flow"), ("evaluation",)]),
       key=_KEYS, value=_SCALARS)
def test_unknown_key_is_named(table, key, value):
    spec = copy.deepcopy(BASE)
    node = spec
    for k in table:
        node = node[k]
    assume(key not in node and key != "presets")
    node[key] = value
    try:
        points = resolve(spec)
    except ConfigError as err:
        assert key in str(err), (key, str(err))
        return
    # Keys the schema accepts that the base leaves out (another section, a field):
    assert points


@fuzz(60)
@given(data=st.one_of(st.binary(max_size=200),
                      st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass"))))
def test_garbage_toml(tmp_path, data):
    path = tmp_path / "exp.toml"
    path.write_bytes(data)
    try:
        spec = load_spec(path)
    except ConfigError as err:
        assert "exp.toml" in str(err)
        return
    with pytest.raises(ConfigError):
        resolve(spec)


@fuzz(15)
@given(path=st.sampled_from(_PATHS), value=_VALUES)
def test_cli_run_dry_run_one_line(tmp_path, capsys, path, value):
    """The same mutations through a TOML file and the CLI: rc 0, or rc 2 and one line."""
    spec = copy.deepcopy(BASE)
    _set(spec, path, value)
    file = tmp_path / "exp.toml"
    file.write_text(to_toml(spec))
    code = main(["run", str(file), "--dry-run"])
    err = capsys.readouterr().err
    if code != 0:
        one_error_line(code, err)


def test_wrong_type_error_types_are_engine_errors():
    """A spot check that the loop above really hits ConfigError (not a vacuous pass)."""
    spec = copy.deepcopy(BASE)
    spec["npe"]["max_epochs"] = "many"
    with pytest.raises(SbiEngineError, match="max_epochs"):
        resolve(spec)
