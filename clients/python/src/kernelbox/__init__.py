"""kernelbox: run code in stateful, sandboxed Jupyter kernels on a kernelbox service.

::

    from kernelbox import Kernelbox

    kb = Kernelbox("http://127.0.0.1:8080", api_key="...")   # or KERNELBOX_URL / KERNELBOX_API_KEY
    with kb.session("python") as s:
        r = s.run("x = 6 * 7\\nx")
        print(r.text)                                       # 42

:class:`Kernelbox` blocks; :class:`AsyncKernelbox` is the same with ``await``. Errors are exceptions named after
the API's codes (:mod:`kernelbox.errors`); results keep Jupyter's outputs whole (:mod:`kernelbox.models`).
"""

from ._async import AsyncExecution, AsyncFiles, AsyncKernelbox, AsyncPackages, AsyncSession
from ._core import VERSION as __version__
from ._core import Retry, RetryAttempt
from ._sync import Execution, Files, Kernelbox, Packages, Session
from .errors import *  # noqa: F403 (the exceptions are part of the package's API)
from .errors import __all__ as _errors
from .models import *  # noqa: F403
from .models import __all__ as _models

__all__ = [
    "Kernelbox",
    "Session",
    "Files",
    "Packages",
    "Execution",
    "AsyncKernelbox",
    "AsyncSession",
    "AsyncFiles",
    "AsyncPackages",
    "AsyncExecution",
    "Retry",
    "RetryAttempt",
    "__version__",
    *_errors,
    *_models,
]
