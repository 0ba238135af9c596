"""The repository's kernels/ folder never shadows an installed `kernels` package (issue 12, point 7).

Hugging Face's `kernels` package owns the top-level name `kernels`, and transformers imports it when
it is installed. Our Triton kernels live in the top-level folder kernels/, installed as
`minivllm.kernels` (setup.py). `python -m ...` and `python -c ...` put the working directory first on
sys.path, so from the repository root a kernels/__init__.py would make `import kernels` find our
folder instead of the installed package (transformers then fails in the MXFP4 parity tests). The
folder has no __init__.py: it is only a PEP 420 namespace portion, and a regular package anywhere on
sys.path wins over one. These tests put a stand-in regular `kernels` package on sys.path *after* the
repository root and check that it still wins, and that `minivllm.kernels` keeps working, in the
editable install under test and in a wheel built from this tree.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNEL_MODULES = sorted(p.stem for p in (ROOT / "kernels").glob("*.py"))
MARKER = "an installed regular package named kernels"

# Runs in a child interpreter whose sys.path[0] is the repository root (as under `python -m pytest`).
PROBE = textwrap.dedent(f"""
    import importlib, importlib.util, os, sys

    root = os.environ["PROBE_ROOT"]
    assert os.path.realpath(sys.path[0] or os.curdir) == os.path.realpath(root), sys.path[:3]
    import kernels
    assert getattr(kernels, "MARKER", None) == {MARKER!r}, (kernels, list(getattr(kernels, "__path__", [])))

    expected = os.environ.get("PROBE_MINIVLLM")  # where minivllm must come from (a wheel), if set
    import minivllm
    if expected:
        assert os.path.realpath(minivllm.__file__).startswith(os.path.realpath(expected)), minivllm.__file__
    for name in os.environ["PROBE_MODULES"].split(","):
        spec = importlib.util.find_spec("minivllm.kernels." + name)
        assert spec is not None and spec.origin.endswith(name + ".py"), (name, spec)
        if expected:
            assert os.path.realpath(spec.origin).startswith(os.path.realpath(expected)), spec.origin
        if importlib.util.find_spec("triton") is not None:
            importlib.import_module("minivllm.kernels." + name)
    from minivllm.kernels import moe_routing  # the `from minivllm.kernels import ...` form
    print("PROBE OK", kernels.__file__)
""")


def child_env(*pythonpath: Path | str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = os.pathsep.join([*map(str, pythonpath), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(PROBE_ROOT=str(ROOT), PROBE_MODULES=",".join(KERNEL_MODULES), **extra)
    return env


@pytest.fixture
def site(tmp_path) -> Path:
    """A folder standing for site-packages: a regular `kernels` package and the probe module."""
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text(f"MARKER = {MARKER!r}\n")
    (site / "kernels_probe.py").write_text(PROBE)
    return site


def test_the_kernels_folder_is_a_namespace_portion_not_a_regular_package():
    assert not (ROOT / "kernels" / "__init__.py").exists(), \
        "kernels/__init__.py makes the folder shadow Hugging Face's `kernels` under `python -m` from the root"
    assert {"moe_gemm", "moe_routing", "attention_decode", "attention_prefill"} <= set(KERNEL_MODULES)


@pytest.mark.parametrize("how", ["-m", "-c"])
def test_an_installed_kernels_package_wins_over_the_repo_folder(site, how):
    args = ["-m", "kernels_probe"] if how == "-m" else ["-c", "import kernels_probe"]
    r = subprocess.run([sys.executable, *args], cwd=ROOT, env=child_env(site), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "PROBE OK" in r.stdout, r.stdout + r.stderr


def test_a_wheel_holds_the_kernels_as_minivllm_kernels_only(site, tmp_path):
    """The wheel (as the Dockerfile's `pip install .` builds it): minivllm/kernels/*.py, no top-level
    `kernels`, no editable shim; imported from the unpacked wheel with the repository root first."""
    pytest.importorskip("setuptools")
    src = tmp_path / "src-tree"  # a copy, so the build leaves nothing in the repository
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(ROOT / "src", src / "src", ignore=ignore)
    shutil.copytree(ROOT / "kernels", src / "kernels", ignore=ignore)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and "No module named pip" in r.stderr:
        pytest.skip("pip is not installed")
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = (tmp_path / "dist").glob("minivllm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n for n in names if "kernels" in n} == {f"minivllm/kernels/{m}.py" for m in KERNEL_MODULES}, names

    unpacked = tmp_path / "unpacked"
    zipfile.ZipFile(wheel).extractall(unpacked)
    r = subprocess.run([sys.executable, "-m", "kernels_probe"], cwd=ROOT, capture_output=True, text=True,
                       env=child_env(site, unpacked, PROBE_MINIVLLM=str(unpacked / "minivllm")), timeout=300)
    assert r.returncode == 0 and "PROBE OK" in r.stdout, r.stdout + r.stderr


def test_python_m_pytest_collects_the_parity_tests_from_the_repo_root(site):
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                        "tests/test_parity.py"], cwd=ROOT, env=child_env(site), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "test_parity.py::" in r.stdout, r.stdout + r.stderr


def hf_kernels_installed() -> bool:
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return any(str(f).replace("\\", "/") == "kernels/__init__.py" for f in dist.files or [])


@pytest.mark.skipif(not hf_kernels_installed(), reason="Hugging Face's `kernels` package is not installed")
def test_parity_tests_pass_under_python_m_with_hf_kernels_installed():
    """The reported failure itself: `python -m pytest tests/test_parity.py` from the root, with HF's
    `kernels` installed (transformers then imports it while loading the MXFP4 checkpoint)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    r = subprocess.run([sys.executable, "-c", "import kernels; assert hasattr(kernels, 'get_kernel'), kernels"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    # the tests that load checkpoints with transformers (the MXFP4 ones failed), not the engine-only ones
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_parity.py",
                        "-k", "hf"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "4 passed" in r.stdout, r.stdout[-4000:] + r.stderr[-4000:]
