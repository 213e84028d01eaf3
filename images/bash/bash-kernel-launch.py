"""Start bash_kernel with pexpect's pause before every send switched off.

pexpect waits `delaybeforesend` (0.05 s) before each line it sends to bash.
bash_kernel sends every line of a cell, plus one line to read `$?`, and ~50
lines of helper definitions at start-up, so that pause alone made each
execute take ~110 ms and start-up ~2 s longer. bash reads from a pty and does
not lose input sent early, so the pause is not needed here.

Run as: python /opt/kernelbox/bash-kernel-launch.py -f CONNECTION_FILE
"""
import runpy

import pexpect.pty_spawn

_spawn_init = pexpect.pty_spawn.spawn.__init__


def _spawn_init_nodelay(self, *args, **kwargs):
    _spawn_init(self, *args, **kwargs)
    self.delaybeforesend = None


pexpect.pty_spawn.spawn.__init__ = _spawn_init_nodelay
runpy.run_module("bash_kernel", run_name="__main__", alter_sys=True)
