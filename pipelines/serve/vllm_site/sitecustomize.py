"""Run at start-up by every Python process vLLM's worker (`vllm_worker.py`) starts: its engine core, the engine
core's workers, multiprocessing's resource tracker. Each asks the kernel for SIGKILL when its parent dies.

Ray kills a replica together with its direct children (`RAY_kill_child_processes_on_worker_exit`), so vLLM's
worker can die without running any code; its engine processes, spawned by it, would be left running (orphans of
~0.6-1.7 GB each were seen). The worker puts this folder on its children's PYTHONPATH; the worker itself does not
run this (the replica starts it without it): its parent is the replica, which watches it otherwise.
"""

import ctypes
import os
import signal

if os.environ.get("PIPELINES_VLLM_DIE_WITH_PARENT") == "1":
    _parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != _parent:  # the parent died before the request took effect
        os._exit(1)
