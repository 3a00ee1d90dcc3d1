"""The commands users run, one module each, installed as console scripts by setup.py (``miss-ds-<name>``) and
wrapped by ``launch/train.py`` and ``tools/*.py`` with the same arguments. Every module has ``main(argv) -> int``.

Nothing is imported here: ``miss_ds.cli.train`` must install its preemption handler before torch is imported.
"""
