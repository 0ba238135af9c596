"""Maps the top-level kernels/ folder to the `minivllm.kernels` package; everything else is in pyproject.toml.

kernels/ has no __init__.py: a regular package there would shadow Hugging Face's `kernels`
package (which transformers imports) whenever the repository root is on sys.path, as it is under
`python -m pytest`; a namespace portion never wins over a regular package. A wheel therefore holds
minivllm/kernels/*.py without __init__.py (an implicit namespace subpackage of `minivllm`).

A lenient editable install (plain `pip install -e .`) cannot map such a package
(pypa/setuptools#4248), so there `minivllm.kernels` is the shim kernels/_editable/__init__.py,
which sets the package's __path__ to kernels/. Strict editable installs link the files and need no shim.
"""

from setuptools import find_packages, setup
from setuptools.command.editable_wheel import editable_wheel


class EditableWheel(editable_wheel):
    def finalize_options(self):
        if (self.mode or "lenient").lower() != "strict":
            self.distribution.package_dir = {**self.distribution.package_dir, "minivllm.kernels": "kernels/_editable"}
        super().finalize_options()


setup(
    packages=find_packages("src") + ["minivllm.kernels"],
    package_dir={"": "src", "minivllm.kernels": "kernels"},
    cmdclass={"editable_wheel": EditableWheel},
)
