"""Experiment files: schema validation, overrides, presets, sweeps, TOML round trip, the
runner's run directory and resume logic (on a toy experiment type), power-law fits and
the leaderboard. Fast: nothing here trains a network; the shipped experiments run in
tests/test_cli_experiment.py."""

import concurrent.futures
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from sbi_engine.errors import ConfigError
from sbi_engine.experiment import (
    EXPERIMENT_TYPES,
    ExperimentConfig,
    ExperimentType,
    Stage,
    aggregate,
    fit_power_law,
    format_leaderboard,
    leaderboard,
    load_spec,
    metric_direction,
    parse_override,
    register_experiment_type,
    resolve,
    run_point,
    run_sweep,
    score_table,
    to_toml,
    write_metrics,
)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ["sbibm_npe", "inferno", "pivot", "higgs_like_systematics", "learning_curve_two_moons"]


def npe_spec(**sections):
    spec = {"name": "t", "type": "npe", "seeds": [0],
            "data": {"simulator": "two_moons", "num_simulations": 500},
            "npe": {"estimator": "maf"}, "evaluation": {"observations": [1]}}
    for k, v in sections.items():
        if isinstance(v, dict) and isinstance(spec.get(k), dict):
            spec[k] = {**spec[k], **v}
        else:
            spec[k] = v
    return spec


def one(spec, **kw):
    points = resolve(spec, **kw)
    assert len(points) == 1
    return points[0].config


# ------------------------------------------------------------------------------------
# shipped files
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_experiments_parse_with_and_without_their_tiny_preset(name):
    spec = load_spec(REPO / "experiments" / f"{name}.toml")
    full = resolve(spec)
    tiny = resolve(spec, preset="tiny")
    assert len(tiny) == 1 and not tiny[0].label
    assert all(p.config.name == name for p in full)
    assert tiny[0].config.type in EXPERIMENT_TYPES


def test_the_readme_example_is_valid():
    text = (REPO / "README.md").read_text()
    block = text[text.index("## Experiments"):].split("```toml\n", 1)[1].split("```", 1)[0]
    points = resolve(tomllib.loads(block))
    assert [p.config.section("npe").estimator for p in points] == ["maf", "nsf"]
    assert resolve(tomllib.loads(block), preset="tiny")[0].config.seeds == (0,)


def test_sweeps_in_shipped_files():
    points = resolve(load_spec(REPO / "experiments" / "sbibm_npe.toml"))
    labels = [dict(p.label) for p in points]
    assert len(points) == 6
    assert {"data.simulator": "slcp", "npe.estimator": "nsf"} in labels
    assert len({p.dirname for p in points}) == 6
    assert all(p.config.seeds == (0, 1, 2) for p in points)  # a list of seeds is no sweep
    pivot = resolve(load_spec(REPO / "experiments" / "pivot.toml"))
    lams = [p.config.section("systematics").classifier.adv_lambda for p in pivot]
    assert lams == [1.0, 10.0, 50.0]


# ------------------------------------------------------------------------------------
# validation: unknown keys, types, ranges
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, match", [
    (npe_spec(npe={"estimatr": "maf"}), r"npe\.estimatr: unknown key \(did you mean "
                                        r"'estimator'\?\); allowed keys in \[npe\]: .*backend"),
    ({**npe_spec(), "seed": 3}, r"seed: unknown key \(did you mean 'seeds'\?\); allowed keys:"
                                r" data, description, evaluation, name, npe, seeds, type"),
    (npe_spec(npe={"flow": {"hiden": 3}}), r"npe\.flow\.hiden: unknown key .*'hidden'"),
    (npe_spec(evaluation={"c2st_sampels": 3}), r"evaluation\.c2st_sampels: unknown key"),
    ({**npe_spec(), "systematics": {"generator": "inferno"}},
     r"section \[systematics\] is not used by experiment type 'npe'.*belongs to: "
     r"systematics, learning_curve"),
    ({"type": "systematics", "systematics": {"generator": "inferno",
                                             "classifier": {"stepz": 3}}},
     r"systematics\.classifier\.stepz: unknown key .*'steps'"),
])
def test_unknown_keys_name_the_key_and_the_allowed_keys(spec, match):
    with pytest.raises(ConfigError, match=match):
        resolve(spec)


