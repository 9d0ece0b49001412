"""The `simex` command line as a user runs it: real files, one-line errors. Each verb runs once as a real process
(`simex`); the error cases and repeated runs call its ``main`` in this process (``simex_here``), which exits and
prints the same."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from simex_ray import data


def simex(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "simex_ray.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"simex {' '.join(map(str, args))} failed:\n{proc.stderr}")
    return proc


def assert_one_line_error(proc, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip() and not l.startswith("INFO")]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("spec, needle", [
    ("mnst", "did you mean 'mnist'"),
    ("foo:digits", "valid:"),
    ("npz:", "npz:PATH"),
    ("rotated:", "rotated:SPEC"),
    ("npz:/no/such/file.npz", "does not exist"),
    ("digits#42", "available: 0, 1"),
])
def test_bad_specs_give_one_line_errors(tiny_fleet, simex_here, spec, needle):
    assert_one_line_error(simex_here("score", "--fleet", tiny_fleet, "--data", spec, check=False), needle)


def test_bad_train_specs_fail_before_any_training(tmp_path, simex_here):
    proc = simex_here("train", "--refs", "digits,mnst", "--out", tmp_path / "f", "--no-ray", check=False)
    assert_one_line_error(proc, "mnst")
    assert not (tmp_path / "f" / "manifest.json").exists()


def test_corrupted_weight_file_is_a_one_line_error(tiny_fleet, tmp_path, simex_here):
    fleet = shutil.copytree(tiny_fleet, tmp_path / "f")
    weights = next((fleet / "weights").glob("digits-*.pt"))
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    assert_one_line_error(simex_here("score", "--fleet", fleet, "--data", "digits", check=False),
                          weights.name, "corrupted")


def test_missing_fleet_and_bad_numbers(tmp_path, simex_here):
    assert_one_line_error(simex_here("score", "--fleet", tmp_path / "nope", "--data", "digits", check=False),
                          "does not exist")
    proc = simex_here("train", "--refs", "digits", "--out", tmp_path / "f", "--epochs", "0", check=False)
    assert proc.returncode == 2 and "positive integer" in proc.stderr


def _write_npz(path, spec, seed):
    ds = data.load(spec, seed=seed)
    np.savez_compressed(path, x=(ds.x[:, 0] * 255).round().astype(np.uint8), y=ds.y)
    return f"npz:{path}"


def test_train_and_score_npz_files_the_project_never_saw(tmp_path, simex_here):
    """Unseen files: plain digits and a noise-background copy, uint8 (N, 28, 28). `simex train`, `score` and
    `matrix` each run once as a real process."""
    plain = _write_npz(tmp_path / "plain.npz", "digits", 7)
    noisy = _write_npz(tmp_path / "noisy.npz", "bgrand:digits", 7)
    fleet = tmp_path / "fleet"
    simex("train", "--refs", f"{plain},{noisy}", "--out", fleet, "--epochs", "2", "--samples", "300", "--no-ray")
    for spec, run in ((plain, simex), (noisy, simex_here)):
        proc = run("score", "--fleet", fleet, "--data", spec, "--split", "test", "--samples", "300", "--json")
        out = json.loads(proc.stdout)  # exactly one JSON object on stdout
        assert set(out) >= {"fleet", "data", "n", "loss", "delta", "ranking", "delta_normalized"}
        assert out["ranking"][0] == spec and out["n"] == 50 and out["loss"] == "mse"
    table = simex_here("score", "--fleet", fleet, "--data", plain).stdout
    assert "most similar: " + plain in table

    proc = simex("matrix", "--fleet", fleet, "--out", tmp_path / "m", "--json")
    result = json.loads(proc.stdout)
    assert result["self_top1"] == {plain: True, noisy: True}
    for ext in ("json", "parquet", "png"):
        assert (tmp_path / "m" / f"delta_matrix.{ext}").stat().st_size > 0


VERBS = {"train", "score", "matrix", "pair", "select", "train-bases", "library", "serve", "query", "experiment", "tune",
         "cluster"}


def _verbs(parser):
    import argparse

    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def test_help_lists_every_verb(capsys):
    from simex_ray.cli import build_parser

    verbs = _verbs(build_parser())
    assert set(verbs) == VERBS  # exactly these verbs, none missing, none extra
    for verb in sorted(VERBS):
        with pytest.raises(SystemExit) as done:
            build_parser().parse_args([verb, "--help"])
        assert done.value.code == 0, verb
        assert capsys.readouterr().out.startswith(f"usage: simex {verb}"), verb
    # The entry point's own help lists every verb, one per line under COMMAND.
    out = simex("--help").stdout
    listed = re.findall(r"^    ([\w-]+)\s", out.split("COMMAND\n", 1)[1], flags=re.M)
    assert set(listed) == VERBS


def rho_mean(result):
    """The paper's mean ρ recomputed from the written matrices (Δ column vs accuracy column, signed)."""
    from simex_ray.ranking import spearman

    d, a = np.asarray(result["delta"]), np.asarray(result["transfer_accuracy"])
    return float(np.nanmean([-spearman(d[:, j], a[:, j]) for j in range(len(d))]))


