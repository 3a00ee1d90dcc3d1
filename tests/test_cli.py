"""The commands: setup.py's console scripts name the functions in miss_ds/cli/, and launch/ and tools/ run the same."""
from __future__ import annotations

import importlib
import importlib.util
import re
import subprocess
import sys

from tests.launch_utils import ROOT

#: Console script -> (module, function), as setup.py declares them.
SCRIPTS = dict((name, (module, function)) for name, module, function in re.findall(
    r'"(miss-ds-[a-z-]+)=([\w.]+):(\w+)"', (ROOT / "setup.py").read_text()))
WRAPPERS = {"tools/convert_to_hf.py": "miss_ds.cli.convert", "tools/reshard.py": "miss_ds.cli.reshard",
            "tools/plan_memory.py": "miss_ds.cli.plan_memory"}


def test_console_scripts_are_the_cli_commands():
    assert set(SCRIPTS) == {"miss-ds-train", "miss-ds-convert", "miss-ds-reshard", "miss-ds-plan-memory",
                            "miss-ds-generate", "miss-ds-eval"}
    for name, (module, function) in SCRIPTS.items():
        assert callable(getattr(importlib.import_module(module), function)), name


def test_tools_wrap_the_cli_commands():
    for path, module in WRAPPERS.items():
        spec = importlib.util.spec_from_file_location(path, ROOT / path)
        tool = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tool)
        assert tool.main is importlib.import_module(module).main, path


def test_train_help_exits_0_without_a_traceback():
    proc = subprocess.run([sys.executable, "launch/train.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "miss-ds-train" in proc.stdout and "Traceback" not in proc.stderr
