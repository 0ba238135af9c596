"""`minivllm.kernels` in a lenient (default) editable install; never part of a wheel.

kernels/ has no __init__.py on purpose: a folder without one is a PEP 420 namespace portion,
which never shadows a regular package, so with the repository root on sys.path (`python -m ...`
puts the working directory first) `import kernels` still finds Hugging Face's `kernels` package,
which transformers imports. setuptools' editable finder cannot map a package without
__init__.py to a folder outside its parent (pypa/setuptools#4248, #4943), so setup.py maps
`minivllm.kernels` here for editable installs, and this module points the package at kernels/.
"""

import os

__path__ = [os.path.dirname(os.path.dirname(os.path.realpath(__file__)))]
