"""Published-number tests of the classifiers on the INFERNO toy (slow).

de Castro & Dorigo 2019 (arXiv:1806.04743), Table 2: expected uncertainty on the signal
yield ``s`` from the binned summary's Fisher information, evaluated as the authors do
(10 bins, templates at ``r ± 0.2`` and ``λ ± 0.5``; :func:`sbi_engine.classify.binned_fisher`).
``experiments/bench_inferno.py`` prints the whole table. Also the smoke tests of
``experiments/bench_inferno.py`` and ``experiments/bench_systematics.py``.
"""

import jax
import numpy as np
import pytest

from sbi_engine import classify as C
from sbi_engine.events import make_dataset
from simulators.toy_physics import inferno

pytestmark = pytest.mark.slow

STEPS = {"r": 0.2, "lambda": 0.5}


@pytest.fixture(scope="module")
def gen():
    return inferno.build()


@pytest.fixture(scope="module")
def train(gen):
    events = jax.jit(make_dataset, static_argnums=(1, 3))(jax.random.key(0), gen, None,
                                                          50_000)
    return C.train_data(events)


def _uncertainties(fisher, gen):
    to_s = np.diag([1.0 / gen.s_exp, 1.0, 1.0, 1.0])
    return [{b: inferno.expected_uncertainty(to_s @ f @ to_s, b) for b in inferno.BENCHMARKS}
            for f in np.reshape(fisher, (-1, 4, 4))]


def test_cross_entropy_b0_b2_match_the_paper(gen, train):
    """Median of 3 BCE classifiers (the authors' 2 x 100 ReLU net): B0 and B2 within 10 % of
    the published 14.99 and 23.94 (measured: ≈ +0.5 % and ≈ +3 %)."""
    cfg = C.ClassifierConfig(hidden=(100, 100), steps=3000, batch_size=256)
    res = C.train_many(jax.random.split(jax.random.key(1), 3), train, cfg)
    predict = jax.jit(C.predict_many)
    fisher = C.binned_fisher(lambda x: predict(res.params, x), gen, jax.random.key(2),
                             n=200_000, edges=10, steps=STEPS)
    sig = _uncertainties(fisher, gen)
    published = dict(zip(inferno.BENCHMARKS, inferno.PUBLISHED["cross_entropy"]))
    for b in ("B0", "B2"):
        median = float(np.median([s[b] for s in sig]))
        assert median == pytest.approx(published[b], rel=0.10), (b, [s[b] for s in sig])
    # and no binned summary beats the exact likelihood (B0: 14.71)
    assert min(s["B0"] for s in sig) > 0.98 * inferno.PUBLISHED["analytic"][0]


def test_inferno_b2_beats_cross_entropy_and_matches_the_paper(gen, train):
    """INFERNO trained for B2 (r, λ profiled): hard-binned σ_s on B2 within 10 % of the
    published 16.95 (measured ≈ 16.9), far below cross-entropy's ≈ 24, and above the
    analytic bound 15.65."""
    free, constrain = inferno.BENCHMARKS["B2"]
    cfg = C.ClassifierConfig(hidden=(100, 100), loss="inferno", bins=10, temperature=0.1,
                             free_nuisances=free, constrain=constrain, steps=1000,
                             inferno_events=1000)
    res = C.train_one(jax.random.key(3), train, cfg, generator=gen)
    assert np.all(np.isfinite(res.metrics["sigma_s"]))
    predict = jax.jit(C.predict)
    fisher = C.binned_fisher(lambda x: predict(res.params, x), gen, jax.random.key(2),
                             n=200_000, edges=10, steps=STEPS)
    (sig,) = _uncertainties(fisher, gen)
    assert sig["B2"] == pytest.approx(inferno.PUBLISHED["inferno"][2], rel=0.10)
    assert sig["B2"] < 0.8 * inferno.PUBLISHED["cross_entropy"][2]
    assert sig["B2"] > 0.98 * inferno.PUBLISHED["analytic"][2]


# ----------------------------------------------------------------------------------
# Experiment smoke tests (tiny configs). Here, not in the fast suite: even at a few
# steps they compile the BCE, INFERNO and adversarial trainers (≈ 10-40 s each on 2 CPU
# cores).
# ----------------------------------------------------------------------------------


def _experiment(repo_root, name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, repo_root / "experiments" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_inferno_smoke(repo_root, tmp_path, capsys):
    mod = _experiment(repo_root, "bench_inferno")
    out = tmp_path / "inferno.json"
    res = mod.main(["--benchmarks", "B0", "--seeds", "1", "--steps", "5", "--inferno-steps",
                    "2", "--inferno-events", "50", "--n-train", "200", "--n-eval", "2000",
                    "--no-analytic", "--json", str(out)])
    assert set(res["cross_entropy"]["median"]) == set(inferno.BENCHMARKS)
    assert np.isfinite(res["inferno"]["diagonal"]["B0"])
    assert res["optimal_classifier"]["B0"] == pytest.approx(14.97, rel=0.1)
    assert "optimal clf" in capsys.readouterr().out and out.is_file()


def test_bench_systematics_smoke(repo_root, tmp_path, capsys):
    mod = _experiment(repo_root, "bench_systematics")
    res = mod.main(["--out", str(tmp_path), "--hidden", "4", "--steps", "4",
                    "--pretrain-steps", "1", "--n-train", "100", "--n-test", "400",
                    "--models", "2", "--speed-steps", "2", "--speed-events", "20",
                    "--repeats", "1", "--speed-configs", "4/8", "--xla-pool", "0"])
    assert len(res["pivot"]["rows"]) == 6 and len(res["pivot"]["ks_signal_z-1_vs_z+1"]) == 2
    assert res["speed"][0]["ratio"] > 0
    assert (tmp_path / "pivot_outputs.png").stat().st_size > 1000
    assert (tmp_path / "results.json").is_file()
    assert "ratio" in capsys.readouterr().out


def test_bench_systematics_host_devices(repo_root, tmp_path):
    """As a script, ``--host-devices 2`` splits the CPU and adds the sharded column."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [sys.executable, str(repo_root / "experiments" / "bench_systematics.py"), "--no-pivot",
         "--out", str(tmp_path), "--models", "3", "--speed-steps", "2", "--speed-events",
         "20", "--repeats", "1", "--speed-configs", "4/8", "--host-devices", "2"],
        env=env, cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "sharded x2" in proc.stdout
    (speed,) = json.loads((tmp_path / "results.json").read_text())["speed"]
    assert speed["devices"] == 2 and speed["ratio_sharded"] > 0
