"""Files and folders moekit writes take the user's umask (issue 30): ``tempfile`` makes them
0600 / 0700, which a shared checkpoint folder must not be."""

from __future__ import annotations

import os
import stat

import pytest

from moekit.utils.serialization import atomic_write_bytes, write_folder_atomically


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_files_and_folders_follow_the_umask(tmp_path, umask_022):
    atomic_write_bytes(tmp_path / "report.json", b"{}")
    assert _mode(tmp_path / "report.json") == 0o644

    def write(folder):
        (folder / "weights.safetensors").write_bytes(b"x")

    folder = write_folder_atomically(tmp_path / "checkpoint", write)
    assert _mode(folder) == 0o755
    assert _mode(folder / "weights.safetensors") == 0o644
    os.umask(0o077)
    atomic_write_bytes(tmp_path / "private.json", b"{}")
    assert _mode(tmp_path / "private.json") == 0o600


def test_a_trained_run_is_readable_by_the_group(tmp_path, tiny_text, umask_022):
    from moekit.training import load_train_config, train
    from tests.builders import TINY_MOE

    out = tmp_path / "run"
    config = load_train_config(
        None, [*TINY_MOE, "steps=2", "eval_every=2", f"data.path={tiny_text}", f"out_dir={out}"]
    )
    train(config, progress=False)
    for path in [out, *out.rglob("*")]:
        if path.is_symlink():
            continue
        want = 0o755 if path.is_dir() else 0o644
        assert _mode(path) == want, path
