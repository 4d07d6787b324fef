"""The scoring state file: every tensor's error curve, keyed by all that changes the curves.

A JSON document ``{"format", "key", "tensors"}``. The key holds hashes of the model (header and
sampled tensor bytes), of the importance data the scorer used and the scoring version with its
sampling settings. Each tensor's entry lists the candidate types scored so far (the type llama.cpp
will write, after its width fallback) with their errors: an error does not depend on which other types
were scored with it, so a later run adds the types it needs to the entry without rescoring the others.
A state file whose key differs is reported in one line and rebuilt; it is never trusted. A path that
holds anything but an llqx state file is refused before anything is written (it may be the user's
model), and so is a state path naming the model, the imatrix or the output. Writes are atomic
(temporary file, then rename).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import atomic_path
from .errors import LlqxError

log = logging.getLogger("llqx")

STATE_FORMAT = "llqx-state"


@dataclass
class StreamScore:
    """A residual writer's errors under the stream metric (score_metric.stream_metric), in the order of the
    types scored with them, and per block width of 8-bit activations the rounding's."""

    errors: list[float]
    rounding: dict[str, float] = field(default_factory=dict)


@dataclass
class TensorScore:
    """One tensor's scored candidates: type names and their expected squared output errors (same order),
    and the expected squared output itself (``energy``, the same for every type). ``rounding``: per block
    width of 8-bit activations ("32", "256"), the expected squared output error the rounding of the input
    to them adds (types.GGMLType.act_block: which types' dot products round so); empty without block maxima.
    ``stream_errors`` / ``stream_rounding``: the same under a residual writer's stream metric (None: none)."""

    types: list[str]
    errors: list[float]
    rows: int = 0
    energy: float = 0.0
    rounding: dict[str, float] = field(default_factory=dict)
    stream_errors: list[float] | None = None
    stream_rounding: dict[str, float] = field(default_factory=dict)

    def error_of(self, type_name: str) -> float | None:
        try:
            return self.errors[self.types.index(type_name)]
        except ValueError:
            return None

    def stream_error_of(self, type_name: str) -> float | None:
        if self.stream_errors is None or type_name not in self.types:
            return None
        return self.stream_errors[self.types.index(type_name)]

    def merge(self, types: list[str], errors: list[float], rows: int, energy: float, order: list[str],
              rounding: dict[str, float], stream: StreamScore | None = None) -> None:
        """Add (or replace) the errors of these types; entries are kept in the given candidate order. Stream
        errors are kept only while every type has one (they come from the same imatrix as the others)."""
        found = dict(zip(self.types, self.errors, strict=True))
        found.update(zip(types, errors, strict=True))
        in_stream = dict(zip(self.types, self.stream_errors or [], strict=False)) if self.stream_errors else {}
        if stream is not None:
            in_stream.update(zip(types, stream.errors, strict=True))
            self.stream_rounding.update(stream.rounding)
        rank = {n: i for i, n in enumerate(order)}
        names = sorted(found, key=lambda n: (rank.get(n, len(rank)), n))
        self.types = names
        self.errors = [found[n] for n in names]
        self.stream_errors = [in_stream[n] for n in names] if all(n in in_stream for n in names) else None
        self.rows = rows
        self.energy = energy
        self.rounding.update(rounding)


@dataclass
class ScoreState:
    path: Path | None
    key: dict[str, Any]
    tensors: dict[str, TensorScore] = field(default_factory=dict)
    # measured sensitivities (llqx.sensitivity): per probe key, each group's KL divergence
    probes: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_json(self) -> str:
        doc: dict[str, Any] = {
            "format": STATE_FORMAT,
            "key": self.key,
            "tensors": {
                n: {"types": t.types, "errors": t.errors, "rows": t.rows, "energy": t.energy, "rounding": t.rounding,
                    **({} if t.stream_errors is None else
                       {"stream_errors": t.stream_errors, "stream_rounding": t.stream_rounding})}
                for n, t in self.tensors.items()
            },
        }
        if self.probes:
            doc["probes"] = self.probes
        return json.dumps(doc, indent=0, sort_keys=True)

    def save(self) -> None:
        """Atomic write beside the target; a failure to write is reported, never fatal."""
        if self.path is None:
            return
        try:
            with atomic_path(self.path) as tmp:
                tmp.write_text(self.to_json(), encoding="utf-8")
        except OSError as exc:
            log.warning("cannot write state file %s: %s", self.path, exc)


