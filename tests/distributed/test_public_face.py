"""Issue 31: one data-parallel API in ``moekit.distributed``'s public face (the mesh); the older
DDP helpers moved to ``moekit.distributed.ddp``, still importable with a warning."""

import pytest

import moekit.distributed as distributed
from moekit.distributed import ddp, mesh


def test_the_public_face_is_the_mesh():
    assert distributed.parallelize is mesh.parallelize
    assert distributed.ParallelConfig is mesh.ParallelConfig
    assert not {"wrap_data_parallel", "parallelize_experts"} & set(distributed.__all__)


@pytest.mark.parametrize("name", ["wrap_data_parallel", "parallelize_experts", "full_state_dict"])
def test_the_older_helpers_warn_and_still_work(name):
    with pytest.warns(DeprecationWarning, match=rf"moekit\.distributed\.{name} moved"):
        helper = getattr(distributed, name)
    assert helper is getattr(ddp, name)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        distributed.nope  # noqa: B018
