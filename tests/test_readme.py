"""The README's core-library example runs as written (on a tiny model in place of a real one)."""

import math
import re
from pathlib import Path

from tiny_mllms import build_llava, random_image

README = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file()) / "README.md"


def test_core_api_example_runs(tmp_path, capsys):
    text = README.read_text()
    block = text.split("## The core library (no Prefect)", 1)[1]
    code = re.search(r"```python\n(.*?)```", block, re.S).group(1)
    model = build_llava(tmp_path / "model")
    code = code.replace('"path/or/hub-id"', repr(str(model))).replace("steps=2000", "steps=50")
    env = {"images": [random_image(i) for i in range(4)], "prompts": ["what colour is the circle ?"] * 4}
    exec(compile(code, "README.md", "exec"), env)
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert math.isfinite(float(printed))
    assert env["weights"].weights.shape == (env["sae"].cfg.d_sae,)
