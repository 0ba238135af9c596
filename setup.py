# Maps the top-level kernels/ folder to the `minivllm.kernels` package; everything else is in pyproject.toml.
from setuptools import find_packages, setup

setup(
    packages=find_packages("src") + ["minivllm.kernels"],
    package_dir={"": "src", "minivllm.kernels": "kernels"},
)
