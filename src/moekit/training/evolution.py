"""Evolutionary training for the MoE language model: a CMA-ES search over router configurations.

The seeds' table of training methods lists *evolutionary* training: a population of candidate
models, the fittest kept. For an LM, evolving the weights themselves is hopeless at any useful
size, so moekit evolves what a gradient cannot reach: the discrete router configuration (experts
per token, number of experts, capacity factor, gating, ... any config key). Each candidate is a
short training run from the same seed on the same data; its fitness is the validation loss at
the end. The search is CMA-ES (Hansen & Ostermeier 2001, through the ``cma`` package) over one
continuous coordinate per key, rounded down to an index into that key's choices; candidates
already trained are looked up, not retrained, so ``budget`` counts distinct short runs. The
winner is then trained for the full ``steps`` in the run folder. When the search converges
before the budget is spent it restarts with a doubled population (IPOP-CMA-ES).

``moekit train --set method=evolutionary --set evolution.budget=8 \\
    --set 'evolution.space=["model.moe.layer.top_k=1,2", "model.moe.layer.num_experts=4,8,16"]'``

Every trial is appended to ``<out_dir>/evolution/trials.jsonl`` as it finishes; ``--resume``
reads it back, so an interrupted search does not retrain finished candidates.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moekit.training.checkpoint import refuse_to_overwrite
from moekit.training.config import TrainConfig, apply_overrides
from moekit.training.loop import TrainResult, train
from moekit.training.methods import TrainingMethod
from moekit.utils.serialization import atomic_write_json, config_from_dict, config_to_dict
from moekit.utils.validation import ConfigError


@dataclass
class Trial:
    """One candidate: its choices (``{"model.moe.layer.top_k": 2}``) and how it did."""

    choices: dict[str, Any]
    val_loss: float  # inf for a configuration that cannot be built
    seconds: float
    error: str | None = None


@dataclass
class SearchResult:
    """Every trial in the order they ran, and the best."""

    trials: list[Trial] = field(default_factory=list)

    @property
    def best(self) -> Trial:
        valid = [t for t in self.trials if math.isfinite(t.val_loss)]
        if not valid:
            errors = sorted({t.error or "" for t in self.trials})
            raise ValueError(
                "no candidate configuration of evolution.space could be built: "
                + "; ".join(errors[:3])
            )
        return min(valid, key=lambda t: t.val_loss)


def candidate_config(config: TrainConfig, choices: dict[str, Any], **run: Any) -> TrainConfig:
    """``config`` with ``choices`` applied (dotted keys, as ``--set`` takes them) and the run
    options ``run`` (``steps``, ``out_dir``, ...); trains jointly."""
    data = copy.deepcopy(config_to_dict(config))
    apply_overrides(data, [f"{key}={json.dumps(value)}" for key, value in choices.items()])
    data.update(run, method=TrainingMethod.JOINT.value)
    return config_from_dict(TrainConfig, data)


def _read_trials(path: Path) -> dict[str, Trial]:
    trials: dict[str, Trial] = {}
    if not path.exists():
        return trials
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a torn last line of a killed run
            continue
        trial = Trial(**record)
        trials[json.dumps(trial.choices, sort_keys=True)] = trial
    return trials


def search_router_config(
    config: TrainConfig, *, resume: bool = False, progress: bool = False
) -> SearchResult:
    """CMA-ES over ``config.evolution.space``: at most ``budget`` distinct short runs of
    ``evolution.steps`` steps each (fewer when the space is smaller); returns every trial."""
    import cma  # noqa: PLC0415 (optional: cma)

    evolution = config.evolution
    space = evolution.choices()
    keys = list(space)
    sizes = [len(space[k]) for k in keys]
    budget = min(evolution.budget, math.prod(sizes))
    folder = Path(config.out_dir) / "evolution"
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / "trials.jsonl"
    if not resume:
        log_path.unlink(missing_ok=True)
    known = _read_trials(log_path)
    result = SearchResult(trials=list(known.values()))

    def evaluate(choices: dict[str, Any]) -> Trial:
        key = json.dumps(choices, sort_keys=True)
        if key in known:
            return known[key]
        start = time.perf_counter()
        try:
            candidate = candidate_config(
                config,
                choices,
                steps=evolution.steps,
                eval_every=evolution.steps,
                checkpoint_every=0,
                out_dir=str(folder / f"trial_{len(known)}"),
            )
        except (ConfigError, ValueError) as error:  # e.g. top_k > num_experts
            trial = Trial(choices, math.inf, 0.0, error=str(error))
        else:
            run = train(candidate, progress=progress, desc=f"trial {len(known) + 1}/{budget}")
            trial = Trial(choices, run.final_val_loss, time.perf_counter() - start)
        known[key] = trial
        result.trials.append(trial)
        with open(log_path, "a") as f:
            f.write(json.dumps(trial.__dict__) + "\n")
        return trial

    trained = sum(t.error is None for t in known.values())
    total = math.prod(sizes)
    # CMA-ES needs >= 2 coordinates; a constant extra one stands in for a 1-key space
    dims = max(2, len(keys))
    bounds = [*sizes, *[1] * (dims - len(keys))]
    # IPOP restarts (Auger & Hansen 2005): when a run stops proposing untried candidates (it has
    # converged), start again with twice the population, until the budget or the space is spent
    for restart in range(8):
        if trained >= budget or len(known) >= total:
            break
        es = cma.CMAEvolutionStrategy(
            [b / 2 for b in bounds],
            0.5,
            {
                "bounds": [[0] * dims, bounds],
                "CMA_stds": [b / 2 for b in bounds],
                "popsize": evolution.population * 2**restart,
                "seed": config.seed + 1 + restart,
                "verbose": -9,
            },
        )
        stale = 0  # generations in a row that proposed nothing untried
        while trained < budget and stale < 5:
            solutions, fitness, new = es.ask(), [], 0
            for x in solutions:
                choices = {
                    key: space[key][min(int(x[i]), sizes[i] - 1)] for i, key in enumerate(keys)
                }
                fresh = json.dumps(choices, sort_keys=True) not in known
                if fresh and trained >= budget:
                    break
                trial = evaluate(choices)
                if fresh:
                    new += 1
                    trained += trial.error is None
                fitness.append(trial.val_loss if math.isfinite(trial.val_loss) else 1e30)
            if len(fitness) < len(solutions):  # the budget ran out mid-generation
                break
            es.tell(solutions, fitness)
            stale = 0 if new else stale + 1
    return result


def train_evolved(
    config: TrainConfig, *, resume: bool = False, progress: bool = True, desc: str = "train"
) -> TrainResult:
    """``method='evolutionary'``: search, then train the best configuration for ``steps`` steps
    in ``out_dir`` (the search summary is ``<out_dir>/evolution/summary.json``)."""
    if not resume:
        refuse_to_overwrite(Path(config.out_dir) / "checkpoints")
    search = search_router_config(config, resume=resume, progress=progress)
    best = search.best
    folder = Path(config.out_dir) / "evolution"
    atomic_write_json(
        folder / "summary.json",
        {
            "budget": config.evolution.budget,
            "steps_per_trial": config.evolution.steps,
            "best": best.__dict__,
            "trials": [t.__dict__ for t in search.trials],
        },
    )
    winner = candidate_config(config, best.choices)
    result = train(winner, resume=resume, progress=progress, desc=desc)
    result.search = search
    return result


def train_any(config: TrainConfig, **options: Any) -> TrainResult:
    """``train_evolved`` for ``method='evolutionary'`` (a search that calls ``train`` per
    candidate), else ``train``; what ``moekit train`` and ``moekit finetune`` run."""
    if config.method is TrainingMethod.EVOLUTIONARY:
        return train_evolved(config, **options)
    return train(config, **options)