@pytest.mark.parametrize("spec, match", [
    (npe_spec(data={"num_simulations": "1000"}),
     r"data\.num_simulations: expected an int, got '1000' \(str\)"),
    (npe_spec(data={"num_simulations": 1000.0}), r"data\.num_simulations: expected an int"),
    (npe_spec(npe={"learning_rate": "fast"}), r"npe\.learning_rate: expected a number"),
    (npe_spec(npe={"max_epochs": True}), r"npe\.max_epochs: expected an int, got True"),
    (npe_spec(npe={"estimator": "flow"}), r"npe\.estimator: expected one of \['maf', 'nsf', "
                                          r"'nsf_ar'\], got 'flow'"),
    (npe_spec(evaluation={"c2st": "maybe"}), r"evaluation\.c2st: expected one of"),
    (npe_spec(evaluation={"observations": 1}), r"evaluation\.observations: expected a list"),
    ({**npe_spec(), "seeds": [0, "a"]}, r"seeds\[1\]: expected an int, got 'a'"),
    (npe_spec(data="two_moons"), r"data: expected a table"),
    (npe_spec(npe={"flow": {"hidden": 1.5}}), r"npe\.flow\.hidden: expected an int"),
    ({"type": "systematics", "systematics": {"generator": "inferno", "profile": "yes"}},
     r"systematics\.profile: expected true or false"),
    ({"type": "systematics", "systematics": {"generator": "inferno", "yields": 3}},
     r"systematics\.yields: expected a table"),
])
def test_bad_types_are_named(spec, match):
    with pytest.raises(ConfigError, match=match):
        resolve(spec)


@pytest.mark.parametrize("spec, match", [
    (npe_spec(data={"num_simulations": 1}), r"\[data\] num_simulations: expected an int >= 2"),
    (npe_spec(data={"num_test": -1}), r"\[data\] num_test: expected an int >= 0"),
    (npe_spec(npe={"learning_rate": -1.0}), r"\[npe\] npe learning_rate: expected > 0"),
    (npe_spec(npe={"validation_fraction": 1.5}), r"validation_fraction: expected 0 < fraction"),
    (npe_spec(npe={"clip_norm": -2.0}), r"\[npe\] clip_norm: expected >= 0"),
    (npe_spec(evaluation={"observations": [0]}), r"observations\[0\]: expected an int >= 1"),
    (npe_spec(evaluation={"observations": [1, 1]}), r"observations: duplicates"),
    (npe_spec(evaluation={"sbc": 50}, data={"num_test": 10}),
     r"evaluation\.sbc: 50 held-out simulations requested but data\.num_test is 10"),
    ({**npe_spec(), "seeds": [1, 1]}, r"seeds: duplicates in \[1, 1\]"),
    ({**npe_spec(), "seeds": [-1]}, r"seeds\[0\]: expected an integer in 0..2\*\*32-1"),
    ({**npe_spec(), "seeds": []}, r"seeds: expected at least one seed"),
    (npe_spec(data={"simulator": "nope"}), r"simulator: unknown simulator 'nope'; known: .*"
                                           r"two_moons"),
    ({"type": "systematics", "systematics": {"generator": "inferno", "n_train": 0}},
     r"\[systematics\] n_train: expected a positive int"),
    ({"type": "systematics", "systematics": {"generator": "nope"}},
     r"systematics\.generator: unknown event generator 'nope'"),
    ({"type": "systematics", "systematics": {"generator": "inferno", "nuisances": ["q"]}},
     r"nuisances: unknown nuisance"),
    ({"type": "learning_curve", "learning_curve": {"budgets": [100, 50]},
      "data": {"simulator": "two_moons"}}, r"budgets: expected strictly increasing"),
    ({"type": "learning_curve", "learning_curve": {"budgets": [100]},
      "data": {"simulator": "two_moons"}}, r"budgets: expected at least 2 budgets"),
    ({"type": "learning_curve", "learning_curve": {"targets": {"auc": 0.9}},
      "data": {"simulator": "two_moons"}}, r"targets: metric\(s\) \['auc'\] are not in metrics"),
    ({"type": "learning_curve", "learning_curve": {}, "data": {"simulator": "two_moons"},
      "evaluation": {"c2st": "none"}},
     r"learning_curve\.metrics: 'c2st' needs a C2ST .* but evaluation\.c2st is 'none'"),
    ({"type": "learning_curve", "learning_curve": {"metrics": ["obs2/c2st"]},
      "data": {"simulator": "two_moons"}, "evaluation": {"observations": []}},
     r"learning_curve\.metrics: 'obs2/c2st' needs .* evaluation\.observations is empty"),
])
def test_bad_ranges_are_named(spec, match):
    with pytest.raises(ConfigError, match=match):
        resolve(spec)


