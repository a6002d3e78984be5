"""kgrad: summed input-gradients of kernel sums over large point sets.

    g(q_j) = sum_i w_i grad_q k(q_j, x_i),     v(q_j) = sum_i w_i k(q_j, x_i)

In process: :func:`kernel_gradients`.  On a dask cluster, zarr in and out: the ``kgrad`` command
(:mod:`pipeline.cli`) or :func:`pipeline.workflow.run_workflow`.
"""

from .api import kernel_gradients
from .errors import InputError, NonFiniteResultError
from .kernels import KERNELS

__version__ = "0.1.0"
__all__ = ["kernel_gradients", "InputError", "NonFiniteResultError", "KERNELS", "__version__"]
