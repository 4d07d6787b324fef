"""Target mode as a library step: a QuantizeRequest with --target-bpw/--target-size/--budget checked in
full, then scored, planned and written. Every check that needs no scores runs before scoring (paths,
output, state file, imatrix, requantize, the target and every --budget against the range achievable
under the pins, bounds and ties), so a bad command fails in seconds, not after an hour of scoring. The
CLI (llqx.cli.target) only prints.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import _core
from .errors import LlqxError
from .imatrix import Imatrix
from .imatrix_select import check_imatrix_fits
from .llama_rules import quantizable_tensors
from .plan import Plan
from .planner import Scores
from .probe import Calibration, check_full_precision
from .quantize import PLAN_BASE_FTYPE, check_paths, quantize
from .request import QuantizeRequest
from .scoring import score
from .sensitivity import GroupSensitivity, calibrate
from .state import check_state_path
from .types import ggml_type
from .verify import Verdict, verify

# llama-quantize options that target mode cannot honour, and why (one line each)
_REFUSED = {
    "pure": "--pure asks for one type everywhere, a target for the mix that fits",
    "include_weights": "--include-weights: the scorer weighs every tensor with the imatrix, so the "
    "writer must use it for every tensor too",
    "exclude_weights": "--exclude-weights: the scorer weighs every tensor with the imatrix, so the "
    "writer must use it for every tensor too",
    "prune_layers": "--prune-layers is not planned in target mode yet: prune first "
    "(llqx-quantize --prune-layers L F16), then give the pruned model a target",
    "keep_split": "--keep-split: llqx reads single-file models only, so there are no shards to keep",
}


def refuse_unsupported(req: QuantizeRequest) -> None:
    given = {
        "pure": req.pure,
        "include_weights": bool(req.include_weights),
        "exclude_weights": bool(req.exclude_weights),
        "prune_layers": bool(req.prune_layers),
        "keep_split": req.keep_split,
    }
    for key, on in given.items():
        if on:
            raise LlqxError(f"not with --target-bpw/--target-size: {_REFUSED[key]}")


def check_request(req: QuantizeRequest) -> None:
    """The checks on the request itself: one target, an imatrix, no option target mode cannot honour."""
    if req.target_bpw is not None and req.target_size is not None:
        raise LlqxError("--target-bpw and --target-size cannot be used together")
    if not req.target_mode:
        raise LlqxError("give --target-bpw, --target-size or --budget")
    refuse_unsupported(req)
    if not req.imatrix:
        raise LlqxError(
            "--target-bpw/--target-size need an importance matrix (--imatrix FILE, e.g. from "
            "`llqx imatrix`): the error of each candidate type is weighted by how much each input "
            "channel matters, and the low-bit IQ types cannot be written without one"
        )
    if not Path(req.input).is_file():
        raise LlqxError(f"input model not found: {req.input}")
    if req.verify and req.calibration_file is None:
        raise LlqxError("--verify measures on calibration text: give --calibration-file FILE")
    if req.verify and (req.budgets or req.ties or req.min_types or req.max_types):
        raise LlqxError("--verify compares with a llama.cpp recipe, which has no --budget, --tie, --min-type "
                        "or --max-type: leave those out or --verify")
    cal = calibration_of(req)
    if cal is not None:
        cal.check()


def calibration_of(req: QuantizeRequest) -> Calibration | None:
    """The calibration text of the measured steps (sensitivities, --verify), if one was given."""
    if req.calibration_file is None:
        return None
    return Calibration(Path(req.calibration_file), chunks=req.calibration_chunks, threads=req.nthread)


def prepare(req: QuantizeRequest, im: Imatrix) -> Scores:
    """Every check that needs no scores, then the scorer ready to run (nothing scored yet)."""
    inp = Path(req.input)
    out = None if req.dry_run or req.output is None else Path(req.output)
    # with no output named, the file goes beside the input (its name comes from the plan's bpw)
    info = check_paths(inp, out if out is not None else inp.with_name(inp.name + ".llqx-probe"))
    if not req.allow_requantize:
        quantized = [t for t in quantizable_tensors(info) if ggml_type(t.type).is_quantized]
        if quantized:
            raise LlqxError(
                f"{inp} is already quantized ({quantized[0].name} is {quantized[0].type_name}): requantizing "
                "loses quality; pass --allow-requantize to do it anyway"
            )
    label = os.fspath(req.imatrix)
    if not im.legacy and not im.has_metadata:
        raise LlqxError(f"missing imatrix metadata (datasets, chunk_count, chunk_size) in {label}")
    check_imatrix_fits(im, info, label)
    state = None if req.state_file is None else Path(req.state_file)
    if state is not None:
        check_state_path(state, {"model": inp, "imatrix": req.imatrix, "output": out})
    scores = score(
        inp, im, imatrix_label=label, state=state, nthread=req.nthread, sample_elements=req.score_elements,
        progress=not (req.quiet or req.json), candidates=req.candidates, defer=True, sketch=req.score_sketch,
    )
    scores.set_metadata(req.override_kv, PLAN_BASE_FTYPE if req.ftype is None else req.ftype.ftype)
    scores.check_target(req.target_bpw, req.target_size, **pins_of(req))
    if req.calibration_file is not None:
        check_full_precision(info, list(scores.candidates))
    return scores


def pins_of(req: QuantizeRequest) -> dict[str, Any]:
    """The plan's options besides the target (Scores.plan / check_target): pins, budgets, ties, bounds."""
    return {**writer_pins(req), "budgets": req.budgets, "ties": req.ties, "min_types": req.min_types,
            "max_types": req.max_types}


