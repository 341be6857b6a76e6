"""`sbi-engine train / sample / diagnose` end to end on a tiny problem."""

import json

import numpy as np
import pytest

from sbi_engine.cli import main


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("npe_cli")
    assert main(["simulate", "gaussian_linear", "--num", "2000", "--seed", "0", "--out",
                 str(d / "train"), "--quiet"]) == 0
    assert main(["simulate", "gaussian_linear", "--num", "40", "--seed", "1", "--out",
                 str(d / "test"), "--quiet"]) == 0
    assert main(["train", str(d / "train"), "--estimator", "maf", "--max-epochs", "8",
                 "--out", str(d / "model"), "--quiet"]) == 0
    return d


def test_train_writes_a_model(workdir):
    header = json.loads((workdir / "model" / "posterior.json").read_text())
    assert header["format"] == "sbi-engine-posterior"
    assert header["metadata"]["simulator"] == "gaussian_linear"
    assert header["flow"]["kind"] == "maf"


def test_train_with_the_sbi_backend_writes_a_model_sample_reads(workdir):
    pytest.importorskip("sbi")
    model = workdir / "sbi_model"
    assert main(["train", str(workdir / "train"), "--estimator", "maf", "--backend", "sbi",
                 "--max-epochs", "3", "--out", str(model), "--quiet"]) == 0
    header = json.loads((model / "posterior.json").read_text())
    assert header["metadata"]["backend"] == "sbi" and header["metadata"]["device"] == "cpu"
    np.save(workdir / "xo_sbi.npy", np.zeros(10, np.float32))
    assert main(["sample", str(model), "--observation", str(workdir / "xo_sbi.npy"),
                 "--num", "50", "--seed", "0", "--out", str(workdir / "s_sbi.npy")]) == 0
    assert np.load(workdir / "s_sbi.npy").shape == (50, 10)


def test_sample_from_npy_and_csv(workdir, capsys):
    x_o = np.full(10, 0.1, np.float32)
    np.save(workdir / "xo.npy", x_o)
    assert main(["sample", str(workdir / "model"), "--observation", str(workdir / "xo.npy"),
                 "--num", "500", "--out", str(workdir / "s.npy")]) == 0
    s = np.load(workdir / "s.npy", allow_pickle=False)
    assert s.shape == (500, 10) and np.isfinite(s).all()
    np.savetxt(workdir / "xo.csv", x_o[None], delimiter=",")
    assert main(["sample", str(workdir / "model"), "--observation", str(workdir / "xo.csv"),
                 "--num", "20", "--out", str(workdir / "s2.npy")]) == 0
    assert "samples of shape (20, 10)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("obs", "expected"),
    [
        (np.full(10, np.nan), "error: --observation: contains NaN or inf"),
        (np.zeros(3), "error: --observation: expected shape (10,)"),
    ],
)
def test_bad_observation_is_one_clear_line(workdir, capsys, obs, expected):
    np.save(workdir / "bad.npy", obs)
    code = main(["sample", str(workdir / "model"), "--observation", str(workdir / "bad.npy"),
                 "--out", str(workdir / "never.npy")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(expected) and len(err.strip().splitlines()) == 1
    assert not (workdir / "never.npy").exists()


def test_diagnose_writes_numbers_and_plots(workdir):
    out = workdir / "diag"
    assert main(["diagnose", str(workdir / "model"), str(workdir / "test"), "--sbc", "30",
                 "--num-posterior-samples", "50", "--out", str(out)]) == 0
    metrics = json.loads((out / "diagnostics.json").read_text())
    assert metrics["num_simulations"] == 30
    assert len(metrics["sbc"]["chi2_pvalue"]) == 10
    for png in ("sbc_ranks.png", "coverage.png", "pairplot.png"):
        assert (out / png).stat().st_size > 1000


def test_sample_with_a_missing_model_is_an_error(tmp_path, capsys):
    np.save(tmp_path / "xo.npy", np.zeros(10))
    code = main(["sample", str(tmp_path / "nomodel"), "--observation", str(tmp_path / "xo.npy"),
                 "--out", str(tmp_path / "s.npy")])
    assert code == 2 and "no posterior.json" in capsys.readouterr().err


def test_train_refuses_an_out_that_is_not_a_model_before_training(workdir, tmp_path, capsys):
    # --out pointing at the training dataset or a folder of one's own files once replaced
    # it with the model after training; now it is refused up front and nothing changes.
    mine = tmp_path / "results"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep me")
    dataset_files = sorted(p.name for p in (workdir / "train").iterdir())
    for out in (workdir / "train", mine):
        capsys.readouterr()
        assert main(["train", str(workdir / "train"), "--max-epochs", "1", "--out", str(out),
                     "--quiet"]) == 2
        out_, err = capsys.readouterr()
        assert "would delete" in err and "training" not in out_, err
    assert (mine / "thesis.tex").read_text() == "keep me"
    assert sorted(p.name for p in (workdir / "train").iterdir()) == dataset_files
    # An earlier model directory (either backend) is replaced, as a rerun expects.
    assert main(["train", str(workdir / "train"), "--estimator", "maf", "--max-epochs", "1",
                 "--out", str(workdir / "model_again"), "--quiet"]) == 0
    assert main(["train", str(workdir / "train"), "--estimator", "maf", "--max-epochs", "1",
                 "--out", str(workdir / "model_again"), "--quiet"]) == 0


def test_atomic_write_dir_replaces_only_its_own_kind(tmp_path):
    from sbi_engine.errors import SbiEngineError
    from sbi_engine.store import atomic_write_dir

    target = tmp_path / "m"
    atomic_write_dir(target, {"posterior.json": b"{}", "params.msgpack": b"1"})
    atomic_write_dir(target, {"posterior.json": b"{}", "weights.npz": b"2"})  # sbi over jax
    assert sorted(p.name for p in target.iterdir()) == ["posterior.json", "weights.npz"]
    (target / "notes.txt").write_text("mine")
    with pytest.raises(SbiEngineError, match="holds notes.txt, which writing a model"):
        atomic_write_dir(target, {"posterior.json": b"{}", "params.msgpack": b"1"})
    (tmp_path / "f").write_text("x")
    with pytest.raises(SbiEngineError, match="is not a directory"):
        atomic_write_dir(tmp_path / "f", {"posterior.json": b"{}"})
    assert (target / "notes.txt").read_text() == "mine" and (tmp_path / "f").read_text() == "x"