@pytest.mark.parametrize("spec, match", [
    # (types registered by plug-ins, e.g. pyloric, or by other test modules may follow)
    ({"name": "x"}, r"type: missing required key; one of learning_curve, npe, "
                    r"([a-z_]+, )*systematics"),
    ({"type": "nope"}, r"type: unknown experiment type 'nope'; known: learning_curve, npe"),
    ({"type": "npe"}, r"\[data\]: missing section; experiment type 'npe' needs \[data\]"),
    ({"type": "npe", "data": {}}, r"data\.simulator: missing required key"),
    ({"type": "systematics", "systematics": {"generator": "inferno", "seed": 3}},
     r"systematics\.seed: not settable here; it is set by the top-level seeds"),
    (npe_spec(npe={"flow": {"kind": "nsf"}}), r"npe\.flow\.kind: not settable here; it is set "
                                              r"by npe\.estimator"),
    ({"type": "learning_curve", "learning_curve": {},
      "data": {"simulator": "two_moons", "num_simulations": 10}},
     r"data\.num_simulations: not settable here; it is set by learning_curve\.budgets"),
    ({"type": "learning_curve", "learning_curve": {"method": "systematics"}},
     r"\[systematics\]: missing section"),
    ({"type": "npe", "data": {"simulator": "two_moons"}, "type_": 1}, r"type_: unknown key"),
])
def test_missing_and_fixed_keys(spec, match):
    with pytest.raises(ConfigError, match=match):
        resolve(spec)


@pytest.mark.parametrize("name", SHIPPED)
def test_configs_pickle_for_worker_processes(name):
    import pickle

    for p in resolve(load_spec(REPO / "experiments" / f"{name}.toml"), preset="tiny"):
        again = pickle.loads(pickle.dumps(p.config))
        assert again == p.config and again.to_dict() == p.config.to_dict()


def test_defaults_and_frozen_sections():
    cfg = one(npe_spec())
    npe = cfg.section("npe")
    assert npe.flow.kind == "maf" and npe.npe_config().clip_norm == 5.0
    assert cfg.section("evaluation").c2st == "sbibm"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seeds = (1,)
    with pytest.raises(dataclasses.FrozenInstanceError):
        npe.max_epochs = 3
    with pytest.raises(TypeError):
        cfg.sections["npe"] = None
    with pytest.raises(ConfigError, match=r"\[systematics\]: experiment 't' \(type 'npe'\)"):
        cfg.section("systematics")
    assert one(npe_spec(npe={"clip_norm": 0})).section("npe").npe_config().clip_norm is None


# ------------------------------------------------------------------------------------
# --set, presets, sweeps
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("npe.estimator=maf", ("npe.estimator", "maf")),
    ("seeds=[0,1,2]", ("seeds", [0, 1, 2])),
    ("npe.learning_rate=1e-3", ("npe.learning_rate", 0.001)),
    ("npe.max_epochs = 50", ("npe.max_epochs", 50)),
    ("npe.estimator=[maf,nsf]", ("npe.estimator", ["maf", "nsf"])),
    ("npe.estimator=[maf, 'nsf']", ("npe.estimator", ["maf", "nsf"])),
    ('evaluation.c2st="fast"', ("evaluation.c2st", "fast")),
    ("systematics.profile=true", ("systematics.profile", True)),
    ("systematics.yields={s_exp=5.0}", ("systematics.yields", {"s_exp": 5.0})),
    ("description=a=b", ("description", "a=b")),
])
def test_parse_override(text, expected):
    assert parse_override(text) == expected


@pytest.mark.parametrize("text", ["npe.estimator", "=3", "npe..x=1", "npe.=1"])
def test_parse_override_errors(text):
    with pytest.raises(ConfigError, match="--set"):
        parse_override(text)


