"""On a child interpreter's PYTHONPATH (``helpers.crash_python_children``), this kills it with SIGSEGV as
it starts: what an interpreter whose AOTInductor runtime is broken does when it loads an engine."""

import os
import signal

os.kill(os.getpid(), signal.SIGSEGV)
