import pytest

TINY = [
    "steps=12",
    "eval_every=6",
    "eval_batches=2",
    "log_every=1",
    "data.seq_len=32",
    "data.batch_size=4",
    "model.d_model=32",
    "model.n_layers=2",
    "model.ffn_hidden=64",
    "model.max_seq_len=64",
    "optim.warmup_steps=2",
]
TINY_MOE = [
    *TINY,
    "model.moe.num_experts=4",
    "model.moe.expert_hidden=32",
    "model.moe.top_k=2",
]


@pytest.fixture
def tiny_text(tmp_path):
    """A small corpus of real text: a few standard-library modules copied to a folder."""
    from moekit.training.data import standard_library_files

    folder = tmp_path / "corpus"
    folder.mkdir()
    for path in standard_library_files()[:6]:
        (folder / path.name).write_text(path.read_text(encoding="utf-8", errors="replace"))
    return folder