def test_experiment_inter_dataset_and_latency_verbs(tmp_path, simex_here):
    """`experiment inter-dataset` runs once as a real process; the reuse, latency and the refusals run in this
    process (the same `main`)."""
    protocol = tmp_path / "tiny.json"
    protocol.write_text(json.dumps({"ae_epochs": 1, "tl_configs": ["TL-1"], "clf_max_epochs": 2,
                                    "clf_patience": 1, "n_pairs": 32, "embedding_samples": 60}))
    # An unseen npz file whose labels run 1..10 (as EMNIST letters files often do): its first 10 classes are used.
    noisy = data.load("bgrand:digits")
    np.savez(tmp_path / "held-out.npz", x=(noisy.x[:, 0] * 255).astype(np.uint8), y=noisy.y + 1)
    refs = f"digits,rotated:digits,npz:{tmp_path / 'held-out.npz'}"
    proc = simex("experiment", "inter-dataset", "--refs", refs, "--samples", "120", "--test-samples", "200",
                 "--protocol", protocol, "--out", tmp_path / "i", "--no-ray")
    summary = json.loads(proc.stdout)
    result = json.loads((tmp_path / "i" / "inter_dataset.json").read_text())
    assert summary["references"] == refs.split(",") and summary["rho_mean"] == pytest.approx(rho_mean(result))
    # The ground truth it computed is reused as it is: no classifier trained, the same matrix, Δ of another loss.
    again = simex_here("experiment", "inter-dataset", "--refs", refs, "--loss", "issim",
                  "--ground-truth", tmp_path / "i" / "ground_truth", "--out", tmp_path / "i2", "--no-ray")
    reused = json.loads((tmp_path / "i2" / "inter_dataset.json").read_text())
    assert reused["transfer_accuracy"] == result["transfer_accuracy"] and reused["ground_truth"]["reused"]
    assert "autoencoders" in again.stderr  # its progress is shown, without the ground truth's stages
    assert "base-classifiers" not in again.stderr and "transfer " not in again.stderr
    assert reused["samples"] == 120 and reused["protocol"]["test_samples"] == 200  # taken from the ground truth
    bad = simex_here("experiment", "inter-dataset", "--refs", refs, "--samples", "60", "--ground-truth",
                tmp_path / "i" / "ground_truth", "--out", tmp_path / "i3", "--no-ray", check=False)
    assert_one_line_error(bad, "computed on --samples 120, not 60")
    bad = simex_here("experiment", "inter-dataset", "--refs", refs, "--protocol", protocol, "--ground-truth",
                tmp_path / "i" / "ground_truth", "--out", tmp_path / "i3", "--no-ray", check=False)
    assert_one_line_error(bad, "protocol differs in test_samples (test_samples 200 here, None asked)")
    assert len(result["delta"]) == 3 and len(result["transfer_accuracy"][0]) == 3
    assert set(result["baselines"]) == {"sample-mse", "sample-issim", "embeddings"}
    assert result["sizes"][refs.split(",")[2]]["clf_test"] == 200  # all ten 1-based classes kept
    assert min(min(row) for row in result["transfer_accuracy"]) > 0.1
    proc = simex_here("experiment", "latency", "--refs", refs, "--unknown", "rotated:digits", "--samples", "120",
                 "--repeats", "2", "--protocol", protocol, "--out", tmp_path / "l", "--no-ray")
    summary = json.loads(proc.stdout)
    assert summary["speedup"] > 0 and set(summary["transfer_seconds"]) == {"TL-1"}
    assert (tmp_path / "l" / "latency.png").stat().st_size > 1000
    bad = simex_here("experiment", "latency", "--refs", refs, "--unknown", "digits", "--protocol", "nope",
                "--out", tmp_path / "x", "--no-ray", check=False)
    assert_one_line_error(bad, "unknown protocol 'nope'")


def test_the_parser_offers_exactly_the_registries_names():
    """The parser takes its choices from simex_ray.choices (no torch); each registry has exactly those names."""
    from simex_ray import choices
    from simex_ray.models import architectures
    from simex_ray.training import OPTIMIZERS
    from simex_ray.transfer.estimators import ESTIMATORS
    from simex_ray.transfer.selection import SIMEX

    assert tuple(OPTIMIZERS) == choices.OPTIMIZERS
    assert architectures() == sorted(choices.ARCHITECTURES)
    assert choices.SELECTION_METHODS == (SIMEX, *ESTIMATORS)


def test_help_and_input_errors_start_without_torch():
    """`simex --help`, an argument error and a bad spec are answered before torch is imported."""
    code = """if True:
        import sys
        from simex_ray.cli import main
        try:
            main(["--help"])
        except SystemExit as e:
            assert e.code == 0
        try:
            main(["train", "--refs", "digits", "--out", "x", "--epochs", "0"])
        except SystemExit as e:
            assert e.code == 2
        assert main(["train", "--refs", "digits,mnst", "--out", "x", "--no-ray"]) == 2
        assert main(["score", "--fleet", "x", "--data", "mnst"]) == 2
        print(sorted(m for m in ("torch", "ray", "scipy", "pandas") if m in sys.modules))
    """
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "[]"
