"""Build csrc/ into a wheel holding the top-level module `minivllm_csrc`, the prebuilt extension
that minivllm/ops/csrc_ops.py imports before falling back to a JIT build.

    python builder/build_csrc.py --csrc csrc --arch 9.0a --out /wheels

Same sources and flags as csrc_ops.build() (every .cpp/.cu in csrc/, -O3, csrc/ on the include
path), but through setuptools so it needs no GPU: the Dockerfile's cuda stage runs it with nvcc
and no device. MAX_JOBS caps parallel compiles (ninja); NVCC_THREADS is passed to nvcc --threads.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile

MODULE = "minivllm_csrc"


def extension_sources(csrc: str) -> list[str]:
    sources = sorted(glob.glob(os.path.join(csrc, "*.cpp")) + glob.glob(os.path.join(csrc, "*.cu")))
    if not sources:
        raise SystemExit(f"build_csrc: no .cpp/.cu sources in {csrc}")
    return sources


def build_wheel(csrc: str, arch: str, out: str) -> None:
    from setuptools import setup
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    csrc = os.path.abspath(csrc)
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    nvcc_flags = ["-O3", "--threads", os.environ.get("NVCC_THREADS") or "2"]
    with tempfile.TemporaryDirectory(prefix="minivllm-csrc-") as build_dir:
        # setuptools wants relative source paths inside the project folder: build from a scratch one.
        os.symlink(csrc, os.path.join(build_dir, "csrc"))
        os.chdir(build_dir)
        rel = [os.path.join("csrc", os.path.basename(s)) for s in extension_sources(csrc)]
        setup(
            name=MODULE,
            version="0.1.0",
            description="mini-vLLM CUDA ops (csrc/), prebuilt",
            ext_modules=[CUDAExtension(MODULE, rel, include_dirs=[csrc],
                                       extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags})],
            cmdclass={"build_ext": BuildExtension},
            script_args=["-q", "bdist_wheel", "--dist-dir", os.path.abspath(out)],
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    here = os.path.dirname(os.path.abspath(__file__))
    p.add_argument("--csrc", default=os.path.join(here, os.pardir, "csrc"), help="the csrc/ folder")
    p.add_argument("--arch", default="9.0a", help="TORCH_CUDA_ARCH_LIST for the build (default: 9.0a, H100/H200)")
    p.add_argument("--out", default="dist", help="folder for the wheel")
    p.add_argument("--list", action="store_true", help="print the sources and exit")
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(extension_sources(args.csrc)))
        return 0
    os.makedirs(args.out, exist_ok=True)
    args.out = os.path.abspath(args.out)
    build_wheel(args.csrc, args.arch, args.out)
    print(f"build_csrc: wheel for {MODULE} ({args.arch}) in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
