"""Error curves, the planner's input: per tensor, its candidate types with their bytes and scored error,
and the interface through which the planner asks the scorer for curves it lacks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class TensorCurve:
    """Candidate types of one tensor with the bytes the writer will produce and their scored error."""

    name: str
    n_elements: int
    types: list[int]
    nbytes: list[int]
    errors: list[float]
    # per type, in the same unit: the error the 8-bit rounding of its input in ggml's dot product adds (a
    # written file has it, an in-memory probe does not); empty: none known
    rounding: list[float] = field(default_factory=list)
    # per type, the same two in the tensor's local unit (estimator.local_error_divisors: a writer's stream
    # errors where it has them), the unit measured sensitivities price; empty: none known (0)
    local: list[float] = field(default_factory=list)
    local_rounding: list[float] = field(default_factory=list)

    def total(self, i: int) -> float:
        """The i-th type's error as a written file has it: the weights' error plus the input's rounding."""
        return self.errors[i] + (self.rounding[i] if self.rounding else 0.0)

    def local_total(self, i: int) -> float:
        """total() in the local unit; 0 when unknown."""
        if not self.local:
            return 0.0
        return self.local[i] + (self.local_rounding[i] if self.local_rounding else 0.0)


class CurveSource(Protocol):
    """Scores (tensor, type) pairs on demand (the scorer): what the planner may ask for."""

    def ensure(self, need: dict[str, list[int]]) -> None:
        """Score whatever of ``need`` (tensor name -> candidate type ids) is not scored yet."""

    def curves(self) -> dict[str, TensorCurve]:
        """Every tensor's scored candidates, cheapest first, errors in the estimator's unit."""
