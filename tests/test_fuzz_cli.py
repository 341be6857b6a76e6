"""Fuzzed command lines (issue 9): every ``sbi-engine`` subcommand with generated flags.

Flags and their types are read from the CLI's own parser, and each gets values drawn
from a pool of valid, malformed and hostile ones (negative counts, NaN, missing and
garbage files, a dataset, a model, directories). Whatever the mix, the command either
succeeds (exit 0) or ends with exit 2 and one line (``error: ...`` or argparse's
usage message): never a traceback, never a hang. ``demo`` and experiment files are
fuzzed elsewhere (the demo's work is not bounded by its flags).
"""

from __future__ import annotations

import argparse
import contextlib
import io

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sbi_engine.cli import build_parser, main
from sbi_engine.npe import NPEConfig, train_npe
from sbi_engine.priors import BoxUniform
from sbi_engine.simulate import simulate

SKIP = {"demo", "run"}  # run: experiment files are fuzzed in test_fuzz_inputs.py
INTS = ["-1", "0", "2", "x", "", "2.5", "-0"]
FLOATS = ["nan", "-1", "0", "inf", "1e-3", "x", "1e400"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Paths the fuzzer can hand over: real artefacts, garbage and nonsense."""
    root = tmp_path_factory.mktemp("cli_fuzz")
    simulate("two_moons", 40, 0, out=root / "data", progress=False)
    theta = np.random.default_rng(0).uniform(-1, 1, (64, 2)).astype(np.float32)
    res = train_npe(jax.random.PRNGKey(0), theta, theta + 0.1, progress=False,
                    config=NPEConfig.for_estimator("maf", hidden=8, transforms=1,
                                                   max_epochs=1),
                    prior=BoxUniform([-1.0, -1.0], [1.0, 1.0]))
    res.posterior.save(root / "model")
    np.save(root / "obs.npy", np.zeros(2, np.float32))
    (root / "garbage.npy").write_bytes(b"\x93NUMPY garbage")
    (root / "config.toml").write_text("[study\nseed = 'x'")
    (root / "empty").mkdir()
    return root


def _paths(root) -> list[str]:
    names = ["data", "model", "obs.npy", "garbage.npy", "config.toml", "empty", "missing"]
    return [str(root / n) for n in names] + ["", "-", "/", "../.."]


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {name: p for name, p in sub.choices.items() if name not in SKIP}


def _values(action: argparse.Action, root, out: str) -> st.SearchStrategy:
    if action.choices is not None:
        return st.sampled_from([str(c) for c in action.choices] + ["nope", ""])
    if action.type is int:
        return st.sampled_from(INTS)
    if action.type is float:
        return st.sampled_from(FLOATS)
    if action.dest == "out":  # writing goes to a fresh place, or to an existing one
        return st.sampled_from([out, str(root / "empty"), str(root / "obs.npy")])
    if action.dest in ("set", "name", "extra"):
        return st.sampled_from(["two_moons", "nope", "a=1", "seed=x", "=", "pyloric"])
    return st.sampled_from([*_paths(root), "two_moons", "nope"])


@st.composite
def command_lines(draw, root, out):
    cmds = _subcommands()
    name = draw(st.sampled_from(sorted(cmds)))
    argv = [name]
    for action in cmds[name]._actions:
        if isinstance(action, argparse._HelpAction) or action.dest in ("debug", "version"):
            continue
        if not action.option_strings:  # positional: usually given
            if draw(st.integers(0, 5)) > 0:
                argv.append(draw(_values(action, root, out)))
            continue
        if not draw(st.booleans()) and not (action.required and draw(st.integers(0, 5))):
            continue
        flag = draw(st.sampled_from(action.option_strings))
        if action.nargs == 0:
            argv.append(flag)
        else:
            argv += [flag, draw(_values(action, root, out))]
    if draw(st.integers(0, 9)) == 0:
        argv.insert(draw(st.integers(0, len(argv))), draw(st.sampled_from(["--nope", "-x"])))
    return argv


COUNT = {"cases": 0, "ok": 0}


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_command_lines_end_in_success_or_one_clear_error(files, tmp_path, data):
    argv = data.draw(command_lines(files, str(tmp_path / "out")))
    if argv[0] in ("train", "diagnose") and "--max-epochs" not in argv:
        argv += ["--max-epochs", "1"]  # bound the work of a command line that is valid
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main([*argv, "--quiet"] if "--quiet" in _flags(argv[0]) else argv)
        except SystemExit as exc:  # argparse's own errors
            code = exc.code
    text = err.getvalue()
    COUNT["cases"] += 1
    COUNT["ok"] += code == 0
    assert "Traceback" not in text, (argv, text)
    assert code in (0, 2), (argv, code, text)
    if code == 2:
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        assert lines, (argv, "exit 2 without a message")
        last = lines[-1]
        assert last.startswith("error: ") or ": error: " in last, (argv, text)
        assert sum("error" in ln for ln in lines) == 1, (argv, text)


def _flags(name: str) -> set[str]:
    cmds = _subcommands()
    return {s for a in cmds[name]._actions for s in a.option_strings} if name in cmds else set()


def test_report_case_count():
    """Prints how many generated command lines ran (read by the issue's report)."""
    print(f"fuzzed command lines: {COUNT['cases']}, succeeded: {COUNT['ok']}")
