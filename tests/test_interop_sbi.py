"""The sbi (PyTorch) backend: prior conversion, training, SbiPosterior, files without pickle."""

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sbi")

from sbi.utils import BoxUniform as SbiBoxUniform  # noqa: E402
from sbi.utils import MultipleIndependent  # noqa: E402
from sbi.utils.sbiutils import within_support  # noqa: E402
from scipy.stats import truncnorm  # noqa: E402

from sbi_engine.errors import ConfigError, ShapeError  # noqa: E402
from sbi_engine.flows import FlowConfig  # noqa: E402
from sbi_engine.flows.embedding import MLPEmbedding  # noqa: E402
from sbi_engine.interop.sbi import (  # noqa: E402
    FORMAT,
    SbiPosterior,
    TorchLogUniform,
    TorchTruncatedNormal,
    _posterior_nn_kwargs,
    to_sbi_prior,
    torch_device,
    torch_device_like_jax,
    train_sbi,
)
from sbi_engine.npe import NPEConfig, TrainResult  # noqa: E402
from sbi_engine.posterior import PosteriorFileError, SamplingError, load_posterior  # noqa: E402
from sbi_engine.priors import (  # noqa: E402
    BoxUniform,
    Gaussian,
    LogUniform,
    ProductPrior,
    TruncatedGaussian,
)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- priors ------------------------------------------------------------------------------

PRIORS = {
    "box": lambda: BoxUniform([-1.0, 0.0], [1.0, 3.0]),
    "log_uniform": lambda: LogUniform([0.1, 1.0], [10.0, 2.0]),
    "gaussian": lambda: Gaussian([0.5, -1.0], [[1.0, 0.3], [0.3, 2.0]]),
    "truncated": lambda: TruncatedGaussian([0.0, 1.0], [1.0, 0.5], [-0.5, 2.0], [np.inf, 4.0]),
    "product": lambda: ProductPrior([
        BoxUniform([-1.0], [1.0]),
        ProductPrior([LogUniform([0.1], [10.0]), Gaussian([0.0, 1.0], [1.0, 2.0])]),
        TruncatedGaussian([0.0], [1.0], [0.0], [np.inf]),
    ]),
}


def _outside(prior, inside):
    """Copies of ``inside`` rows pushed out of the support in one coordinate each."""
    low, high = prior.support
    rows = []
    for d in range(prior.dim):
        if np.isfinite(high[d]):
            r = inside[0].copy()
            r[d] = high[d] + 1.0
            rows.append(r)
        if np.isfinite(low[d]):
            r = inside[0].copy()
            r[d] = low[d] - 0.5
            rows.append(r)
    return np.array(rows, np.float32).reshape(-1, prior.dim)