def test_overrides_apply_after_presets_and_are_validated():
    spec = {**npe_spec(), "presets": {"tiny": {"npe": {"max_epochs": 3},
                                               "data.num_simulations": 300}}}
    cfg = one(spec, preset="tiny", overrides=["npe.max_epochs=7", ("seeds", [4, 5])])
    assert cfg.section("npe").max_epochs == 7
    assert cfg.section("data").num_simulations == 300
    assert cfg.seeds == (4, 5)
    with pytest.raises(ConfigError, match=r"--preset: unknown preset 'big'; this experiment "
                                          r"has: tiny"):
        resolve(spec, preset="big")
    with pytest.raises(ConfigError, match=r"npe\.max_epoch: unknown key .*'max_epochs'"):
        resolve(spec, overrides=["npe.max_epoch=3"])
    with pytest.raises(ConfigError, match=r"data\.simulator is 'two_moons' \(str\), not a "
                                          r"table"):
        resolve(spec, overrides=["data.simulator.x=1"])
    with pytest.raises(ConfigError, match=r"npe\.max_epochs: expected an int"):
        resolve(spec, overrides=["npe.max_epochs=many"])


def test_sweep_axes_follow_the_schema():
    spec = npe_spec()
    pts = resolve(spec, overrides=["npe.estimator=[maf,nsf]", "data.num_simulations=[300,600]",
                                   "seeds=[0,1]", "evaluation.observations=[1,2]"])
    assert len(pts) == 4
    assert dict(pts[1].label) == {"data.num_simulations": 300, "npe.estimator": "nsf"}
    assert all(p.config.seeds == (0, 1) for p in pts)
    assert all(p.config.section("evaluation").observations == (1, 2) for p in pts)
    pts = resolve(spec, overrides=["evaluation.observations=[[1],[2,3]]", "seeds=[[0],[1,2]]"])
    assert [(p.config.section("evaluation").observations, p.config.seeds) for p in pts] == [
        ((1,), (0,)), ((2, 3), (0,)), ((1,), (1, 2)), ((2, 3), (1, 2))]  # seeds vary slowest
    pts = resolve(spec, overrides=["npe.flow.hidden=[8,16]"])
    assert [p.config.section("npe").flow.hidden for p in pts] == [8, 16]
    assert pts[0].dirname == "hidden=8"
    with pytest.raises(ConfigError, match="type: cannot be swept"):
        resolve({**spec, "type": ["npe", "systematics"]})
    with pytest.raises(ConfigError, match=r"npe\.estimator: empty list"):
        resolve(spec, overrides=[("npe.estimator", [])])
    with pytest.raises(ConfigError, match=r"npe\.estimator: expected one of"):
        resolve(spec, overrides=["npe.estimator=[maf,flow]"])


# ------------------------------------------------------------------------------------
# the resolved config as TOML
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SHIPPED)
def test_resolved_config_round_trips_through_toml(name):
    for p in resolve(load_spec(REPO / "experiments" / f"{name}.toml"), preset="tiny"):
        text = p.config.to_toml()
        again = ExperimentConfig.from_dict(tomllib.loads(text))
        assert again == p.config
        assert again.to_dict() == p.config.to_dict()


def test_to_toml_values():
    data = {"a": 'q"uote\n', "b": [1, 2.5, True], "c": float("inf"), "d": None,
            "t": {"x y": 1, "u": {"v": [{"w": 1}]}, "e": {}}}
    back = tomllib.loads(to_toml(data))
    assert back == {"a": 'q"uote\n', "b": [1, 2.5, True], "c": math.inf,
                    "t": {"x y": 1, "u": {"v": [{"w": 1}]}, "e": {}}}


# ------------------------------------------------------------------------------------
# the runner, on a toy experiment type (no networks): run dir, resume, sweeps
# ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class ToySection:
    """A toy section: ``n`` values drawn per seed at ``scale``."""

    n: int = 5
    scale: float = 1.0

    def __post_init__(self):
        if self.n < 1:
            raise ConfigError(f"n: expected >= 1, got {self.n}")


CALLS: list[str] = []


def _toy_draw(ctx, *, seed):
    CALLS.append(f"draw/seed{seed}")
    sec = ctx.config.section("toy")
    values = np.random.default_rng(seed).normal(size=sec.n) * sec.scale
    np.save(ctx.path("values", f"seed{seed}.npy"), values)
    return {"metrics": {"train/loss": float(np.mean(values ** 2)),
                        "test/loss": float(np.var(values)), "test/z": float(values.max()),
                        "count": sec.n}}


