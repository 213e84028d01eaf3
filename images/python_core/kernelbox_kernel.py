"""Starts ipykernel as `python -m ipykernel_launcher` does, with its debugger loaded on first use.

ipykernel imports debugpy (and pydevd) when the kernel object is made, to offer Jupyter's debugger: about
8 MiB of every kernel's memory and 0.17 s of its start, in every session, for a feature few sessions use.
Here the kernel still offers the debugger (`kernel_info` lists it, `debug_request` works), but debugpy is
imported only when the first `debug_request` arrives:

  1. `ipykernel.debugger` is stood in for by a small module that answers `_is_debugpy_available` (whether
     debugpy can be imported, found without importing it) and loads the real module for anything else;
  2. the kernel (`Kernel`, ipykernel's with another `debugger_class`) makes a `LazyDebugger`, which keeps
     its constructor's arguments and makes the real `Debugger` the first time it is used. Until then the control thread's wait for stopped
     events waits on an event, at no cost.

It also runs the kernel without start-kernel's relay: given `--KernelboxApp.connect_to=PREFIX` (the
descriptors pass the service's "/kernel/k"), the kernel CONNECTS its shell, stdin, control and iopub
sockets to the unix sockets "PREFIX-<port>" that the service listens on, instead of binding its own for
start-kernel to relay. ZeroMQ lets either side bind, and ZMTP is the same either way, so the service sees
the same four connections and the same bytes, one copy and two context switches fewer per message. libzmq
reconnects on its own (every 100 ms) when the service restarts and binds again. The heartbeat is not
started (the service does not use it), and shell is also bound privately under /tmp/kernelbox, for the
debugger's own connection to it (ipykernel connects that to shell's last endpoint).

Usage (the python descriptors): python -m kernelbox_kernel [--KernelboxApp.connect_to=PREFIX]
<ipykernel_launcher's arguments>
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    # Run as a script, this copy only launches: as ipykernel_launcher, the working directory leaves
    # sys.path before anything of the kernel is imported (a file there must not stand in for one of its
    # modules), and the imported copy, `kernelbox_kernel`, does the rest.
    if sys.path and (sys.path[0] == "" or Path(sys.path[0]) == Path.cwd()):
        del sys.path[0]
    import kernelbox_kernel

    kernelbox_kernel.main()
    raise SystemExit(0)

import asyncio  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import threading  # noqa: E402
import types  # noqa: E402

_REAL = "ipykernel.debugger"


class _DebuggerModuleStandIn(types.ModuleType):
    """What `ipykernel.debugger` is until the debugger is used."""

    def __init__(self):
        super().__init__(_REAL)
        self._is_debugpy_available = importlib.util.find_spec("debugpy") is not None

    def __getattr__(self, name):
        # The import system asks modules for `__path__` and the like: those are not the debugger.
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(_real_module(), name)


_loading = threading.Lock()


def _real_module():
    with _loading:
        module = sys.modules.get(_REAL)
        if module is None or isinstance(module, _DebuggerModuleStandIn):
            sys.modules.pop(_REAL, None)
            module = importlib.import_module(_REAL)
        return module


class LazyDebugger:
    """ipykernel's `Debugger`, made the first time anything of it is used."""

    def __init__(self, *args, **kwargs):
        self._args = (args, kwargs)
        self._real = None
        self._lock = threading.Lock()
        self._ready = asyncio.Event()
        self._waiting_loop = None

    def _debugger(self):
        with self._lock:
            if self._real is None:
                args, kwargs = self._args
                self._real = _real_module().Debugger(*args, **kwargs)
                loop = self._waiting_loop
                if loop is not None:
                    loop.call_soon_threadsafe(self._ready.set)
            return self._real

    async def handle_stopped_event(self):
        # The control thread waits here for the first stopped event; before the debugger exists there
        # can be none.
        self._waiting_loop = asyncio.get_running_loop()
        if self._real is None:
            await self._ready.wait()
        await self._real.handle_stopped_event()

    async def process_request(self, msg):
        return await self._debugger().process_request(msg)

    def __getattr__(self, name):
        return getattr(self._debugger(), name)


# Before anything of ipykernel is imported.
sys.modules.setdefault(_REAL, _DebuggerModuleStandIn())

from ipykernel.ipkernel import IPythonKernel  # noqa: E402
from ipykernel.kernelapp import IPKernelApp  # noqa: E402
from traitlets import Type, Unicode  # noqa: E402


class Kernel(IPythonKernel):
    """ipykernel's kernel, with the debugger made on first use."""

    debugger_class = Type(LazyDebugger, klass=LazyDebugger)


class KernelboxApp(IPKernelApp):
    """ipykernel's application, which connects its channels to the service when `connect_to` is set."""

    connect_to = Unicode(
        "",
        config=True,
        help="Connect shell, stdin, control and iopub to the unix sockets '<connect_to>-<port>' (ipc) "
        "instead of binding them.",
    )

    def _bind_socket(self, s, port):
        if not self.connect_to:
            return super()._bind_socket(s, port)
        if self.transport != "ipc" or not port:
            raise ValueError("connect_to needs the ipc transport and fixed ports")
        s.connect(f"ipc://{self.connect_to}-{port}")
        if s is self.shell_socket:
            # Bound last, so that it is shell's last endpoint, which the debugger's socket connects to.
            super()._bind_socket(s, port)
        return port

    def init_heartbeat(self):
        if not self.connect_to:
            super().init_heartbeat()


def main():
    KernelboxApp.launch_instance(argv=["--KernelboxApp.kernel_class=kernelbox_kernel.Kernel", *sys.argv[1:]])

