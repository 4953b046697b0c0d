"""What the framework resume workers record of each run, for the tests to compare."""

from __future__ import annotations

from typing import Any


def resume_record(model: Any, state: Any, seen: list[Any]) -> dict[str, Any]:
    """The parameters, the hook's step counter and stats, and the commhooks warnings the run
    raised (``warnings.catch_warnings(record=True)``)."""
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "iteration": state.iteration,
        "stats": state.stats(),
        "warnings": [str(w.message) for w in seen if "commhooks" in str(w.message)],
    }
