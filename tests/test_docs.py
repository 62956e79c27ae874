"""The README's Python examples and examples/*.py run, so the documentation cannot go stale."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def _readme_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    env.pop("MEMSTRATA_DISABLE", None)
    return env


def test_readme_has_runnable_examples():
    blocks = _readme_blocks()
    assert len(blocks) >= 3
    assert any("Manager(" in b for b in blocks) and any("memstrata.plan(" in b for b in blocks)


@pytest.mark.parametrize("i", range(len(_readme_blocks())))
def test_readme_python_block_runs(i, tmp_path):
    code = _readme_blocks()[i]
    if "/data/imagenet" in code:  # needs the user's data set: examples/tiered_loader.py runs the same API
        code = code.replace('"/data/imagenet/train"', repr(str(tmp_path / "train")))
        code = ("from memstrata.data import synth_imagefolder\n"
                f"synth_imagefolder({str(tmp_path / 'train')!r}, images=64, classes=2, progress=False)\n"
                + code.replace("epochs=90", "epochs=2, store_dir=" + repr(str(tmp_path / "store")) + ", progress=False")
                .replace("range(90)", "range(2)").replace("TrainAugment(size=224)", "TrainAugment(size=64)")
                .replace("batch_size=256", "batch_size=16"))
    script = tmp_path / "block.py"
    script.write_text("if __name__ == '__main__':\n" + "".join(f"    {line}\n" for line in code.splitlines()))
    p = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(path, tmp_path):
    p = subprocess.run([sys.executable, str(path)], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert not list(tmp_path.iterdir()), "an example left files behind"
