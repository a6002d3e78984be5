"""kgrad: summed input-gradients of kernel sums over large point sets.

    g(q_j) = sum_i w_i grad_q k(q_j, x_i),     v(q_j) = sum_i w_i k(q_j, x_i)

In process: :func:`kernel_gradients`.  On a dask cluster, zarr in and out: the ``kgrad`` command
(:mod:`pipeline.cli`) or :func:`pipeline.workflow.run_workflow`.

JAX is imported on first use of :func:`kernel_gradients` or :data:`KERNELS`, not by ``import pipeline``:
the command line answers ``--help`` and usage errors without it.
"""

from .errors import InputError, NonFiniteResultError

__version__ = "0.1.0"
__all__ = ["kernel_gradients", "InputError", "NonFiniteResultError", "KERNELS", "__version__"]


def __getattr__(name):
    if name == "kernel_gradients":
        from .api import kernel_gradients

        return kernel_gradients
    if name == "KERNELS":
        from .kernels import KERNELS

        return KERNELS
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
