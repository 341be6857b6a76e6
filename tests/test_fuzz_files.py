"""Fuzzed files: dataset and model directories, pickles, and a scan for unsafe loaders.

Truncations, bit flips at hypothesis-chosen offsets, deleted files, wrong versions and
manifests that lie must each give one named error (:class:`DatasetError`,
:class:`PosteriorFileError`, :class:`ClassifierFileError`) or load the original data
unchanged; no loader may unpickle (issue 9). ``pytest --hypothesis-show-statistics``
prints how many cases each test ran.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import shutil
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sbi_engine import BoxUniform
from sbi_engine.classify import (
    ClassifierFileError,
    ClassifierParams,
    load_classifier,
    save_classifier,
)
from sbi_engine.cli import main
from sbi_engine.errors import DatasetError
from sbi_engine.npe import NPEConfig, train_npe
from sbi_engine.posterior import PosteriorFileError, load_posterior, seal_header
from sbi_engine.simulate import simulate
from sbi_engine.store import load_dataset

REPO = Path(__file__).resolve().parents[1]


def fuzz(max_examples: int) -> settings:
    """Modest, deadline-free settings: the machine running the suite may be loaded."""
    return settings(max_examples=max_examples, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


class Evil:
    """Unpickling this creates ``marker``: proof that a loader executed pickled code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# One damage to a directory: (what, which file, where, extra).
_DAMAGE = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.floats(0, 1, exclude_max=True),
              st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.floats(0, 1, exclude_max=True),
              st.just(0)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.just(0.0), st.just(0)),
    st.tuples(st.just("garbage"), st.integers(0, 10**6), st.just(0.0), st.integers(0, 2**31)),
)


def _damage(src: Path, tmp: Path, damages) -> tuple[Path, list[str]]:
    """Copy ``src`` and apply ``damages``; return the copy and a description."""
    work = Path(tempfile.mkdtemp(dir=tmp))
    dst = work / src.name
    shutil.copytree(src, dst)
    done = []
    for what, which, where, extra in damages:
        files = _files(dst)
        if not files:
            break
        name = files[which % len(files)]
        f = dst / name
        raw = f.read_bytes()
        if what == "flip" and raw:
            i = int(where * len(raw))
            raw = raw[:i] + bytes([raw[i] ^ (1 << extra)]) + raw[i + 1:]
            f.write_bytes(raw)
        elif what == "truncate":
            f.write_bytes(raw[:int(where * len(raw))])
        elif what == "delete":
            f.unlink()
        elif what == "garbage":
            f.write_bytes(np.random.default_rng(extra).bytes(max(len(raw), 1)))
        done.append(f"{what} {name} @{where:.3f}")
    return dst, done


# ------------------------------------------------------------------------------------
# datasets: sbi_engine.store.load_dataset
# ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz_ds") / "ds"
    simulate("two_moons", 40, 0, out=path, chunk_size=10, progress=False)
    return path, load_dataset(path).arrays()


def _same(a, b) -> bool:
    return all((a[k] is None and b[k] is None) or np.array_equal(a[k], b[k], equal_nan=True)
               for k in ("theta", "nu", "x", "valid"))


@fuzz(60)
@given(damages=st.lists(_DAMAGE, min_size=1, max_size=3))
def test_damaged_dataset_is_refused_or_unchanged(dataset, tmp_path, damages):
    src, original = dataset
    path, done = _damage(src, tmp_path, damages)
    try:
        ds = load_dataset(path)
    except DatasetError as err:
        assert str(err), done
        return
    assert len(ds) == original["theta"].shape[0], done
    assert _same(ds.arrays(), original), done  # never silently different data


