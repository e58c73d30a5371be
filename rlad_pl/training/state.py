"""What a ``DistillationModule`` checkpoint holds besides Lightning's own entries.

* Weights: the student only. The frozen teacher / reference are loaded again from their names, so their keys are
  dropped from every ``state_dict()`` (a post hook, which also covers sharded checkpoints) and from the checkpoint.
* ``checkpoint["rlad_pl"]``: the training state outside the weights, so that a resumed run continues exactly:
  the counters (``nonfinite/*``), the skipped-step streak (``StepGuard``) and each objective's own state
  (``Objective.state_dict``, e.g. ReNIO's EMA).
"""

from __future__ import annotations

from rlad_pl.core.errors import ConfigError
from rlad_pl.training.step_guard import StepGuard

#: the checkpoint entry of the training state
STATE_KEY = "rlad_pl"
#: submodules whose weights are never checkpointed
FROZEN_PREFIXES = ("teacher.", "teachers.", "reference.")


def drop_frozen_keys(module, state_dict: dict, prefix: str = "", local_metadata=None) -> None:
    """Remove the teacher / reference weights from ``state_dict`` (signature of a ``state_dict`` post hook)."""
    for k in [k for k in state_dict if k.startswith(tuple(prefix + p for p in FROZEN_PREFIXES))]:
        del state_dict[k]


def training_state(counters: dict[str, float], guard: StepGuard, objectives: list) -> dict:
    """The ``checkpoint["rlad_pl"]`` entry: counters, the skipped-step streak, the objectives' own state."""
    return {"counters": dict(counters), **guard.state_dict(), "objectives": [o.state_dict() for o in objectives]}


def load_training_state(state: dict, counters: dict[str, float], guard: StepGuard, objectives: list) -> None:
    """Restore ``training_state``'s entry in place; a checkpoint of another number of objectives is one line."""
    counters.clear()
    counters.update(state.get("counters", {}))
    guard.load_state_dict(state)
    saved = state.get("objectives", [])
    if len(saved) != len(objectives):
        raise ConfigError("ckpt_path", f"the checkpoint holds the state of {len(saved)} objectives, the config "
                          f"has {len(objectives)}")
    for obj, obj_state in zip(objectives, saved):
        obj.load_state_dict(obj_state)


def rng_state() -> dict:
    """Python, NumPy, torch CPU (and CUDA, when initialised) random generator states."""
    import random

    import numpy as np
    import torch

    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    # plain Python / torch values only: Lightning loads checkpoints with torch.load(weights_only=True)
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                    int(has_gauss), float(gauss)), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np
    import torch

    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