def _describe_mismatch(found: dict[str, Any], want: dict[str, Any]) -> str:
    what = {
        "model": "another model",
        "imatrix": "another imatrix",
        "scoring": "another scoring version",
        "sampling": "other sampling settings",
    }
    diffs = [what.get(k, k) for k in want if found.get(k) != want.get(k)]
    return ", ".join(diffs) if diffs else "different settings"


# keys of earlier layouts that no longer take part in the match: the candidate list (each entry now
# names the types it holds, so the list it was scored against does not matter)
_RETIRED_KEYS = ("candidates",)
# the parts of the key the stored probes depend on
_PROBE_KEYS = ("model", "imatrix")


def check_state_path(path: Path, others: dict[str, str | os.PathLike[str] | None]) -> None:
    """Refuse a state path that names one of the others (model, imatrix, output: by what they are)."""
    for what, other in others.items():
        if other is None:
            continue
        same = os.path.abspath(path) == os.path.abspath(other)
        if not same and path.exists() and Path(other).exists():
            same = os.path.samefile(path, other)
        if same:
            raise LlqxError(f"the state file {path} is the {what}: give --state-file its own path")


def load_state(path: Path | None, key: dict[str, Any]) -> ScoreState:
    """The state at path if it matches key; otherwise an empty state (reported in one line).

    LlqxError when path exists but is not an llqx state file: llqx never replaces a file it did not write.
    """
    state = ScoreState(path, key)
    if path is None or not path.exists():
        return state
    refuse = f"refusing to use {path} as the state file: it exists and is not an llqx state file"
    if not path.is_file():
        raise LlqxError(refuse)
    try:
        with path.open("rb") as f:
            head = f.read(64)
        if not head.lstrip().startswith(b"{"):
            raise ValueError("not JSON")
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        raise LlqxError(refuse) from None
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
        raise LlqxError(refuse)
    found = doc.get("key")
    tensors = doc.get("tensors")
    if not isinstance(found, dict) or not isinstance(tensors, dict):
        log.warning("state file %s is damaged: rebuilding it", path)
        return state
    found = {k: v for k, v in found.items() if k not in _RETIRED_KEYS}
    if found != key:
        log.warning("state file %s was made for %s: rebuilding it", path, _describe_mismatch(found, key))
        # a probe's KL divergence depends on the model, the imatrix and its own key (the calibration),
        # not on how errors are scored: a new scoring version keeps the forward passes already run
        if all(found.get(k) == key.get(k) for k in _PROBE_KEYS):
            _load_probes(doc, state)
        return state
    for name, t in tensors.items():
        try:
            types = [str(x) for x in t["types"]]
            errors = [float(x) for x in t["errors"]]
            rows = int(t.get("rows", 0))
            energy = float(t.get("energy", 0.0))
            rounding = {str(k): float(v) for k, v in t.get("rounding", {}).items()}
            stream = None if "stream_errors" not in t else [float(x) for x in t["stream_errors"]]
            stream_rounding = {str(k): float(v) for k, v in t.get("stream_rounding", {}).items()}
        except (KeyError, TypeError, ValueError):
            log.warning("state file %s has a damaged entry for %s: rescoring it", path, name)
            continue
        if (
            len(types) != len(errors)
            or (stream is not None and len(stream) != len(types))
            or len(set(types)) != len(types)
            or not all(e == e and e >= 0.0 for e in [*errors, energy, *rounding.values(), *(stream or []),
                                                      *stream_rounding.values()])
        ):
            log.warning("state file %s has a damaged entry for %s: rescoring it", path, name)
            continue
        state.tensors[str(name)] = TensorScore(types, errors, rows, energy, rounding, stream, stream_rounding)
    _load_probes(doc, state)
    return state


def _load_probes(doc: dict[str, Any], state: ScoreState) -> None:
    probes = doc.get("probes", {})
    for pkey, groups in probes.items() if isinstance(probes, dict) else ():
        try:
            klds = {str(g): float(v) for g, v in groups.items()}
        except (AttributeError, TypeError, ValueError):
            continue
        if all(v == v and v >= 0.0 for v in klds.values()):
            state.probes[str(pkey)] = klds