_LIES = {
    "num": st.integers(-5, 10**12) | st.sampled_from([39, 41, 50, 0, "40", 40.0, None, True]),
    "chunk_size": st.integers(-5, 10**12) | st.sampled_from([9, 11, 40, "10", None]),
    "num_chunks": st.integers(-5, 10**12) | st.sampled_from([3, 5, "4", [4]]),
    "format_version": st.integers(-3, 10) | st.sampled_from(["1", 1.0, None, [1]]),
    "format": st.text(max_size=20) | st.none(),
    "complete": st.booleans() | st.none() | st.just("yes"),
    "chunk_sha256": (st.lists(st.text("0123456789abcdef", min_size=64, max_size=64),
                              max_size=5)
                     | st.sampled_from([None, "x", 5, {"0": "a"}, [1, 2, 3, 4]])),
    "prior": st.sampled_from([None, {}, {"type": "nope"}, "box_uniform"]),
    "seed": st.sampled_from([None, "0", 0.5, [0], True]),
    "theta_source": st.sampled_from([None, "prior", {}, [1]]),
    "counts": st.sampled_from([None, {}, {"valid": 0}, {"total": 40, "valid": 40,
                                                        "invalid": "0"}, [40, 40, 0]]),
    "simulator_spec": st.sampled_from([None, "spec", {}, {"parameters": 5, "nuisances": 1}]),
    "errors": st.sampled_from([None, [], "x", {"boom": 1}]),
}


@fuzz(80)
@given(field=st.sampled_from(sorted(_LIES)), data=st.data())
def test_lying_manifest_is_refused_or_unchanged(dataset, tmp_path, field, data):
    src, original = dataset
    value = data.draw(_LIES[field])
    path, _ = _damage(src, tmp_path, [])
    m = json.loads((path / "manifest.json").read_text())
    m[field] = value
    (path / "manifest.json").write_text(json.dumps(m))
    try:
        ds = load_dataset(path)
    except DatasetError as err:
        assert str(err)
        return
    assert len(ds) == original["theta"].shape[0], (field, value)
    assert _same(ds.arrays(), original), (field, value)


def test_incomplete_manifest_with_a_huge_num_does_not_hang(dataset, tmp_path):
    src, _ = dataset
    path, _ = _damage(src, tmp_path, [])
    m = json.loads((path / "manifest.json").read_text())
    m.update(num=10**12, chunk_size=10, num_chunks=10**11, complete=False)
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DatasetError, match="incomplete"):
        load_dataset(path)


@fuzz(40)
@given(field=st.sampled_from(sorted(_LIES)), data=st.data())
def test_cli_info_on_a_lying_manifest_is_one_line_or_a_report(dataset, tmp_path, field, data,
                                                              capsys):
    src, _ = dataset
    path, _ = _damage(src, tmp_path, [])
    m = json.loads((path / "manifest.json").read_text())
    m[field] = data.draw(_LIES[field])
    (path / "manifest.json").write_text(json.dumps(m))
    capsys.readouterr()
    code = main(["info", str(path)])
    out, err = capsys.readouterr()
    if code == 0:
        assert out.startswith("dataset ") and not err, (field, m[field])
    else:
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines


def test_a_file_or_a_damaged_chunk_record_is_named_or_redone(dataset, tmp_path):
    (tmp_path / "data.npz").write_bytes(b"not a dataset")
    with pytest.raises(DatasetError, match="is a file; a dataset is a directory"):
        load_dataset(tmp_path / "data.npz")
    # A chunk record that parses but lacks its checksum counts as not done.
    from sbi_engine.store import DatasetStore

    src, _ = dataset
    path, _ = _damage(src, tmp_path, [])
    record = path / "chunks" / "1.json"
    rec = json.loads(record.read_text())
    rec["sha2F6"] = rec.pop("sha256")
    record.write_text(json.dumps(rec))
    store = DatasetStore.open(path)
    assert not store.is_done(1) and store.is_done(0)