def _toy_report(ctx):
    CALLS.append("report")
    per_seed = {s: ctx.results[f"draw/seed{s}"]["metrics"] for s in ctx.config.seeds}
    write_metrics(ctx, per_seed, primary="test/loss", headline=["test/loss", "test/z"])
    from sbi_engine.plotting import plot_training_curves

    plot_training_curves({"x": [1.0, 0.5, 0.2]}, path=ctx.path("plots", "curve.png"))
    return {"figures": [["plots/curve.png", "a curve"]], "sections": ["## Extra\n\ntext"]}


def _toy_stages(config):
    return [*(Stage(f"draw/seed{s}", lambda ctx, s=s: _toy_draw(ctx, seed=s))
              for s in config.seeds), Stage("report", _toy_report)]


register_experiment_type(ExperimentType(
    name="toy_for_tests", sections={"toy": ToySection}, required=(), stages=_toy_stages,
    description="test double"), overwrite=True)


def toy(**kw):
    return ExperimentConfig.from_dict({"name": "toy", "type": "toy_for_tests",
                                       "seeds": [0, 1, 2], "toy": kw})


class Interrupt(Exception):
    pass


def test_experiment_types_from_entry_points(monkeypatch):
    import importlib.metadata

    from sbi_engine import experiment

    plugin = dataclasses.replace(EXPERIMENT_TYPES["toy_for_tests"], name="toy_plugin")

    class EP:
        name, value = "toy_plugin", "somewhere:TYPE"

        @staticmethod
        def load():
            return plugin

    class Broken(EP):
        name, value = "broken", "nowhere:TYPE"

        @staticmethod
        def load():
            raise ImportError("no module named nowhere")

    def entry_points(group):
        return [EP(), Broken()] if group == experiment.ENTRY_POINT_GROUP else []

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    monkeypatch.delitem(EXPERIMENT_TYPES, "toy_plugin", raising=False)
    cfg = one({"type": "toy_plugin", "toy": {"n": 2}})
    assert cfg.kind is plugin and cfg.section("toy").n == 2
    with pytest.raises(ConfigError, match=r"experiment type 'broken': plug-in 'nowhere:TYPE' "
                                          r"failed to load \(ImportError"):
        resolve({"type": "broken"})
    with pytest.raises(ConfigError, match=r"unknown experiment type 'nope'; known: .*broken"):
        resolve({"type": "nope"})
    EXPERIMENT_TYPES.pop("toy_plugin")


