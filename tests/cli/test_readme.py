"""The README's "Try it" command lines work as written, on the bundled models, with no warning from quantduo's own
code."""
from __future__ import annotations

import os
import shlex
import warnings
from pathlib import Path

import pytest

from quantduo.cli import main

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "quantduo"

pytestmark = pytest.mark.usefixtures("single_thread")


def try_it_commands() -> list[list[str]]:
    """The ``quantduo ...`` lines of the first bash block under "## Try it" in README.md."""
    section = (ROOT / "README.md").read_text().split("\n## Try it\n", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line) for line in block.splitlines() if line.strip()]


def test_try_it_runs_as_written_without_warnings(tmp_path, monkeypatch):
    """Run each line in a fresh folder that sees the repository's ``quantduo/`` (so relative paths are the README's):
    each exits 0, and no warning is raised from a file inside quantduo/."""
    (tmp_path / "quantduo").symlink_to(PACKAGE)
    monkeypatch.chdir(tmp_path)
    commands = try_it_commands()
    assert len(commands) == 7 and all(argv[0] == "quantduo" for argv in commands)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for argv in commands:
            assert main(argv[1:]) == 0, argv
    ours = [f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}" for w in caught
            if os.path.realpath(w.filename).startswith(str(PACKAGE))]
    assert ours == []
    assert (tmp_path / "out" / "try" / "dog.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "out" / "try" / "duo-scored" / "full_attention_heads.tsv").is_file()
