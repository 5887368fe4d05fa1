"""The README's Python scripts run as written: each code block that starts with `# <name>.py` is saved and run.

Tier (c) of the tests (docs/architecture.md, "Tests"). `train_moe.py` runs in one process;
`train_ted.py` starts 4 ranks with `tedfx.launch` (T=2 x X=2), exactly as a user would run it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _scripts() -> dict[str, str]:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return {m.group(1): block for block in blocks if (m := re.match(r"# (\w+\.py)\n", block))}


def test_the_readme_has_its_two_scripts():
    assert set(_scripts()) >= {"train_moe.py", "train_ted.py"}


@pytest.mark.parametrize("name, expect", [
    ("train_moe.py", r"'blocks': 2"),
    ("train_ted.py", r"all_to_all\s+ep"),
])
def test_readme_script_runs_as_written(tmp_path, name, expect):
    script = tmp_path / name
    script.write_text(_scripts()[name])
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(expect, result.stdout), result.stdout[-3000:]