def test_run_directory_contents(tmp_path):
    CALLS.clear()
    r = run_point(toy(), tmp_path / "run", echo=False)
    out = r.out
    assert CALLS == ["draw/seed0", "draw/seed1", "draw/seed2", "report"]
    assert tomllib.loads((out / "config.toml").read_text())["toy"] == {"n": 5, "scale": 1.0}
    assert json.loads((out / "config.json").read_text())["seeds"] == [0, 1, 2]
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and m["seeds"] == [0, 1, 2]
    assert set(m["stages"]) == {"draw/seed0", "draw/seed1", "draw/seed2", "report"}
    assert all(v["seconds"] >= 0 and v["start"] and v["end"] for v in m["stages"].values())
    assert m["versions"]["jax"] and m["versions"]["numpy"] and m["device"]["platform"] == "cpu"
    assert "commit" in (m["git"] or {"commit": None})
    assert m["attempts"][0]["status"] == "complete"
    metrics = json.loads((out / "metrics.json").read_text())
    vals = [metrics["per_seed"][str(s)]["test/loss"] for s in (0, 1, 2)]
    assert metrics["summary"]["test/loss"]["mean"] == pytest.approx(np.mean(vals))
    assert metrics["summary"]["test/loss"]["std"] == pytest.approx(np.std(vals, ddof=1))
    assert metrics["directions"] == {"train/loss": "min", "test/loss": "min", "test/z": "max",
                                     "count": "min"}
    report = (out / "report.md").read_text()
    assert "| train |" in report and "| test |" in report and " ± " in report
    assert "![a curve](plots/curve.png)" in report and "## Extra" in report
    assert "## Per seed" in report and "`draw/seed1`" in report
    assert (out / "plots" / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "done: 4 stage(s) run" in (out / "run.log").read_text()
    assert not (out / ".lock").exists()


def test_interrupted_run_resumes_from_completed_stages(tmp_path):
    CALLS.clear()

    def stop(name, event):
        if name == "draw/seed1" and event == "end":
            raise Interrupt

    with pytest.raises(Interrupt):
        run_point(toy(), tmp_path / "run", echo=False, on_stage=stop)
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert m["status"] == "failed" and "Interrupt" in m["attempts"][0]["error"]
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert CALLS == ["draw/seed0", "draw/seed1"]
    events = []
    r = run_point(toy(), tmp_path / "run", echo=False,
                  on_stage=lambda n, e: events.append((n, e)))
    assert CALLS == ["draw/seed0", "draw/seed1", "draw/seed2", "report"]
    assert r.resumed == ("draw/seed0", "draw/seed1") and r.ran == ("draw/seed2", "report")
    assert ("draw/seed0", "skip") in events and ("draw/seed2", "start") in events
    fresh = run_point(toy(), tmp_path / "fresh", echo=False)
    assert r.metrics == fresh.metrics  # resumed == uninterrupted
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert [a["status"] for a in m["attempts"]] == ["failed", "complete"]
    assert m["stages"]["draw/seed0"]["resumed"] is True
    # a complete run reruns nothing
    again = run_point(toy(), tmp_path / "run", echo=False)
    assert again.ran == () and again.metrics == fresh.metrics


def test_a_killed_attempt_is_recorded_and_its_lock_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    run_point(toy(), run_dir, echo=False)
    m = json.loads((run_dir / "manifest.json").read_text())
    m["attempts"][-1]["status"] = "running"  # as if killed with SIGKILL
    (run_dir / "manifest.json").write_text(json.dumps(m))
    (run_dir / ".lock").write_text(json.dumps({"host": __import__("socket").gethostname(),
                                               "pid": 2 ** 22 + 12345}))
    run_point(toy(), run_dir, echo=False)
    m = json.loads((run_dir / "manifest.json").read_text())
    assert [a["status"] for a in m["attempts"]] == ["died", "complete"]
    (run_dir / ".lock").write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    with pytest.raises(ConfigError, match=r"in use by process 1 on 'elsewhere'"):
        run_point(toy(), run_dir, echo=False)


def test_run_directory_guards(tmp_path):
    run_point(toy(n=3), tmp_path / "run", echo=False)
    with pytest.raises(ConfigError, match=r"holds a different experiment \(toy\.n: 3 -> 4\); "
                                          r"use another --out, or --overwrite"):
        run_point(toy(n=4), tmp_path / "run", echo=False)
    r = run_point(toy(n=4), tmp_path / "run", echo=False, overwrite=True)
    assert r.resumed == () and r.metrics["per_seed"]["0"]["count"] == 4
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is not a run directory"):
        run_point(toy(), tmp_path / "other", echo=False)
    with pytest.raises(ConfigError, match=r"--device gpu: JAX sees no GPU"):
        run_point(toy(), tmp_path / "g", device="gpu", echo=False)


def test_sweep_with_an_executor_and_the_leaderboard(tmp_path, capsys):
    spec = {"name": "toy", "type": "toy_for_tests", "seeds": [0, 1],
            "toy": {"scale": [0.5, 2.0, 1.0]}}
    points = resolve(spec)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = run_sweep(points, tmp_path / "sw", executor=pool, echo=False)
    dirs = sorted(p.name for p in (tmp_path / "sw").iterdir() if p.is_dir())
    assert dirs == ["000-scale=0.5", "001-scale=2", "002-scale=1"]
    sweep = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert sweep["axes"] == ["toy.scale"] and len(sweep["points"]) == 3
    summary = (tmp_path / "sw" / "summary.md").read_text()
    assert "[000-scale=0.5](000-scale=0.5/report.md)" in summary and "test/loss" in summary
    sweep_report = (tmp_path / "sw" / "report.md").read_text()
    assert "![a curve](000-scale=0.5/plots/curve.png)" in sweep_report
    m = json.loads((tmp_path / "sw" / "001-scale=2" / "manifest.json").read_text())
    assert m["sweep_point"] == {"toy.scale": 2.0}
    metric, order, rows = leaderboard(tmp_path / "sw", "test/loss")
    assert (metric, order) == ("test/loss", "min")
    assert [r.run for r in rows] == ["000-scale=0.5", "002-scale=1", "001-scale=2"]
    assert rows[0].mean == pytest.approx(results[0].metrics["summary"]["test/loss"]["mean"])
    _, order, rows = leaderboard(tmp_path / "sw", "test/z")
    assert order == "max" and rows[0].run == "001-scale=2"
    text = format_leaderboard(metric, order, rows)
    assert "(toy.scale=2)" in text.splitlines()[2]
    from sbi_engine.cli import main

    assert main(["leaderboard", str(tmp_path / "sw"), "--metric", "test/loss", "--top",
                 "2"]) == 0
    out = capsys.readouterr().out
    assert "test/loss (min is better)" in out and "002-scale=1" in out and "001-scale" not in out
    for top in ("0", "-1"):  # -1 used to drop the last row, 0 to show them all
        with pytest.raises(SystemExit):
            main(["leaderboard", str(tmp_path / "sw"), "--top", top])
        assert "--top: expected an integer >= 1" in capsys.readouterr().err
    assert main(["leaderboard", str(tmp_path / "sw"), "--metric", "nope"]) == 2
    err = capsys.readouterr().err
    assert "error: --metric: no run under" in err and "test/loss" in err
    with pytest.raises(ConfigError, match="holds a sweep"):
        run_point(points[0].config, tmp_path / "sw", echo=False)
    # The same sweep resumes; another one, or a folder that is no sweep, is refused.
    again = run_sweep(points, tmp_path / "sw", echo=False)
    assert [r.metrics for r in again] == [r.metrics for r in results]
    other = resolve({**spec, "toy": {"scale": [3.0, 0.5]}})
    with pytest.raises(ConfigError, match="holds a different sweep"):
        run_sweep(other, tmp_path / "sw", echo=False)
    run_sweep(other, tmp_path / "sw", echo=False, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "sw").iterdir() if p.is_dir()) == [
        "000-scale=3", "001-scale=0.5"]
    assert [r.run for r in leaderboard(tmp_path / "sw", "test/loss")[2]] == [
        "001-scale=0.5", "000-scale=3"]
    mine = tmp_path / "mydocs"
    mine.mkdir()
    (mine / "report.md").write_text("my report")
    with pytest.raises(ConfigError, match="is not a sweep directory"):
        run_sweep(points, mine, echo=False)
    assert (mine / "report.md").read_text() == "my report"


