# Runs before any test module: the Triton interpreter must be on before kernels/ (and Triton) are imported, so
# that tests/test_kernels.py can run the real kernels on CPU tensors. Every other test module gets the plain
# PyTorch references, as on a CPU machine without the interpreter; test_kernels.py switches the kernels on.
import os

os.environ["TRITON_INTERPRET"] = "1"

import kernels  # noqa: E402

kernels.set_backend("torch")
