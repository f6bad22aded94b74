"""README.md's examples run as written: its self-contained Python blocks, and the command block
marked ``<!-- tests/test_readme.py runs this block as written -->`` (in a scratch folder holding
a copy of ``examples/``)."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import shutil
from pathlib import Path

import pytest

from moekit.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
MARKER = "<!-- tests/test_readme.py runs this block as written -->"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_the_self_contained_python_blocks_run():
    ran = 0
    for block in _blocks("python"):
        if block.startswith("import"):  # snippets continuing another block start otherwise
            exec(compile(block, "README.md", "exec"), {})
            ran += 1
    assert ran >= 1


def test_the_marked_command_block_runs_as_written(tmp_path, monkeypatch, capsys):
    start = README.index(MARKER)
    block = re.search(r"```bash\n(.*?)```", README[start:], flags=re.S)
    assert block is not None
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    commands = [line.split("  #")[0].strip() for line in block.group(1).splitlines()]
    assert commands and all(c.startswith("moekit ") for c in commands if c)
    for command in filter(None, commands):
        words = shlex.split(command)
        target = None
        if ">" in words:  # stdout into a file, as the shell would
            target = words[words.index(">") + 1]
            words = words[: words.index(">")]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(
                [*words[1:], "--quiet"] if words[1] == "train" and target is None else words[1:]
            )
        assert code == 0, f"{command}: {capsys.readouterr().err}"
        if target is not None:
            Path(target).write_text(out.getvalue())
    assert (tmp_path / "runs" / "x" / "checkpoints" / "step_0000015").is_dir()


@pytest.mark.parametrize("name", ["dense", "moe", "hybrid", "encoder_decoder"])
def test_every_example_config_trains_a_few_steps(tmp_path, name):
    config = ROOT / "examples" / f"{name}.toml"
    args = ["train", "--config", str(config), "--set", "steps=2", "--set", "eval_batches=1"]
    assert main([*args, "--out-dir", str(tmp_path / name), "--quiet"]) == 0