# ------------------------------------------------------------------------------------
# metrics, power laws
# ------------------------------------------------------------------------------------


def test_aggregate_and_directions():
    s = aggregate({"0": {"a": 1.0, "b": None, "c": 2}, "1": {"a": 3.0, "b": float("nan"),
                                                            "c": 4}})
    assert s["a"] == {"mean": 2.0, "std": pytest.approx(math.sqrt(2)), "n": 2,
                      "values": [1.0, 3.0]}
    assert "b" not in s
    assert aggregate({"0": {"a": 1.5}})["a"]["std"] == 0.0
    assert [metric_direction(m) for m in ("c2st", "test/nll", "bce@nominal/z_worst",
                                          "best/z_nominal", "augmented/auc_nominal",
                                          "sbc/min_pvalue", "coverage/max_abs_error")] == [
        "min", "min", "max", "max", "max", "max", "min"]


def test_score_table_marks_each_columns_best_by_its_direction():
    s = aggregate({"0": {"bce/z_worst": 3.1, "pivot/z_worst": 3.3, "aug/z_worst": 3.3,
                         "bce/c2st": 0.6, "pivot/c2st": 0.55, "bce/only": 1.0, "best/z": 9.0},
                   "1": {"bce/z_worst": 3.1, "pivot/z_worst": 3.1, "aug/z_worst": 3.3,
                         "bce/c2st": 0.6, "pivot/c2st": 0.57, "bce/only": 1.0, "best/z": 9.0}})
    plain = score_table(s, skip=["best"])
    assert "**" not in plain
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:]
            for line in score_table(s, skip=["best"], mark_best=True).splitlines()[2:]}
    # z_worst: max is better (aug 3.3 beats pivot's mean 3.2); c2st: min is better
    assert rows["aug"][0] == "**3.300 ± 0.000**" and rows["pivot"][0] == "3.200 ± 0.141"
    assert rows["pivot"][1] == "**0.560 ± 0.014**" and rows["bce"][1] == "0.600 ± 0.000"
    assert rows["bce"][2].strip(" |") == "1.000 ± 0.000"  # one row: nothing to compare


