"""The `sbi-engine` command line: listings, simulate/info, and one-line errors."""

import json

import numpy as np
import pytest

from sbi_engine.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_simulators_lists_benchmarks_and_parameters(capsys):
    code, out, _ = run(capsys, "simulators")
    assert code == 0
    for name in ("two_moons", "gaussian_linear", "slcp", "bernoulli_glm"):
        assert name in out
    code, out, _ = run(capsys, "simulators", "two_moons")
    assert code == 0 and "parameters (2)" in out and "[-1, 1]" in out


def test_simulate_then_info(tmp_path, capsys):
    out_dir = tmp_path / "d"
    code, out, err = run(capsys, "simulate", "two_moons", "--num", "3000", "--seed", "1",
                         "--out", str(out_dir), "--chunk-size", "1000", "--quiet")
    assert code == 0, err
    assert "3000 simulations, 0 invalid" in out and "sims/s" in out
    code, out, _ = run(capsys, "info", str(out_dir), "--verify")
    assert code == 0
    assert "two_moons" in out and "complete; valid 3000, invalid 0" in out
    assert "all chunks verified" in out
    code, out, _ = run(capsys, "info", str(out_dir), "--json")
    assert json.loads(out)["seed"] == 1


def test_simulate_explicit_theta_file(tmp_path, capsys):
    theta = np.zeros((20, 2), np.float32)
    np.save(tmp_path / "theta.npy", theta)
    code, _, err = run(capsys, "simulate", "two_moons", "--theta", str(tmp_path / "theta.npy"),
                       "--out", str(tmp_path / "d"), "--quiet")
    assert code == 0, err
    np.savetxt(tmp_path / "theta.csv", np.zeros((5, 2)), delimiter=",")
    code, _, err = run(capsys, "simulate", "two_moons", "--theta", str(tmp_path / "theta.csv"),
                       "--out", str(tmp_path / "e"), "--quiet")
    assert code == 0, err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["simulate", "nope", "--num", "5", "--out", "{tmp}/a"],
         "error: unknown simulator 'nope'; known: "),
        (["simulate", "two_moons", "--out", "{tmp}/a"], "error: --num: required"),
        (["simulate", "two_moons", "--num", "0", "--out", "{tmp}/a"],
         "error: num: expected a positive integer, got 0"),
        (["simulate", "two_moons", "--theta", "{tmp}/bad.npy", "--out", "{tmp}/a"],
         "error: theta: expected shape (n, 2), got (4, 3)"),
        (["simulate", "two_moons", "--theta", "{tmp}/missing.npy", "--out", "{tmp}/a"],
         "error: --theta: file {tmp}/missing.npy does not exist"),
        (["simulate", "two_moons", "--theta", "{tmp}/obj.npy", "--out", "{tmp}/a"],
         "error: --theta: cannot read"),
        (["info", "{tmp}/nothing"], "error: dataset {tmp}/nothing does not exist"),
        (["simulators", "nope"], "error: unknown simulator 'nope'"),
    ],
)
def test_errors_are_one_line_without_traceback(tmp_path, capsys, argv, expected):
    np.save(tmp_path / "bad.npy", np.zeros((4, 3)))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert err.startswith(expected.replace("{tmp}", str(tmp_path))), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_debug_flag_shows_the_exception(tmp_path):
    with pytest.raises(Exception, match="unknown simulator"):
        main(["--debug", "simulate", "nope", "--num", "5", "--out", str(tmp_path / "a")])


def test_demo_runs_small(tmp_path, capsys, sbibm_missing):
    code, out, err = run(capsys, "demo", "--out", str(tmp_path), "--tiny", "--num", "500",
                         "--max-epochs", "3", "--c2st-samples", "200")
    assert code == 0, err
    if sbibm_missing:  # the demo runs on and says why there is no C2ST
        assert "observation 1: no reference samples (sbibm data directory" in out
    else:
        assert "C2ST vs the sbibm reference posterior" in out
    assert f"report: {tmp_path / 'report.md'}" in out
    assert (tmp_path / "npe" / "plots" / "pairplot_seed0_obs1.png").stat().st_size > 1000
    assert (tmp_path / "npe" / "models" / "seed0" / "posterior.json").exists()
    assert (tmp_path / "systematics" / "plots" / "heatmap.png").stat().st_size > 1000
    report = (tmp_path / "report.md").read_text()
    assert "npe/plots/pairplot_seed0_obs1.png" in report
    assert "systematics/plots/heatmap.png" in report


def test_simulator_options_reach_the_factory_and_the_manifest(tmp_path, capsys):
    from sbi_engine import simulator as simulator_mod
    from sbi_engine.simulator import register_simulator
    from tests import toy_simulators as toys

    def factory(shift=0.0, label="a"):
        if shift < 0:
            raise ValueError(f"shift: expected >= 0, got {shift}")
        sim = toys.shifted()
        sim.nominal_nu = lambda: np.array([shift], np.float32)
        return sim

    register_simulator("toy_opts", factory, overwrite=True)
    try:
        code, _, err = run(capsys, "simulate", "toy_opts", "--num", "50", "--out",
                           str(tmp_path / "d"), "--shift", "0.25", "--label=b", "--quiet")
        assert code == 0, err
        m = json.loads((tmp_path / "d" / "manifest.json").read_text())
        assert m["simulator_spec"]["options"] == {"label": "b", "shift": 0.25}
        code, _, err = run(capsys, "simulate", "toy_opts", "--num", "50", "--out",
                           str(tmp_path / "e"), "--nope", "1")
        assert code == 2 and "bad options ['nope']" in err
        # a value the factory refuses: one line, not its traceback
        code, _, err = run(capsys, "simulate", "toy_opts", "--num", "50", "--out",
                           str(tmp_path / "e"), "--shift", "-1")
        assert code == 2 and err.strip().splitlines() == [
            "error: simulator 'toy_opts': bad options ['shift']: shift: expected >= 0, got -1"]
        code, _, err = run(capsys, "simulate", "toy_opts", "--num", "50", "--out",
                           str(tmp_path / "e"), "--shift")
        assert code == 2 and "--shift: missing a value" in err
    finally:
        simulator_mod._REGISTRY.pop("toy_opts", None)


def test_seeds_beyond_32_bits_are_refused(tmp_path, capsys):
    # A JAX key holds 32 bits: seed 2**32 gave seed 0's data; 2**63 crashed.
    from sbi_engine.errors import ConfigError
    from sbi_engine.simulate import simulate
    from sbi_engine.systematics import SystematicsConfig

    for seed in (2**32, 2**63):
        with pytest.raises(SystemExit):
            main(["simulate", "two_moons", "--num", "10", "--seed", str(seed), "--out",
                  str(tmp_path / "d")])
        assert "expected an integer in 0..2**32-1" in capsys.readouterr().err
        with pytest.raises(ConfigError, match=r"seed: expected an integer in 0..2\*\*32-1"):
            simulate("two_moons", 10, seed)
        with pytest.raises(ConfigError, match=r"seed: expected an integer in 0..2\*\*32-1"):
            SystematicsConfig(generator="inferno", seed=seed)
    assert not (tmp_path / "d").exists()
