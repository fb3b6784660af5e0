"""The examples run from one command and print what they claim (small settings: --quick)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_example(name, *args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", name), *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_train_digits_quick_shows_bn_training_faster_and_stable():
    pytest.importorskip("sklearn")
    out = run_example("train_digits.py", "--quick", "--no-png")
    rows = [line.split("|") for line in out.splitlines() if line.startswith(("MLP ", "CNN "))]
    assert len(rows) == 4, out                        # two models x two learning rates
    for row in rows:
        epochs_bn, final_bn = row[2].split()
        assert epochs_bn != "-" and float(final_bn) >= 90, out   # every BN run reaches 95 %
    for model in ("MLP", "CNN"):
        summary = next(line for line in out.splitlines() if line.startswith(model + ":"))
        assert "with BN at lr none" in summary, out
        assert "fewer epochs at lr [0.05, 1.0]" in summary, out


def test_train_digits_says_what_it_needs_without_scikit_learn(tmp_path):
    # a module named sklearn that fails to import stands in for a missing scikit-learn
    (tmp_path / "sklearn").mkdir()
    (tmp_path / "sklearn" / "__init__.py").write_text("raise ImportError('no scikit-learn here')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "train_digits.py"), "--quick"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode != 0 and "needs scikit-learn" in proc.stderr and "pip install scikit-learn" in proc.stderr


def test_infer_pipeline_quick_times_four_variants_and_their_outputs_agree():
    out = run_example("infer_pipeline.py", "--quick", "--rounds", "2")
    for name in ("plain BN (bn_simd, out= in place)", "BN folded into the conv", "BN + ReLU fused (bn_simd, activation=)",
                 "NumPy BN formula", "no BN at all"):
        line = next(line for line in out.splitlines() if line.startswith(name))
        assert float(line[40:].split()[0]) > 0, out          # a median time in ms
    assert "max |BN + ReLU fused (bn_simd, activation=) - plain BN|" in out, out
    assert "outputs agree within float32 rounding" in out, out


@pytest.mark.parametrize("module, needs", [("bn_simd", None), ("bn_simd.keras", None), ("bn_simd.torch", "torch")])
def test_module_docstring_examples_run(module, needs):
    # Each package's docstring opens with an example a user may paste or run with pytest --doctest-modules.
    import doctest
    import importlib
    if needs is not None:
        pytest.importorskip(needs)
    mod = importlib.import_module(module)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 3, f"{module}'s docstring lost its example"
    assert result.failed == 0
