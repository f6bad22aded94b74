"""The dispatch modes and drop priorities (``DispatchConfig``, which uses them, sits beside the
``Dispatcher`` it builds in ``dispatcher.py``)."""

from __future__ import annotations

from enum import Enum


class DispatchMode(str, Enum):
    """Dropless (every assignment computed) or capacity (at most C per expert, rest dropped)."""

    DROPLESS = "dropless"  # every assignment computed (MegaBlocks-style, sort + grouped GEMM)
    CAPACITY = "capacity"  # each expert takes at most C assignments; the rest are dropped


class DropPriority(str, Enum):
    """Which assignments an over-full expert keeps.

    ``probability``: the highest combine weights first (batch-prioritised routing, Riquelme et
    al. 2021). ``position``: every token's first choice before any second choice, and within a
    choice rank earlier tokens first (GShard / Switch Transformer). ``token``: position by
    position across the batch (every sequence's position 0, then every position 1, ...), a
    token's choices in order; the only order in which whether a token is kept never depends on
    later positions, so it is the one a causal model may use.
    """

    PROBABILITY = "probability"
    POSITION = "position"
    TOKEN = "token"


class CapacityScope(str, Enum):
    """Over which tokens an expert's capacity C is counted.

    ``batch``: one C per expert for the whole call (every sequence of the micro-batch competes).
    ``sequence``: one C per expert *per sequence* (each sequence is its own group, as in the
    Switch Transformer's T5X/Mesh TensorFlow code and Hugging Face's ``switch_transformers``).
    """

    BATCH = "batch"
    SEQUENCE = "sequence"