def test_cli_info_on_damaged_dataset_is_one_line(dataset, tmp_path, capsys):
    src, _ = dataset
    path, _ = _damage(src, tmp_path, [("garbage", 0, 0.0, 1)])
    (path / "manifest.json").write_bytes(b"\x80\x04garbage")
    code = main(["info", str(path), "--verify"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err


# ------------------------------------------------------------------------------------
# posterior models: sbi_engine.posterior.load_posterior
# ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    rng = np.random.default_rng(0)
    theta = rng.uniform(-1, 1, size=(256, 2)).astype(np.float32)
    x = (theta + 0.1 * rng.normal(size=theta.shape)).astype(np.float32)
    cfg = NPEConfig.for_estimator("maf", hidden=16, transforms=2, max_epochs=2)
    res = train_npe(jax.random.PRNGKey(0), theta, x, config=cfg,
                    prior=BoxUniform([-1.0, -1.0], [1.0, 1.0]), progress=False)
    path = tmp_path_factory.mktemp("fuzz_model") / "model"
    res.posterior.save(path)
    return path, load_posterior(path).params


def _params_equal(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(lambda u, v: np.array_equal(u, v), a, b)))


@fuzz(50)
@given(damages=st.lists(_DAMAGE, min_size=1, max_size=2))
def test_damaged_posterior_is_refused_or_unchanged(model, tmp_path, damages):
    src, params = model
    path, done = _damage(src, tmp_path, damages)
    try:
        post = load_posterior(path)
    except PosteriorFileError as err:
        assert str(err), done
        return
    assert _params_equal(post.params, params), done  # a flipped weight must be noticed


_HEADER_LIES = {
    "format_version": st.integers(-3, 10) | st.sampled_from(["1", None, 1.5]),
    "format": st.text(max_size=20) | st.none(),
    "theta_dim": st.integers(-3, 64) | st.sampled_from(["2", None, 2.5]),
    "x_shape": st.lists(st.integers(-2, 64), max_size=3) | st.sampled_from([None, 2, "2"]),
    "flow": st.sampled_from([None, {}, {"kind": "nope"}, []]),
    "standardization": st.sampled_from([None, {}, [], {"theta_mean": "a"}]),
    "prior": st.sampled_from([{"type": "nope"}, {}, [], "x"]),
}


@fuzz(50)
@given(field=st.sampled_from(sorted(_HEADER_LIES)), data=st.data())
def test_lying_posterior_header(model, tmp_path, field, data):
    src, params = model
    value = data.draw(_HEADER_LIES[field])
    path, _ = _damage(src, tmp_path, [])
    h = json.loads((path / "posterior.json").read_text())
    h[field] = value
    (path / "posterior.json").write_text(json.dumps(seal_header(h)))  # a crafted file
    try:
        post = load_posterior(path)
    except PosteriorFileError as err:
        assert str(err)
        return
    assert _params_equal(post.params, params), (field, value)


@pytest.mark.parametrize("field,value", [("hidden", 2**30), ("transforms", 10**6),
                                         ("x_shape", [2**31])])
def test_a_header_asking_for_a_huge_network_allocates_nothing(model, tmp_path, field, value):
    # Checked against shapes only (jax.eval_shape): a 2**30-wide layer would need 4 GiB+.
    src, _ = model
    path, _ = _damage(src, tmp_path, [])
    h = json.loads((path / "posterior.json").read_text())
    if field == "x_shape":
        h["x_shape"] = value
    else:
        h["flow"][field] = value
    (path / "posterior.json").write_text(json.dumps(seal_header(h)))  # a crafted file
    t0 = time.perf_counter()
    with pytest.raises(PosteriorFileError, match="do not match|inconsistent"):
        load_posterior(path)
    assert time.perf_counter() - t0 < 30


def test_pickled_weights_are_never_unpickled(model, tmp_path, capsys):
    src, _ = model
    marker = tmp_path / "PWNED"
    path, _ = _damage(src, tmp_path, [])
    (path / "params.msgpack").write_bytes(pickle.dumps(Evil(marker)))
    with pytest.raises(PosteriorFileError):
        load_posterior(path)
    code = main(["sample", str(path), "--observation", str(tmp_path / "x.npy"),
                 "--out", str(tmp_path / "s.npy")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: model"), err
    assert not marker.exists()


# ------------------------------------------------------------------------------------
# classifiers: sbi_engine.classify.load_classifier
# ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    rng = np.random.default_rng(1)
    net = {"params": {
        "Dense_0": {"kernel": rng.normal(size=(2, 4)), "bias": rng.normal(size=4)},
        "Dense_1": {"kernel": rng.normal(size=(4, 1)), "bias": rng.normal(size=1)}}}
    net = jax.tree.map(lambda a: np.asarray(a, np.float32), net)
    params = ClassifierParams(net, np.zeros(2, np.float32), np.ones(2, np.float32), (4,),
                              "relu")
    path = save_classifier(tmp_path_factory.mktemp("fuzz_clf") / "clf", params)
    return path, load_classifier(path).params


@fuzz(50)
@given(damages=st.lists(_DAMAGE, min_size=1, max_size=2))
def test_damaged_classifier_is_refused_or_unchanged(classifier, tmp_path, damages):
    src, params = classifier
    path, done = _damage(src, tmp_path, damages)
    try:
        loaded = load_classifier(path)
    except ClassifierFileError as err:
        assert str(err), done
        return
    assert _params_equal(loaded.params.net, params.net), done


@fuzz(40)
@given(field=st.sampled_from(["format_version", "hidden", "inputs", "outputs", "stack",
                              "activation", "weights", "config"]),
       value=st.one_of(st.none(), st.booleans(), st.integers(-2, 10**9), st.text(max_size=5),
                       st.lists(st.integers(-2, 10**9), max_size=3),
                       st.dictionaries(st.text(max_size=5), st.integers(), max_size=2)))
def test_lying_classifier_header(classifier, tmp_path, field, value):
    src, params = classifier
    path, _ = _damage(src, tmp_path, [])
    h = json.loads((path / "classifier.json").read_text())
    h[field] = value
    (path / "classifier.json").write_text(json.dumps(seal_header(h)))  # a crafted file
    try:
        loaded = load_classifier(path)
    except ClassifierFileError as err:
        assert str(err)
        return
    assert _params_equal(loaded.params.net, params.net), (field, value)


@pytest.mark.parametrize("fix_checksum", [False, True])
def test_pickled_classifier_weights_are_never_unpickled(classifier, tmp_path, fix_checksum):
    import hashlib

    src, _ = classifier
    marker = tmp_path / "PWNED"
    path, _ = _damage(src, tmp_path, [])
    evil = np.empty(2, dtype=object)
    evil[:] = [Evil(marker), Evil(marker)]
    buf = io.BytesIO()
    np.savez(buf, loc=evil)  # an .npz whose member needs pickle
    for raw in (pickle.dumps(Evil(marker)), buf.getvalue()):
        (path / "weights.npz").write_bytes(raw)
        if fix_checksum:  # the attacker also rewrites the header's checksum
            h = json.loads((path / "classifier.json").read_text())
            h["weights"]["sha256"] = hashlib.sha256(raw).hexdigest()
            (path / "classifier.json").write_text(json.dumps(seal_header(h)))
        with pytest.raises(ClassifierFileError):
            load_classifier(path)
    assert not marker.exists()


# ------------------------------------------------------------------------------------
# source scan: no unsafe deserialisation in the engine and the simulators
# ------------------------------------------------------------------------------------

_UNSAFE = [
    (re.compile(r"\bpickle\.loads?\("), "pickle.load"),
    (re.compile(r"\b(?:cloudpickle|dill|joblib)\.loads?\("), "pickle-based load"),
    (re.compile(r"allow_pickle\s*=\s*True"), "allow_pickle=True"),
    (re.compile(r"weights_only\s*=\s*False"), "torch.load(weights_only=False)"),
]


# Reviewed exceptions: not a user file. Dask ships the client's own simulator object to
# its workers as cloudpickled bytes in memory (the same trust as any Dask task).
_ALLOWED = {"sbi_engine/distributed.py: pickle.load"}


def _calls(text: str, name: str) -> list[str]:
    """The full argument text of each call ``name(...)`` (balanced parentheses)."""
    out = []
    for m in re.finditer(re.escape(name) + r"\(", text):
        depth, i = 1, m.end()
        while depth and i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        out.append(text[m.start():i])
    return out


def test_no_unsafe_deserialisation_in_the_source():
    problems = []
    for root in ("sbi_engine", "simulators"):
        for f in sorted((REPO / root).rglob("*.py")):
            text = f.read_text()
            rel = f.relative_to(REPO)
            for pattern, what in _UNSAFE:
                if pattern.search(text):
                    problems.append(f"{rel}: {what}")
            for call in _calls(text, "np.load") + _calls(text, "numpy.load"):
                if "allow_pickle=False" not in call:
                    problems.append(f"{rel}: {call.splitlines()[0]} without allow_pickle=False")
            for call in _calls(text, "torch.load"):
                if "weights_only=True" not in call:
                    problems.append(f"{rel}: {call.splitlines()[0]} without weights_only=True")
    problems = [p for p in problems if p not in _ALLOWED]
    assert not problems, "\n".join(problems)