@pytest.mark.parametrize("name", sorted(PRIORS))
def test_prior_conversion_matches_log_prob_and_support(name):
    prior = PRIORS[name]()
    dist = to_sbi_prior(prior)
    assert tuple(dist.event_shape) == (prior.dim,)
    ours = np.asarray(prior.sample(jax.random.PRNGKey(0), 5000))
    inside = ours[:200]
    points = np.concatenate([inside, _outside(prior, inside)])
    ours_lp = np.asarray(prior.log_prob(points))
    theirs_lp = dist.log_prob(torch.from_numpy(points)).numpy()
    np.testing.assert_array_equal(np.isfinite(theirs_lp), np.isfinite(ours_lp))
    np.testing.assert_allclose(theirs_lp[np.isfinite(ours_lp)], ours_lp[np.isfinite(ours_lp)],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(within_support(dist, torch.from_numpy(points)).numpy(),
                                  np.asarray(prior.in_support(points)))
    # Torch samples live in our support and have the prior's moments.
    torch.manual_seed(0)
    draws = dist.sample((5000,)).numpy()
    assert draws.shape == (5000, prior.dim) and draws.dtype == np.float32
    low, high = prior.support
    assert ((draws >= low) & (draws <= high)).all()
    np.testing.assert_allclose(draws.mean(0), ours.mean(0), atol=0.1 * ours.std(0).max())


def test_prior_conversion_types_and_exact_truncated_normal():
    assert isinstance(to_sbi_prior(PRIORS["box"]()), SbiBoxUniform)
    assert isinstance(to_sbi_prior(PRIORS["log_uniform"]()), TorchLogUniform)
    product = to_sbi_prior(PRIORS["product"]())
    assert isinstance(product, MultipleIndependent) and len(product.dists) == 4  # flattened
    # Far-tail truncation: inverse-CDF sampling must stay exact (mean of N(0,1) on [5, 6]).
    tn = to_sbi_prior(TruncatedGaussian([0.0], [1.0], [5.0], [6.0]))
    assert isinstance(tn, TorchTruncatedNormal)
    torch.manual_seed(0)
    draws = tn.sample((20_000,)).numpy()[:, 0]
    assert (draws >= 5).all() and (draws <= 6).all()
    assert abs(draws.mean() - truncnorm.mean(5.0, 6.0)) < 0.01
    assert abs(float(tn.mean[0]) - truncnorm.mean(5.0, 6.0)) < 1e-4
    with pytest.raises(ConfigError, match="Prior"):
        to_sbi_prior("uniform")


def test_flow_config_maps_to_posterior_nn():
    kw = _posterior_nn_kwargs(FlowConfig(kind="nsf_ar", hidden=20, transforms=3, bins=6))
    assert kw["model"] == "maf_rqs"
    assert (kw["hidden_features"], kw["num_transforms"], kw["num_bins"]) == (20, 3, 6)
    assert _posterior_nn_kwargs(FlowConfig(kind="nsf"))["model"] == "nsf"
    for bad, field in [(dict(z_score_theta="transform_to_unconstrained"), "z_score_theta"),
                       (dict(embedding=MLPEmbedding()), "embedding"),
                       (dict(permutation="reverse"), "permutation"),
                       (dict(maf_scale="unit_softplus"), "maf_scale"),
                       (dict(kind="nsf", min_derivative=1e-2), "min_derivative")]:
        with pytest.raises(ConfigError, match=field):
            _posterior_nn_kwargs(FlowConfig(**bad))


# -- training on a conjugate Gaussian ------------------------------------------------------
# θ ~ N(0, I₂), x = θ + 0.5 ε  →  θ | x ~ N(x / 1.25, 0.2 I).

def conjugate_data(n, seed=0):
    rng = np.random.default_rng(seed)
    theta = rng.normal(size=(n, 2)).astype(np.float32)
    x = (theta + 0.5 * rng.normal(size=(n, 2))).astype(np.float32)
    return theta, x


SMALL = NPEConfig(flow=FlowConfig(kind="maf", hidden=20, transforms=2), max_epochs=30,
                  batch_size=50, learning_rate=3e-3)
PRIOR = Gaussian([0.0, 0.0], np.eye(2))


@pytest.fixture(scope="module")
def trained():
    theta, x = conjugate_data(1000)
    x[:5] = np.nan
    theta[5] = np.inf
    before = torch.get_rng_state()
    # nflows' MADE never lets the first feature of each layer see the context
    # (bayesiains/nflows#85), so a 2-D MAF whose random permutations keep the same
    # feature first in both layers cannot condition it on x; seed 3 draws a swap.
    result = train_sbi(theta, x, prior=PRIOR, config=SMALL, seed=3, progress=False)
    assert torch.equal(torch.get_rng_state(), before)  # caller's torch RNG untouched
    return result


def test_training_recovers_the_analytic_posterior(trained):
    assert trained.excluded == 6
    post = trained.posterior
    for i, xo in enumerate([np.array([1.0, -0.5], np.float32),
                            np.array([-1.5, 0.3], np.float32)]):
        s = post.sample(jax.random.PRNGKey(i), 2000, xo)
        assert s.shape == (2000, 2)
        np.testing.assert_allclose(s.mean(0), xo / 1.25, atol=0.2)
        np.testing.assert_allclose(s.std(0), np.sqrt(0.2), atol=0.1)
    theta_map = post.map(np.array([1.0, -0.5], np.float32), key=jax.random.PRNGKey(3), steps=100)
    np.testing.assert_allclose(theta_map, [0.8, -0.4], atol=0.2)


def test_result_has_the_train_result_surface(trained):
    reference = TrainResult(posterior=None, train_loss=[1.0], val_loss=[1.0], best_epoch=0,
                            epochs=1, excluded=0, seconds=1.0, compilations=1)
    s = trained.summary()
    assert s.keys() == reference.summary().keys()
    assert s["compilations"] == 0 and s["excluded_rows"] == 6
    assert trained.epochs == len(trained.train_loss) == len(trained.val_loss) <= 30
    assert trained.val_loss[trained.best_epoch] == min(trained.val_loss)
    assert trained.train_loss[-1] < trained.train_loss[0]
    meta = trained.posterior.metadata
    assert meta["backend"] == "sbi" and meta["best_epoch"] == trained.best_epoch
    assert meta["num_train"] == int(0.9 * 994)
    assert meta["device"] == "cpu"


def test_training_is_deterministic_given_the_seed_and_epoch_cap_matches():
    theta, x = conjugate_data(200)
    cfg = NPEConfig(flow=FlowConfig(kind="nsf", hidden=8, transforms=1), max_epochs=2)
    a = train_sbi(theta, x, prior=PRIOR, config=cfg, seed=3, progress=False)
    b = train_sbi(theta, x, prior=PRIOR, config=cfg, seed=3, progress=False)
    assert a.epochs == 2  # sbi itself would run max_num_epochs + 1
    assert a.train_loss == b.train_loss and a.val_loss == b.val_loss
    for (ka, va), (kb, vb) in zip(a.posterior.net.state_dict().items(),
                                  b.posterior.net.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


@pytest.mark.parametrize("kind", ["nsf", "nsf_ar"])
def test_spline_flows_and_shaped_x_round_trip(kind, tmp_path):
    theta, x = conjugate_data(200)
    x = x.reshape(200, 1, 2)  # observations with a shape: flattened for sbi, checked as (1, 2)
    cfg = NPEConfig(flow=FlowConfig(kind=kind, hidden=8, transforms=2, bins=4), max_epochs=2)
    prior = PRIOR if kind == "nsf" else None  # no prior: no rejection, saved as null
    post = train_sbi(theta, x, prior=prior, config=cfg, seed=0, progress=False).posterior
    assert post.x_shape == (1, 2) and post.theta_dim == 2
    loaded = SbiPosterior.load(post.save(tmp_path / kind))
    assert loaded.prior == prior
    xo = np.zeros((1, 2), np.float32)
    draws = loaded.sample(jax.random.PRNGKey(0), 20, xo)
    np.testing.assert_array_equal(draws, post.sample(jax.random.PRNGKey(0), 20, xo))
    np.testing.assert_array_equal(loaded.log_prob(draws, xo), post.log_prob(draws, xo))
    with pytest.raises(ShapeError, match=r"expected shape \(1, 2\)"):
        post.sample(jax.random.PRNGKey(0), 5, np.zeros(2))


def test_sampling_is_deterministic_and_batched(trained):
    post = trained.posterior
    xo = np.array([0.3, 0.1], np.float32)
    a = post.sample(jax.random.PRNGKey(7), 100, xo)
    np.testing.assert_array_equal(a, post.sample(jax.random.PRNGKey(7), 100, xo))
    assert not np.array_equal(a, post.sample(jax.random.PRNGKey(8), 100, xo))
    xs = np.stack([xo, -xo, 2 * xo])
    batch = post.sample(jax.random.PRNGKey(7), 50, xs)
    assert batch.shape == (3, 50, 2)
    keys = jax.random.split(jax.random.PRNGKey(7), 3)
    np.testing.assert_array_equal(batch[1], post.sample(keys[1], 50, xs[1]))
    lp = post.log_prob(a, xo)
    assert lp.shape == (100,) and np.isfinite(lp).all()
    np.testing.assert_allclose(post.log_prob(a[:3], xs), [post.log_prob(a[i:i + 1], xs[i])[0]
                                                          for i in range(3)], rtol=1e-5)


def test_rejection_outside_the_prior(trained):
    box = SbiPosterior(trained.posterior.net, config=SMALL, prior=BoxUniform([0.0, -1.0],
                       [2.0, 1.0]), x_shape=(2,))
    s = box.sample(jax.random.PRNGKey(0), 500, np.array([0.2, -0.5], np.float32))
    assert s.shape == (500, 2) and (s[:, 0] >= 0).all()
    assert 0.2 < box.acceptance_rate < 0.9
    lp = box.log_prob(np.array([[-1.0, 0.0], [1.0, 0.0]], np.float32), np.zeros(2))
    assert lp[0] == -np.inf and np.isfinite(lp[1])
    far = SbiPosterior(trained.posterior.net, config=SMALL, prior=BoxUniform([8.0, 8.0],
                       [9.0, 9.0]), x_shape=(2,))
    with pytest.raises(SamplingError, match="prior support"):
        far.sample(jax.random.PRNGKey(0), 10, np.zeros(2, np.float32))
    assert far.acceptance_rate < 1e-3


@pytest.mark.parametrize("x, match", [
    (np.zeros(3), r"expected shape \(2,\)"),
    (np.array([np.nan, 0.0]), "NaN"),
    (np.zeros((2, 2, 2)), "expected shape"),
])
def test_bad_observations_are_named(trained, x, match):
    with pytest.raises(ShapeError, match=match):
        trained.posterior.sample(jax.random.PRNGKey(0), 5, x)
    with pytest.raises(ShapeError, match="x_o"):
        trained.posterior.check_x(x, field="x_o")


def test_bad_arguments(trained):
    post = trained.posterior
    with pytest.raises(ShapeError, match="theta"):
        post.log_prob(np.zeros((4, 3)), np.zeros(2))
    with pytest.raises(ShapeError, match="observations"):
        post.log_prob(np.zeros((4, 2)), np.zeros((3, 2)))
    with pytest.raises(ShapeError, match="n:"):
        post.sample(jax.random.PRNGKey(0), 0, np.zeros(2))
    theta, x = conjugate_data(50)
    with pytest.raises(ShapeError, match="theta"):
        train_sbi(theta[:, 0], x, prior=PRIOR, config=SMALL, progress=False)
    with pytest.raises(ShapeError, match="x:"):
        train_sbi(theta, x[:10], prior=PRIOR, config=SMALL, progress=False)
    with pytest.raises(ShapeError, match="dimension 3"):
        train_sbi(theta, x, prior=Gaussian(np.zeros(3), 1.0), config=SMALL, progress=False)
    with pytest.raises(ShapeError, match="finite rows"):
        train_sbi(theta[:2], x[:2] * np.nan, prior=PRIOR, config=SMALL, progress=False)
    with pytest.raises(ConfigError, match="max_epochs"):
        train_sbi(theta, x, prior=PRIOR, progress=False, config=NPEConfig(max_epochs=1))
    with pytest.raises(ConfigError, match="z_score_theta"):
        train_sbi(theta, x, prior=PRIOR, progress=False, config=NPEConfig(
            flow=FlowConfig(z_score_theta="transform_to_unconstrained")))


@pytest.mark.parametrize("device, match", [
    ("gpu", "expected 'cpu', 'cuda' or 'cuda:N'"),
    ("cuda:x", "expected 'cpu', 'cuda' or 'cuda:N'"),
    ("mps", "expected 'cpu', 'cuda' or 'cuda:N'"),
    (3, "expected 'cpu', 'cuda' or 'cuda:N'"),
])
def test_bad_devices_fail_before_training(device, match):
    theta, x = conjugate_data(50)
    with pytest.raises(ConfigError, match=match):
        train_sbi(theta, x, prior=PRIOR, config=SMALL, progress=False, device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_a_cuda_device_torch_does_not_see_is_named():
    theta, x = conjugate_data(50)
    with pytest.raises(ConfigError, match="device 'cuda'.*sees no CUDA device"):
        train_sbi(theta, x, prior=PRIOR, config=SMALL, progress=False, device="cuda")
    assert torch_device("cpu") == torch.device("cpu")


def test_the_sbi_backend_follows_jax_onto_a_gpu_only_where_torch_sees_one(monkeypatch):
    import types

    assert torch_device_like_jax() == ("cpu", "")  # the tests' JAX runs on the CPU
    monkeypatch.setattr(jax, "devices", lambda *a: [types.SimpleNamespace(platform="gpu")])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    device, note = torch_device_like_jax()
    assert device == "cpu" and "sees none" in note
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert torch_device_like_jax() == ("cuda", "")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_on_cuda_gives_a_cpu_posterior(trained, tmp_path):
    theta, x = conjugate_data(1000)
    x[:5] = np.nan  # the data of the ``trained`` fixture
    theta[5] = np.inf
    result = train_sbi(theta, x, prior=PRIOR, config=SMALL, seed=3, progress=False,
                       device="cuda")
    post = result.posterior
    assert post.metadata["device"].startswith("cuda")
    assert all(p.device.type == "cpu" for p in post.net.parameters())
    xo = np.array([1.0, -0.5], np.float32)
    s = post.sample(jax.random.PRNGKey(0), 2000, xo)
    np.testing.assert_allclose(s.mean(0), xo / 1.25, atol=0.2)
    np.testing.assert_allclose(s.std(0), np.sqrt(0.2), atol=0.1)
    # Same data, initial weights (drawn on the CPU), split and minibatch order; only the
    # device's rounding differs, so the first epochs follow the CPU run's curve.
    np.testing.assert_allclose(result.val_loss[:5], trained.val_loss[:5], rtol=1e-2)
    loaded = SbiPosterior.load(post.save(tmp_path / "m"))
    np.testing.assert_allclose(loaded.log_prob(s[:10], xo), post.log_prob(s[:10], xo),
                               rtol=1e-5)


# -- files -----------------------------------------------------------------------------------

def _rewrite(model, mutate_header=None, mutate_state=None):
    """Change a saved model in place, keeping the checksums consistent (a crafted file)."""
    import hashlib
    import io

    from sbi_engine.posterior import seal_header

    header = json.loads((model / "posterior.json").read_text())
    if mutate_state is not None:
        with np.load(model / "weights.npz", allow_pickle=False) as npz:
            state = {k: npz[k] for k in npz.files}
        mutate_state(state)
        buf = io.BytesIO()
        np.savez(buf, **state)
        (model / "weights.npz").write_bytes(buf.getvalue())
    header["weights"]["sha256"] = hashlib.sha256((model / "weights.npz").read_bytes()).hexdigest()
    if mutate_header is not None:
        mutate_header(header)
    (model / "posterior.json").write_text(json.dumps(seal_header(header)))


def test_save_load_round_trip(trained, tmp_path):
    post = trained.posterior
    post.metadata["note"] = "round trip"
    path = post.save(tmp_path / "model")
    assert sorted(p.name for p in path.iterdir()) == ["posterior.json", "weights.npz"]
    header = json.loads((path / "posterior.json").read_text())
    assert header["format"] == FORMAT and header["theta_dim"] == 2 and header["x_shape"] == [2]
    assert header["npe"] == SMALL.to_dict() and header["prior"] == PRIOR.to_dict()
    for loaded in (SbiPosterior.load(path), load_posterior(path)):
        assert isinstance(loaded, SbiPosterior)
        assert loaded.prior == PRIOR and loaded.metadata["note"] == "round trip"
        xo = np.array([0.5, 0.5], np.float32)
        key = jax.random.PRNGKey(11)
        np.testing.assert_array_equal(loaded.sample(key, 300, xo), post.sample(key, 300, xo))
        theta = post.sample(key, 10, xo)
        np.testing.assert_array_equal(loaded.log_prob(theta, xo), post.log_prob(theta, xo))
    post.save(path)  # overwriting an existing model is atomic and allowed
    SbiPosterior.load(path)


def test_bad_files_are_refused(trained, tmp_path):
    good = trained.posterior.save(tmp_path / "good")

    def fresh(name):
        return trained.posterior.save(tmp_path / name)

    with pytest.raises(PosteriorFileError, match="expected a directory"):
        SbiPosterior.load(tmp_path / "missing")
    m = fresh("json")
    (m / "posterior.json").write_text("{not json")
    with pytest.raises(PosteriorFileError, match="not valid JSON"):
        SbiPosterior.load(m)
    m = fresh("format")
    _rewrite(m, mutate_header=lambda h: h.update(format="sbi-engine-posterior"))
    with pytest.raises(PosteriorFileError, match="not an sbi-engine"):
        SbiPosterior.load(m)
    m = fresh("version")
    _rewrite(m, mutate_header=lambda h: h.update(format_version=9))
    with pytest.raises(PosteriorFileError, match="format version 9"):
        SbiPosterior.load(m)
    m = fresh("config")
    _rewrite(m, mutate_header=lambda h: h["npe"].update(bogus=1))
    with pytest.raises(PosteriorFileError, match="bogus"):
        SbiPosterior.load(m)
    m = fresh("dims")
    _rewrite(m, mutate_header=lambda h: h.update(theta_dim=3))
    with pytest.raises(PosteriorFileError, match="theta_dim"):
        SbiPosterior.load(m)
    m = fresh("checksum")
    raw = bytearray((m / "weights.npz").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (m / "weights.npz").write_bytes(bytes(raw))
    with pytest.raises(PosteriorFileError, match="checksum"):
        SbiPosterior.load(m)
    m = fresh("garbage")
    (m / "weights.npz").write_bytes(b"PK\x03\x04 not a zip at all")
    _rewrite(m)
    with pytest.raises(PosteriorFileError, match="corrupted"):
        SbiPosterior.load(m)
    m = fresh("shape")
    with np.load(good / "weights.npz", allow_pickle=False) as npz:
        key = next(k for k in npz.files if k.endswith("weight"))
    _rewrite(m, mutate_state=lambda s: s.update({key: np.zeros((3, 3), np.float32)}))
    with pytest.raises(PosteriorFileError, match="has shape"):
        SbiPosterior.load(m)
    m = fresh("missing_key")
    _rewrite(m, mutate_state=lambda s: s.pop(key))
    with pytest.raises(PosteriorFileError, match="missing"):
        SbiPosterior.load(m)
    m = fresh("pickle")  # an object array would need unpickling: refused, never run
    _rewrite(m, mutate_state=lambda s: s.update({key: np.array([{"a": 1}], dtype=object)}))
    with pytest.raises(PosteriorFileError, match="corrupted"):
        SbiPosterior.load(m)
    for field, value in (("hidden", 2**30), ("transforms", 10**6)):
        m = fresh(f"huge_{field}")  # refused before a network of that size is built
        _rewrite(m, mutate_header=lambda h, f=field, v=value: h["npe"]["flow"].update({f: v}))
        with pytest.raises(PosteriorFileError, match=f"flow.{field}"):
            SbiPosterior.load(m)
    m = fresh("huge_x")
    _rewrite(m, mutate_header=lambda h: h.update(x_shape=[2**31]))
    with pytest.raises(PosteriorFileError, match="x_shape"):
        SbiPosterior.load(m)
    SbiPosterior.load(good)  # the untouched copy still loads
