"""Every DeepSpeed internal miss_ds relies on, in one place, with the DeepSpeed versions it was checked against.

Public DeepSpeed APIs are used directly where they are needed; what is private (underscored names, attributes
of DeepSpeed's classes that are not documented, module-level registries) goes through this module, so that a
DeepSpeed upgrade is checked here and nowhere else. ``setup.py`` bounds DeepSpeed to ``CHECKED_VERSIONS``.
"""
from __future__ import annotations

#: DeepSpeed releases whose internals below were read and tested (setup.py's install range).
CHECKED_VERSIONS = ">=0.19.8,<0.20"


def skip_cpu_shm_op() -> None:
    """Do not build DeepSpeed's shared-memory all-reduce op (a C++ build of about 25 s on the first run).

    A one-process CPU job has nothing to all-reduce, so the build is pure start-up cost. DeepSpeed builds the op
    when its communication backend starts, for every op its ``__compatible_ops__`` registry marks usable.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