@dataclass
class TargetResult:
    """The plan to write, and what the measured steps found (empty without --calibration-file)."""

    plan: Plan
    sensitivities: list[GroupSensitivity] = field(default_factory=list)
    verdict: Verdict | None = None


def plan_target(
    req: QuantizeRequest, scores: Scores, imatrix: Imatrix | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> TargetResult:
    """Score what is missing (all candidates, or the window's first ones), measure the groups' sensitivities when
    there is calibration text (or take those the imatrix file carries), plan, --verify; frees grids the mix
    does not use."""
    if req.candidates == "all":
        scores.score_all()
    else:
        scores.score_window(req.target_bpw, req.target_size, **pins_of(req))
    cal = calibration_of(req)
    # measured on the calibration text, or as the imatrix pass measured them (nothing to run)
    sens = calibrate(scores, imatrix, cal, _step(on_progress, "measuring"))
    plan = scores.plan(target_bpw=req.target_bpw, target_size=req.target_size, **pins_of(req))
    verdict = None
    if req.verify and cal is not None:
        plan, verdict = verify(scores, plan, imatrix, cal, writer_pins(req), _step(on_progress, "verifying"))
    if not any(ggml_type(t).has_grid for _, t in plan.overrides()):
        # scoring built the IQ lookup grids (~6 MB); this mix needs none, so the writer's peak need not carry them
        _core.quantize_free()
    return TargetResult(plan, sens, verdict)


def _step(on_progress: Callable[[str, int, int], None] | None, what: str) -> Callable[[int, int], None] | None:
    return None if on_progress is None else (lambda done, total: on_progress(what, done, total))


def writer_pins(req: QuantizeRequest) -> dict[str, Any]:
    """The pins as quantize() takes them (a recipe's dry run applies them as llama-quantize would)."""
    return {
        "tensor_types": req.tensor_types,
        "output_tensor_type": req.output_tensor_type,
        "token_embedding_type": req.token_embedding_type,
        "leave_output_tensor": req.leave_output_tensor,
    }


def default_output(inp: Path, plan: Plan) -> Path:
    return inp.with_name(f"{inp.stem}-{plan.bpw:.2f}bpw.gguf")


def write_target(req: QuantizeRequest, plan: Plan, imatrix: Imatrix) -> Path:
    """Write the plan with every writer option of the request; the file is checked against the plan."""
    inp = Path(req.input)
    out = Path(req.output) if req.output else default_output(inp, plan)
    override_kv = list(req.override_kv)
    if req.ftype is not None:
        override_kv.append(f"general.file_type=int:{req.ftype.ftype}")
    quantize(
        inp, out, nthread=req.nthread, imatrix=imatrix, plan=plan, override_kv=override_kv,
        allow_requantize=req.allow_requantize, max_buffer_size_mib=req.max_buffer_size,
    )
    return out
