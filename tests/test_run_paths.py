"""Paths from configs cannot escape the run directory: names that become file names are
simple names (checked when the config loads, the key named), and ``RunContext.path``
refuses absolute parts, ``..`` and symlinks that lead outside. Every case is accepted
and writes inside the run directory, or is refused with a ConfigError; nothing is ever
written outside."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sbi_engine.errors import ConfigError
from sbi_engine.experiment import (
    ExperimentType,
    RunContext,
    RunLog,
    Stage,
    check_name,
    load_spec,
    register_experiment_type,
    resolve,
    run,
    to_toml,
    write_metrics,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PathSection:
    """A tag written into a file path as is (not validated: ``RunContext.path`` guards)."""

    tag: str = "a"


def _write(ctx, *, seed: int) -> dict:
    ctx.path("files", ctx.config.section("paths").tag, f"seed{seed}.txt").write_text("x")
    return {"metrics": {"one": 1.0}}


def _report(ctx) -> dict:
    write_metrics(ctx, {s: ctx.results[f"write/seed{s}"]["metrics"] for s in ctx.config.seeds},
                  primary="one")
    return {"figures": []}


register_experiment_type(ExperimentType(
    name="paths_for_tests", sections={"paths": PathSection}, required=(),
    stages=lambda config: [*(Stage(f"write/seed{s}", functools.partial(_write, seed=s))
                             for s in config.seeds), Stage("report", _report)],
    description="writes files/<tag>/ (tests)"), overwrite=True)


def spec(name: str = "ok", tag: str = "a", **extra) -> dict:
    return {"name": name, "type": "paths_for_tests", "seeds": [0], "paths": {"tag": tag},
            **extra}


def files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def run_in(parent: Path, doc: dict, **kw) -> Path | ConfigError:
    """Write ``doc`` to a file and ``run`` it from ``parent/cwd`` (default out:
    ``runs/<name>``); the run directory, or the ConfigError. Asserts that every file
    written lies inside the run directory (or nothing was written)."""
    cwd = parent / "cwd"
    cwd.mkdir(parents=True)
    path = parent / "exp.toml"
    path.write_text(to_toml(doc))
    before = files(parent)
    try:
        with contextlib.chdir(cwd):
            out = run(path, progress=False, echo=False, **kw)[0].out.resolve()
    except ConfigError as err:
        out = err
    new = files(parent) - before
    if isinstance(out, Path):
        assert out.is_relative_to((cwd / "runs").resolve())
        assert (out / "metrics.json").is_file()
    inside = [p for p in new if isinstance(out, Path) and p.resolve().is_relative_to(out)]
    runs = (cwd / "runs").resolve()
    # a refused stage may leave its run directory's records (config, log), all inside
    stray = [p for p in new if p not in inside and not p.resolve().is_relative_to(runs)]
    assert not stray, stray
    return out


# -- names checked when the config loads -------------------------------------------------


@pytest.mark.parametrize("name", ["../escape", "..", ".", ".hidden", "/tmp/abs", "a/b",
                                  "a\\b", "x" * 101, "", "a b", "név", "a\x00b"])
def test_bad_experiment_names_are_refused_on_load(name):
    with pytest.raises(ConfigError, match=r"^name: expected"):
        resolve(spec(name))


@pytest.mark.parametrize("name", ["ok", "two_moons-npe.v2", "-x", "X" * 100, "a..b"])
def test_simple_names_are_accepted(name):
    assert resolve(spec(name))[0].config.name == name
    assert check_name("f", name) == name


def test_name_escape_writes_nothing(tmp_path):
    err = run_in(tmp_path, spec("../escape"))
    assert isinstance(err, ConfigError) and "name: expected a simple name" in str(err)
    assert not (tmp_path / "cwd").exists() or not any((tmp_path / "cwd").iterdir())
    assert not (tmp_path / "escape").exists()


def test_preset_names_are_checked(tmp_path):
    doc = spec(presets={"../../up": {"seeds": [1]}, "fine": {"seeds": [2]}})
    with pytest.raises(ConfigError, match=r"^--preset: expected a simple name"):
        resolve(doc, preset="../../up")
    assert resolve(doc, preset="fine")[0].config.seeds == (2,)


def test_file_stem_becomes_a_simple_name(tmp_path):
    path = tmp_path / ".my exp (1).toml"
    path.write_text(to_toml({k: v for k, v in spec().items() if k != "name"}))
    assert load_spec(path)["name"] == "my_exp_1_"
    assert resolve(load_spec(path))[0].config.name == "my_exp_1_"


# -- RunContext.path ------------------------------------------------------------------------


def ctx_in(out: Path) -> RunContext:
    out.mkdir(parents=True, exist_ok=True)
    config = resolve(spec())[0].config
    return RunContext(config, out, False, {}, RunLog(out / "run.log", echo=False))


@pytest.mark.parametrize("parts", [("..", "x"), ("a/../../x",), ("/etc/passwd",),
                                   ("plots", "/tmp/x.png"), ("a", "..", "..", "x"),
                                   ("a\x00b",)])
def test_context_path_refuses_escapes(tmp_path, parts):
    ctx = ctx_in(tmp_path / "run")
    before = files(tmp_path)
    with pytest.raises(ConfigError, match=r"must stay inside the run directory") as err:
        ctx.path(*parts)
    assert str(tmp_path / "run") in str(err.value)
    assert files(tmp_path) == before


def test_context_path_inside(tmp_path):
    ctx = ctx_in(tmp_path / "run")
    p = ctx.path("a", "b/c", "x.txt")
    assert p == tmp_path / "run" / "a" / "b" / "c" / "x.txt" and p.parent.is_dir()
    assert ctx.path("a..b.png").parent == tmp_path / "run"


def test_symlinks_out_of_the_run_dir_are_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    ctx = ctx_in(tmp_path / "run")
    (ctx.out / "plots").symlink_to(outside, target_is_directory=True)
    (ctx.out / "results").mkdir()
    (ctx.out / "results" / "seed0.json").symlink_to(outside / "victim.json")
    for parts in (("plots", "x.png"), ("plots", "deep", "x.png"), ("results", "seed0.json")):
        with pytest.raises(ConfigError, match="leads outside the run directory"):
            ctx.path(*parts)
    assert not any(outside.iterdir())
    # a link that stays inside is fine, and so is a run directory that is itself a link
    (ctx.out / "inner").mkdir()
    (ctx.out / "alias").symlink_to(ctx.out / "inner", target_is_directory=True)
    assert ctx.path("alias", "x.txt") == ctx.out / "alias" / "x.txt"
    (tmp_path / "link").symlink_to(ctx.out, target_is_directory=True)
    assert ctx_in(tmp_path / "link").path("x.txt") == tmp_path / "link" / "x.txt"


def test_stage_writing_a_config_tag_cannot_escape(tmp_path):
    err = run_in(tmp_path, spec("ok", tag="../../../escaped"))
    assert isinstance(err, ConfigError) and "'../../../escaped'" in str(err)
    assert not list(tmp_path.rglob("escaped*"))
    out = run_in(tmp_path / "second", spec("ok", tag="sub/dir"))
    assert (out / "files" / "sub" / "dir" / "seed0.txt").is_file()


# -- hypothesis: any name and tag -----------------------------------------------------------

_NASTY = ["..", "../x", "/", "/tmp/x", "a/../..", "./a", "a/b", ".", "~", "$HOME", "a\\..",
          "x" * 120, "-", "a..b", "runs", "..."]
_TEXT = st.one_of(st.sampled_from(_NASTY), st.from_regex(r"[A-Za-z0-9_.\-/]{1,12}",
                                                         fullmatch=True),
                  st.text(st.characters(codec="utf-8", exclude_characters="\x00"),
                          max_size=12))
_COUNTER = itertools.count()


@settings(max_examples=100, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(name=_TEXT, tag=_TEXT)
def test_any_name_and_tag_stays_inside(tmp_path, name, tag):
    parent = tmp_path / f"case{next(_COUNTER)}"
    out = run_in(parent, spec(name, tag))
    if isinstance(out, Path):
        assert out.name == name and (out / "files").resolve().is_relative_to(out)
    else:
        # the name (on load), a part of a path (when the stage writes), or a name TOML
        # cannot hold (a control character)
        assert str(out).startswith(("name:", "path ", "experiment:")), str(out)
    assert all(p.name.startswith("case") for p in tmp_path.iterdir())
    assert set(os.listdir(parent)) <= {"cwd", "exp.toml"}