def test_power_law_with_a_known_floor():
    n = np.array([1e3, 3e3, 1e4, 3e4, 1e5])
    y = 0.5 + 2.0 * n ** -0.4
    fit = fit_power_law(n, y, floor=0.5)
    assert fit.a == pytest.approx(2.0, rel=1e-6) and fit.alpha == pytest.approx(0.4, rel=1e-6)
    assert fit.sign == 1 and not fit.floor_fitted and fit.rmse < 1e-9
    assert fit.predict(1e6) == pytest.approx(0.5 + 2.0 * 1e6 ** -0.4)
    assert fit.budget_for(0.5 + 2.0 * 2e5 ** -0.4) == pytest.approx(2e5, rel=1e-6)
    assert fit.budget_for(0.4) is None  # below the floor: never
    assert fit.budget_for(0.5 + 1e-30) is None  # beyond any budget
    # points on the wrong side of the floor are left out; too few points: no fit
    assert fit_power_law([10, 20, 40], [0.7, 0.6, 0.49], floor=0.5).alpha > 0
    assert fit_power_law([10, 20], [0.7, 0.49], floor=0.5) is None
    assert fit_power_law([10, 20, 40], [1.0, 0.5, 0.3]) is None  # fitted floor needs 4


def test_power_law_with_a_fitted_floor():
    n = np.geomspace(500, 1e5, 6)
    z = 3.0 - 5.0 * n ** -0.3  # a significance rising to an asymptote
    fit = fit_power_law(n, z)
    assert fit.floor_fitted and fit.sign == -1
    assert fit.floor == pytest.approx(3.0, abs=0.05)
    assert fit.alpha == pytest.approx(0.3, abs=0.05)
    assert np.allclose(fit.predict(n), z, atol=5e-3)
    nll = -2.9 + 4.0 * n ** -0.5
    fit = fit_power_law(n, nll)
    assert fit.sign == 1 and fit.floor == pytest.approx(-2.9, abs=0.05)


def test_plot_learning_curve(tmp_path):
    from sbi_engine.plotting import plot_learning_curve

    n = [1000, 3000, 10000]
    fit = fit_power_law(n, [0.9, 0.75, 0.62], floor=0.5)
    plot_learning_curve(n, [0.9, 0.75, 0.62], [0.02, 0.01, 0.01], fit=fit.to_dict(),
                        extrapolate_to=1e5, target=0.55, metric="c2st",
                        path=tmp_path / "lc.png")
    plot_learning_curve(n, [-1.0, -2.0, -2.5], None, metric="valid/nll",
                        path=tmp_path / "raw.png")
    flat = fit_power_law([200, 400], [0.98, 0.98], floor=0.5)  # alpha ~ 0: no overflow
    assert flat.budget_for(0.55) is None
    plot_learning_curve([200, 400], [0.98, 0.98], fit=flat.to_dict(), extrapolate_to=4000,
                        target=0.55, metric="c2st", path=tmp_path / "flat.png")
    assert (tmp_path / "lc.png").stat().st_size > 5000 and (tmp_path / "raw.png").exists()


def test_learning_curve_c2st_without_reference_samples_is_named(tmp_path, monkeypatch):
    """A learning curve that asks for C2ST stops at the first evaluation when the reference
    samples are missing (not at the report, with a C2ST-less result cached), and keeps the
    stages it ran."""
    empty = tmp_path / "sbibm"
    empty.mkdir()
    monkeypatch.setenv("SBI_ENGINE_SBIBM_DATA", str(empty))
    cfg = one({"type": "learning_curve", "seeds": [0],
               "learning_curve": {"budgets": [100, 200]},
               "data": {"simulator": "two_moons", "num_test": 0},
               "npe": {"max_epochs": 1, "flow": {"hidden": 8, "transforms": 1}},
               "evaluation": {"num_posterior_samples": 20, "c2st": "fast", "c2st_steps": 10}})
    with pytest.raises(ConfigError, match=r"learning_curve\.metrics \('c2st'\): a C2ST needs "
                                          r"the reference posterior samples of observation 1: "
                                          r"sbibm task 'two_moons': reference posterior"):
        run_point(cfg, tmp_path / "run", echo=False, progress=False)
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert m["status"] == "failed"
    assert {"simulate/seed0", "train/n100/seed0"} <= set(m["stages"])
    assert "evaluate/n100/seed0" not in m["stages"]
