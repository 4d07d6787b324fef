"""The scoring pass (docs/method.md, scoring): per quantizable tensor, the error of every candidate type.

``score(model, imatrix)`` streams the model through the C++ scorer (sampled rows, quantized with each
expert's importance values, weighted error with the mean-activation term) and returns ``Scores``,
whose ``plan(target_bpw=... | target_size=...)`` runs the optimizer. With ``candidates="window"``
nothing is scored up front: each plan() scores what its target needs, and the IQ1/IQ2/IQ3 types (whose
lattice grids take seconds to build) only when the target comes near them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cache
from pathlib import Path

import numpy as np

from . import _core
from .errors import LlqxError
from .imatrix import Imatrix
from .model import ModelInfo, TensorInfo, inspect
from .optimizer import allocate
from .plan import Plan, PlanTensor, padded
from .quantize import check_imatrix_fits, imatrix_kv_overrides, select_imatrix
from .request import CANDIDATE_MODES
from .state import ScoreState, TensorScore, check_state_path, load_state
from .types import ggml_type, ggml_types

log = logging.getLogger("llqx")

# docs/method.md, candidates; the 16-bit candidate is F16, or BF16 for a BF16 source
CANDIDATES = (
    "IQ1_S",
    "IQ1_M",
    "IQ2_XXS",
    "IQ2_XS",
    "IQ2_S",
    "IQ3_XXS",
    "IQ3_S",
    "Q2_K",
    "Q3_K",
    "IQ4_XS",
    "IQ4_NL",
    "Q4_0",
    "Q4_1",
    "Q4_K",
    "Q5_0",
    "Q5_1",
    "Q5_K",
    "Q6_K",
    "Q8_0",
    "F16",
)
SCORING_VERSION = 2
# window mode: plan over every type but the grid types more than this many bpw below the mean bpw the
# free tensors can spend; then, per tensor, add the next grid type down while the pick is the cheapest
# type above the grid types left out (plans equal the full candidate set's on the test models and on
# Qwen2.5-Coder-1.5B over their whole bpw range)
WINDOW_BPW = 2.0
# sampled elements per tensor (split over its experts): a 1/32 slice, at least 32 K, at most 256 K elements;
# the estimate is a per-row mean, so it needs rows from all over the tensor more than many rows
SAMPLE_FRACTION = 1 / 32
SAMPLE_FLOOR = 1 << 15
SAMPLE_CAP = 1 << 18
MIN_ROWS = 16  # per expert slice (all rows when it has fewer)

# tensor_type_fallback in llama-quant.cpp (b11312)
_FALLBACK = {
    **dict.fromkeys(("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS"), "IQ4_NL"),
    **dict.fromkeys(("Q2_0", "Q2_K", "Q3_K", "TQ1_0", "TQ2_0"), "Q4_0"),
    "Q4_K": "Q5_0",
    "Q5_K": "Q5_1",
    "Q6_K": "Q8_0",
}

# tensor_allows_quantization in llama-quant.cpp (b11312): substrings that keep a tensor as it is
_KEEP_SUBSTRINGS = (
    "_norm.weight",
    "ffn_gate_inp.weight",
    "ffn_gate_tid2eid.weight",
    "altup",
    "laurel",
    "per_layer_model_proj",
    "ssm_conv1d",
    "shortconv.conv.weight",
    "indexer.k_proj.weight",
    "indexer.q_proj.weight",
    "time_mix_first.weight",
    "time_mix_w0.weight",
    "time_mix_w1.weight",
    "time_mix_w2.weight",
    "time_mix_v0.weight",
    "time_mix_v1.weight",
    "time_mix_v2.weight",
    "time_mix_a0.weight",
    "time_mix_a1.weight",
    "time_mix_a2.weight",
    "time_mix_g1.weight",
    "time_mix_g2.weight",
    "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight",
    "attn_rel_b.weight",
    ".position_embd",
    "sam.pos_embd",
    "sam.neck.",
    "sam.net_",
    ".rel_pos",
    ".patch_embd",
    ".patch_merger",
    "a.rvq.codebook",
    "mm.a.code_embd",
)
_KEEP_GLM5_NEXT = (
    "hc_",
    "indexer.attn_q_b",
    "indexer.attn_k",
    "indexer.proj",
    "indexer_compressor_gate",
    "indexer_compressor_ape",
    "ssm_f_a.weight",
    "ssm_f_b.weight",
    "ssm_g_a.weight",
    "ssm_g_b.weight",
    "ssm_beta.weight",
    "attn_kv_a_mqa.weight",
    "attn_k_b.weight",
    "attn_v_b.weight",
)
_TOKEN_EMBD = ("token_embd.weight", "per_layer_token_embd.weight")


def tensor_is_quantizable(name: str, n_dims: int, arch: str) -> bool:
    """Whether llama_model_quantize would quantize this tensor (else it keeps its type)."""
    if n_dims < 2 or not name.endswith("weight"):
        return False
    if any(s in name for s in _KEEP_SUBSTRINGS):
        return False
    if name in ("position_embd.weight", "token_types.weight"):
        return False
    return not (arch == "glm5-next" and any(s in name for s in _KEEP_GLM5_NEXT))


def fallback_type(type_id: int, ne0: int) -> int:
    """The type llama.cpp actually writes when a row of ne0 elements does not fit the type's blocks."""
    t = ggml_type(type_id)
    if ne0 % t.block_size == 0:
        return type_id
    if t.name.upper() in _FALLBACK:
        r = ggml_type(_FALLBACK[t.name.upper()])
    elif t.block_size <= 32:
        r = t
    else:
        raise LlqxError(f"no tensor type fallback is defined for type {t.name.upper()}")
    if ne0 % r.block_size != 0:
        return ggml_type("F16").id
    return r.id


def needs_imatrix(name: str, type_id: int) -> bool:
    """llama.cpp refuses these without importance data (tensor_requires_imatrix; ggml's list is a subset)."""
    t = ggml_type(type_id)
    if name in _TOKEN_EMBD or name == "output.weight":
        return t.name.upper() in ("IQ2_XXS", "IQ2_XS", "IQ1_S")  # ggml_quantize_requires_imatrix
    return t.requires_imatrix


def _shape3(t: TensorInfo) -> tuple[int, int, int]:
    s = [*list(t.shape), 1, 1, 1]
    return s[0], s[1], s[2] * s[3]


@cache
def _lazy_ids() -> frozenset[int]:
    """The types with a lookup grid (ggml_quantize_init: up to seconds each), also the slowest to score:
    window mode scores them only for targets near them."""
    return frozenset(t.id for t in ggml_types().values() if t.has_grid)


def tensor_nbytes(type_id: int, t: TensorInfo) -> int:
    return int(_core.row_size(type_id, t.n_per_row)) * t.n_rows


def tensor_candidates(t: TensorInfo, has_weights: bool) -> list[int]:
    """Candidate types after the writer's width fallback, de-duplicated, cheapest first."""
    src = ggml_type(t.type).name.upper()
    names = [n if n != "F16" or src != "BF16" else "BF16" for n in CANDIDATES]
    out: list[int] = []
    for n in names:
        tid = fallback_type(ggml_type(n).id, t.n_per_row)
        if tid in out or (not has_weights and needs_imatrix(t.name, tid)):
            continue
        out.append(tid)
    return sorted(out, key=lambda tid: (tensor_nbytes(tid, t), tid))


@dataclass
class TensorCurve:
    """Candidate types of one tensor with the bytes the writer will produce and their scored error."""

    name: str
    n_elements: int
    types: list[int]
    nbytes: list[int]
    errors: list[float]


def _model_hash(info: ModelInfo) -> str:
    """Header bytes plus a few sampled blocks of every tensor's data: cheap, and changes with the data."""
    h = hashlib.sha256()
    h.update(str(info.file_size).encode())
    with open(info.path, "rb") as f:
        h.update(f.read(info.data_offset))
        for t in info.tensors:
            for pos in sorted({0, t.nbytes // 2, max(0, t.nbytes - 4096)}):
                f.seek(t.offset + pos)
                h.update(f.read(min(4096, t.nbytes - pos)))
    return h.hexdigest()


def _importance(im: Imatrix | None, t: TensorInfo) -> tuple[np.ndarray | None, np.ndarray | None]:
    if im is None or t.name not in im.entries or im.entries[t.name].in_sum2.size != t.shape[0] * _shape3(t)[2]:
        return None, None  # no entry, or a token-embedding entry of another width (llama.cpp ignores it too)
    w = np.ascontiguousarray(im.values(t.name).reshape(-1), dtype=np.float32)
    a = im.activations(t.name)
    return w, (None if a is None else np.ascontiguousarray(a.reshape(-1), dtype=np.float32))


def _imatrix_hash(im: Imatrix | None, tensors: Sequence[TensorInfo]) -> str:
    h = hashlib.sha256()
    if im is None:
        return "none"
    for t in tensors:
        w, a = _importance(im, t)
        h.update(t.name.encode() + b"\0")
        h.update(b"w" if w is not None else b"-")
        if w is not None:
            h.update(w.tobytes())
        h.update(b"a" if a is not None else b"-")
        if a is not None:
            h.update(a.tobytes())
    return h.hexdigest()


def _expert_weights(im: Imatrix | None, name: str, n_expert: int) -> np.ndarray:
    """Share of the tokens each expert slice sees (imatrix counts), uniform without them."""
    if im is not None and name in im.entries and n_expert > 1:
        c = np.asarray(im.entries[name].counts, dtype=np.float64).reshape(-1)
        if c.size == n_expert and c.sum() > 0:
            return c / c.sum()
    return np.full(n_expert, 1.0 / n_expert)


def _combine_experts(values: np.ndarray, n_cand: int, weights: np.ndarray) -> tuple[list[float], float]:
    """The scorer's per-slice sums (see llqx_score.h) as one expected error per candidate, and energy."""
    v = np.asarray(values, dtype=np.float64).reshape(n_cand + 1, weights.size)
    per = v @ weights
    return [float(x) for x in per[:n_cand]], float(per[n_cand])


_LAYER_TENSOR = re.compile(r"^(blk\.(\d+)\.)(attn|ffn)_(\w+?)\.weight$")


def _writer_of(name: str, names: set[str]) -> str | None:
    """The tensor that writes the result of the block this tensor feeds into the residual stream:
    attn_q/k/v → attn_output, ffn_gate/up(_exps|_shexp) → ffn_down(_exps|_shexp); None for writers
    and tensors outside that pattern."""
    m = _LAYER_TENSOR.match(name)
    if m is None:
        return None
    prefix, _, block, rest = m.groups()
    if block == "attn":
        w = prefix + "attn_output.weight"
        return w if rest != "output" and w in names else None
    if rest.startswith("down"):
        return None
    for suffix in ("_exps", "_shexp", "_chexp"):
        if rest.endswith(suffix) and prefix + "ffn_down" + suffix + ".weight" in names:
            return prefix + "ffn_down" + suffix + ".weight"
    w = prefix + "ffn_down.weight"
    return w if w in names else None


# How much of a relative change in a block's input reappears as a relative change in what the block
# writes. Chosen on Qwen2.5-Coder-1.5B: with it the summed error of the 18 files of an earlier benchmark
# run (recipes and llqx plans without propagation) predicts their measured KL divergence with r = 0.99
# on log scale (1.0: 0.97; no propagation: 0.82); on the files of the run planned with it, 0.95.
PROPAGATION = 0.8


def _sublayer(name: str) -> tuple[int, int] | None:
    """(layer, 0 for attention / 1 for the feed-forward block) of a tensor inside a layer."""
    m = _LAYER_TENSOR.match(name)
    return None if m is None else (int(m.group(2)), 0 if m.group(3) == "attn" else 1)


def output_weights(info: ModelInfo, scored: dict[str, TensorScore], has_imatrix: bool) -> dict[str, float]:
    """Multipliers that put every tensor's expected squared output error into one unit: squared error
    of the residual stream at the output, per token.

    A tensor that writes into the residual stream (attn_output, ffn_down) adds its own expected squared
    output error there. A tensor that feeds a block (attn_q/k/v, ffn_gate/up) changes what the block
    writes by PROPAGATION times its relative output error, times the energy the block writes. An error
    added to the residual stream does not stay put: every later block reads it as a relative change of
    its input (the error over the stream's energy so far) and passes PROPAGATION of that on into what it
    writes, so an error made before sub-layer k is multiplied by the product over later sub-layers j of
    (1 + PROPAGATION * written_j / stream_j). This is why early layers and above all the token
    embedding (whose relative error per row is the relative error of the first layer's input) matter
    most. The stream's energy is the embedding's per token plus what the sub-layers before wrote.
    output.weight errs on the logits directly: its relative error counts against the whole stream; a
    model without output.weight reads its logits through token_embd, which then counts in both roles.
    Without an imatrix the energies are in weight units, not comparable: every tensor then counts with
    its relative error. Routed experts (``_exps``): the scorer's per-slice sums hold each expert's output
    before the router's gate scales it, and a token passes through k experts (expert_used_count) with
    gates near 1/k, so their error and energy count 1/k of the slices' token-weighted mean.
    """
    names = set(scored)
    gated = 1.0 / _experts_used(info)
    gate = {n: gated if "_exps." in n else 1.0 for n in names}
    energy = {n: scored[n].energy * gate[n] for n in names}

    def rel(n: str) -> float:
        e = energy[n]
        return 1.0 / e if e > 0 else 0.0

    if not has_imatrix:
        return {n: rel(n) * gate[n] for n in names}  # plain relative error, gate or not
    embedding = 0.0  # per token
    for n in names:
        if n in _TOKEN_EMBD:
            t = info.tensor(n)
            # Gemma models multiply the looked-up row by sqrt(n_embd) before the first layer
            scale = t.shape[0] if info.architecture.startswith("gemma") and n == "token_embd.weight" else 1
            embedding += energy[n] * scale / t.n_rows
    writer = {n: _writer_of(n, names) for n in names}  # None: writes into the stream itself
    written: dict[tuple[int, int], float] = {}  # energy each sub-layer writes, per token
    loose = 0.0  # writers outside the layer pattern: counted at the output, unpropagated
    for n in names:
        if n in _TOKEN_EMBD or n == "output.weight" or writer[n] is not None:
            continue
        key = _sublayer(n)
        if key is None:
            loose += energy[n]
        else:
            written[key] = written.get(key, 0.0) + energy[n]
    # gain[k]: how much an error that sub-layer k writes has grown by the output; `after` ends as the
    # growth of an error in the embedding, which every sub-layer reads
    keys = sorted(written)
    stream = [embedding]
    for k in keys:
        stream.append(stream[-1] + written[k])
    gain: dict[tuple[int, int], float] = {}
    after = 1.0
    for i in range(len(keys) - 1, -1, -1):
        gain[keys[i]] = after  # only the sub-layers after it read a writer's error
        if stream[i] > 0:
            after *= 1.0 + PROPAGATION * written[keys[i]] / stream[i]
    out: dict[str, float] = {}
    for n in names:
        if n in _TOKEN_EMBD:
            out[n] = rel(n) * embedding * after
        elif n == "output.weight":
            continue
        else:
            key = _sublayer(n)
            g = gain.get(key, 1.0) if key is not None else 1.0
            w = writer[n]
            out[n] = g if w is None else rel(n) * PROPAGATION * energy[w] * g
    head = "output.weight" if "output.weight" in names else "token_embd.weight"
    if head in names:
        out[head] = out.get(head, 0.0) + rel(head) * (stream[-1] + loose)
    return {n: w * gate[n] for n, w in out.items()}


def _experts_used(info: ModelInfo) -> int:
    """Experts each token passes through (the GGUF's expert_used_count; 1 for a dense model)."""
    k = info.metadata.get(f"{info.architecture}.expert_used_count")
    return int(k) if isinstance(k, int) and k >= 1 else 1


@dataclass
class _Budget:
    """A target turned into bytes: what the free (optimized) tensors may spend, and the achievable range."""

    pins: dict[str, int]
    by_size: bool
    fixed: int  # cost of kept and pinned tensors
    budget: int  # cost the whole plan may have (tensor bytes, or file bytes less metadata)
    raw_range: tuple[int, int]  # tensor bytes of the cheapest and the largest mix
    slack: float

    def cost(self, nbytes: int) -> int:
        return padded(nbytes) if self.by_size else nbytes


@dataclass
class Scores:
    """Error curves of every quantizable tensor of a model; plan() turns them into a plan.

    ``candidates`` holds every candidate type of each tensor (cheapest first) and ``curves`` the ones
    scored so far. With ``candidates="all"`` (see score()) every candidate is scored up front; with
    ``"window"`` plan() scores, per target, the types near it (and more while any tensor's pick sits at
    the edge of what was scored), so a target far from the low-bit types never pays for their grids.
    """

    model: ModelInfo
    curves: dict[str, TensorCurve]
    imatrix_label: str | None
    meta_size: int
    has_activations: bool
    candidates: dict[str, list[int]] = field(default_factory=dict)
    scorer: _Scorer | None = field(default=None, repr=False)  # set until score_all(): scores on demand
    _imatrix_kvs: list[_core.KvOverride] = field(default_factory=list, repr=False)
    _warned: bool = field(default=False, init=False, repr=False)
    _bpw: dict[str, list[float]] = field(default_factory=dict, init=False, repr=False)

    def pins(
        self,
        tensor_types: Iterable[tuple[str, str | int] | str] = (),
        output_tensor_type: str | int | None = None,
        token_embedding_type: str | int | None = None,
        leave_output_tensor: bool = False,
    ) -> dict[str, int]:
        """Types fixed by the user, resolved per tensor as llama.cpp would (first matching pattern wins).

        ``tensor_types`` holds ``(pattern, type)`` pairs or ``"pattern=type"`` strings; with
        ``leave_output_tensor`` output.weight keeps the type it has.
        """
        from .quantize import parse_tensor_type

        pairs = [parse_tensor_type(x) if isinstance(x, str) else x for x in tensor_types]
        patterns = [(re.compile(p.lower()), ggml_type(tt).id) for p, tt in pairs]
        tied = all(t.name != "output.weight" for t in self.model.tensors)
        out: dict[str, int] = {}
        for name in self.candidates:
            t = self.model.tensor(name)
            chosen: int | None = None
            named = next((tt for rx, tt in patterns if rx.search(name)), None)
            if (
                token_embedding_type is not None
                and name in _TOKEN_EMBD
                and not (name == "per_layer_token_embd.weight" and named is not None)
            ):
                chosen = ggml_type(token_embedding_type).id
            elif leave_output_tensor and name == "output.weight":
                out[name] = t.type
                continue
            elif output_tensor_type is not None and name == "output.weight":
                chosen = ggml_type(output_tensor_type).id
            elif named is not None:
                chosen = named
            elif output_tensor_type is not None and name == "token_embd.weight" and tied:
                chosen = ggml_type(output_tensor_type).id  # llama.cpp: a tied head's type is the output's
            if chosen is None:
                continue
            gt = ggml_type(chosen)
            if not gt.can_quantize:
                raise LlqxError(f"cannot pin {name} to {gt.name}: llama.cpp cannot write that type")
            chosen = fallback_type(chosen, t.n_per_row)
            if needs_imatrix(name, chosen) and self.imatrix_label is None:
                raise LlqxError(f"pinning {name} to {ggml_type(chosen).name} needs an imatrix")
            out[name] = chosen
        return out

    def check_target(
        self,
        target_bpw: float | None = None,
        target_size: int | None = None,
        *,
        tensor_types: Iterable[tuple[str, str | int] | str] = (),
        output_tensor_type: str | int | None = None,
        token_embedding_type: str | int | None = None,
        leave_output_tensor: bool = False,
    ) -> None:
        """LlqxError for a target no mix can reach with these pins; needs no scores, so it runs first."""
        if (target_bpw is None) == (target_size is None):
            raise LlqxError("give exactly one of target_bpw and target_size")
        pins = self.pins(tensor_types, output_tensor_type, token_embedding_type, leave_output_tensor)
        self._budget(target_bpw, target_size, pins)

    def score_all(self) -> None:
        """Score every candidate of every tensor now (a no-op once done): plan() then scores nothing."""
        if self.scorer is None:
            return
        self.scorer.ensure(self.candidates)
        self.curves = self.scorer.curves()
        self.scorer = None

    def set_metadata(self, override_kv: Iterable[str] = (), ftype: int = 7) -> None:
        """Count these metadata overrides and this general.file_type in the file size (target_size)."""
        from .quantize import parse_kv_override

        self.meta_size = int(
            _core.layout_meta_size(self.model.path, [*self._imatrix_kvs, *map(parse_kv_override, override_kv)], ftype)
        )

    def _budget(self, target_bpw: float | None, target_size: int | None, pins: dict[str, int]) -> _Budget:
        """The byte budget of a target; LlqxError when no mix of the candidates reaches it."""
        info = self.model
        n_elements = info.n_elements
        by_size = target_size is not None

        def cost(nbytes: int) -> int:
            return padded(nbytes) if by_size else nbytes

        fixed = 0
        raw_fixed = 0
        for t in info.tensors:
            if t.name not in self.candidates or t.name in pins:
                nb = t.nbytes if t.name not in self.candidates else tensor_nbytes(pins[t.name], t)
                fixed += cost(nb)
                raw_fixed += nb
        free = [
            [tensor_nbytes(x, info.tensor(name)) for x in c]
            for name, c in self.candidates.items()
            if name not in pins
        ]
        raw_lo = raw_fixed + sum(min(nb) for nb in free)
        raw_hi = raw_fixed + sum(max(nb) for nb in free)
        lo = fixed + sum(min(cost(b) for b in nb) for nb in free)
        hi = fixed + sum(max(cost(b) for b in nb) for nb in free)
        if by_size:
            assert target_size is not None
            overhead = self.meta_size
            budget_total = int(target_size) - overhead

            def show(x: int) -> str:
                return f"{x + overhead:,} bytes ({(x + overhead) / 2**30:.4f} GiB)"

            target_text = f"{int(target_size):,} bytes"
        else:
            assert target_bpw is not None
            budget_total = int(Fraction(str(target_bpw)) * n_elements / 8)

            def show(x: int) -> str:
                return f"{8.0 * x / n_elements:.4f} bpw"

            target_text = f"{target_bpw} bpw"
        rng = f"achievable: {show(lo)} to {show(hi)}"
        if pins and fixed > budget_total:
            raise LlqxError(
                f"the pinned tensors and the tensors llama.cpp keeps take {show(fixed)} alone, more than "
                f"the target {target_text} ({rng})"
            )
        if budget_total < lo:
            raise LlqxError(f"target {target_text} is below the smallest achievable mix ({rng})")
        if budget_total > hi:
            raise LlqxError(f"target {target_text} is above the largest achievable mix ({rng})")
        # bytes that may stay unspent rather than bought with a worse error: a fraction of the tolerance
        slack = n_elements * 0.0005 / 8 if not by_size else int(target_size or 0) * 0.0002
        return _Budget(pins, by_size, fixed, budget_total, (raw_lo, raw_hi), slack)

    def plan(
        self,
        target_bpw: float | None = None,
        target_size: int | None = None,
        *,
        tensor_types: Iterable[tuple[str, str | int] | str] = (),
        output_tensor_type: str | int | None = None,
        token_embedding_type: str | int | None = None,
        leave_output_tensor: bool = False,
    ) -> Plan:
        """The lowest-error mix at or below target_bpw (llama.cpp's BPW) or target_size (whole file).

        Pins as in pins(); their bytes count in the budget."""
        if (target_bpw is None) == (target_size is None):
            raise LlqxError("give exactly one of target_bpw and target_size")
        pins = self.pins(tensor_types, output_tensor_type, token_embedding_type, leave_output_tensor)
        b = self._budget(target_bpw, target_size, pins)
        if self.imatrix_label is not None and not self.has_activations and not self._warned:
            self._warned = True  # said once, when the estimate is first used (after every check passed)
            log.warning("the imatrix has no activation sums (in_sum): scoring without the mean-activation term")
        if self.scorer is None:
            sets = {name: c for name, c in self.candidates.items() if name not in pins}
            return self._plan_over(b, sets, target_bpw, target_size)
        floors = self._window(b)
        for _ in range(len(CANDIDATES) + 2):
            sets = {name: self._set(name, f) for name, f in floors.items()}
            self._score_sets(sets, pins)
            plan = self._plan_over(b, sets, target_bpw, target_size)
            if not self._widen(plan, floors):
                return plan
        raise LlqxError("internal error: the candidate window did not settle")

    # ---- window mode ---------------------------------------------------------------------------

    def _bpw_of(self, name: str) -> list[float]:
        bpw = self._bpw.get(name)
        if bpw is None:  # asked for every tensor in each step of the window search
            t = self.model.tensor(name)
            bpw = self._bpw[name] = [8.0 * tensor_nbytes(x, t) / t.n_elements for x in self.candidates[name]]
        return bpw

    def _window(self, b: _Budget) -> dict[str, float]:
        """Per free tensor, the bpw floor of the grid types (_lazy_ids) to plan over first: WINDOW_BPW
        below the mean bpw the free tensors can spend, lowered until the cheapest mix fits the budget.
        Every other type is planned over whatever its bpw."""
        free = [name for name in self.candidates if name not in b.pins]
        n_free = sum(self.model.tensor(name).n_elements for name in free)
        floor = 8.0 * (b.budget - b.fixed) / max(n_free, 1) - WINDOW_BPW
        while True:
            floors = dict.fromkeys(free, floor)
            cheapest = b.fixed + sum(
                b.cost(tensor_nbytes(self._set(name, floor)[0], self.model.tensor(name))) for name in free
            )
            if cheapest <= b.budget or all(self._set(n, floor) == self.candidates[n] for n in free):
                return floors
            floor -= 1.0

    def _set(self, name: str, floor: float) -> list[int]:
        """The candidates planned over for a grid-type floor: every type but the grid types under it."""
        lazy = _lazy_ids()
        return [
            x
            for x, bpw in zip(self.candidates[name], self._bpw_of(name), strict=True)
            if bpw >= floor or x not in lazy
        ]

    def _score_sets(self, sets: dict[str, list[int]], pins: dict[str, int]) -> None:
        assert self.scorer is not None
        need = {name: list(types) for name, types in sets.items()}
        for name, tid in pins.items():
            if tid in self.candidates[name]:
                need[name] = [tid]  # for the error shown next to a pinned tensor
        self.scorer.ensure(need)
        self.curves = self.scorer.curves()

    def _widen(self, plan: Plan, floors: dict[str, float]) -> bool:
        """Lower a tensor's floor to its next grid type when its pick is the cheapest of the types above
        the highest grid type left out (all of them are planned over), or under it: a pick above the
        cheapest of them is bracketed by scored types, but at the bottom an unscored grid type could be
        the better pick."""
        grew = False
        lazy = _lazy_ids()
        for pt in plan.tensors:
            if pt.name not in floors:
                continue
            bpw = dict(zip(self.candidates[pt.name], self._bpw_of(pt.name), strict=True))
            excluded = [v for x, v in bpw.items() if x in lazy and v < floors[pt.name]]
            if not excluded:
                continue
            top = max(excluded)
            covered = [v for v in bpw.values() if v > top]
            if not covered or bpw[pt.type] <= min(covered):
                floors[pt.name] = top
                grew = True
        return grew

    # ---- the optimizer over chosen candidates ----------------------------------------------------

    def _plan_over(
        self,
        b: _Budget,
        sets: dict[str, list[int]],
        target_bpw: float | None,
        target_size: int | None,
    ) -> Plan:
        """The optimizer's plan when each free tensor may take the candidates of its set."""
        info = self.model
        free = [name for name in self.candidates if name not in b.pins]
        points: list[tuple[list[int], list[int], list[float]]] = []
        for name in free:
            c = self.curves[name]
            types = sets[name]
            idx = [c.types.index(x) for x in types]
            points.append((types, [c.nbytes[i] for i in idx], [c.errors[i] for i in idx]))
        curves = [
            (np.array([b.cost(x) for x in nb], dtype=np.float64), np.array(err, dtype=np.float64))
            for _, nb, err in points
        ]
        chosen = allocate(curves, b.budget - b.fixed, b.slack)
        pick = {name: (p[0][i], p[1][i], p[2][i]) for name, p, i in zip(free, points, chosen, strict=True)}

        tensors: list[PlanTensor] = []
        for t in info.tensors:
            c = self.curves.get(t.name)
            if t.name not in self.candidates:
                tensors.append(PlanTensor(t.name, t.type, t.nbytes, t.n_elements, None, "kept"))
            elif t.name in b.pins:
                tid = b.pins[t.name]
                err = c.errors[c.types.index(tid)] if c is not None and tid in c.types else None
                tensors.append(PlanTensor(t.name, tid, tensor_nbytes(tid, t), t.n_elements, err, "pinned"))
            else:
                tid, nb, err = pick[t.name]
                tensors.append(PlanTensor(t.name, tid, nb, t.n_elements, err, "optimized"))
        requantize = any(ggml_type(t.type).is_quantized for t in info.tensors if t.name in self.candidates)
        n_elements = info.n_elements
        raw_lo, raw_hi = b.raw_range
        plan = Plan(
            info.path,
            tensors,
            self.meta_size,
            self.imatrix_label,
            target_bpw,
            None if target_size is None else int(target_size),
            requantize,
            (8.0 * raw_lo / n_elements, 8.0 * raw_hi / n_elements),
        )
        if not b.by_size:
            if plan.tensor_bytes > b.budget:
                raise LlqxError("internal error: plan exceeds its budget")
        elif plan.file_size > int(target_size or 0):
            raise LlqxError("internal error: plan exceeds its file size budget")
        return plan


def _progress_console():  # type: ignore[no-untyped-def]
    from rich.console import Console

    return Console(stderr=True)


def score(
    model: str | os.PathLike[str],
    imatrix: str | os.PathLike[str] | Imatrix | None = None,
    *,
    state: str | os.PathLike[str] | None = None,
    nthread: int = 0,
    sample_elements: int | None = None,
    progress: bool = True,
    candidates: str = "all",
    imatrix_label: str | None = None,
    defer: bool = False,
) -> Scores:
    """Score every quantizable tensor of a GGUF model under its candidate types.

    ``imatrix``: a path or Imatrix; without one the error is plain relative MSE and the IQ types that
    need importance data are left out. ``sample_elements`` fixes the sampled elements per tensor
    (default: a 1/32 slice of each tensor, 32 K to 256 K elements). ``state``: a state file to resume
    from and save to (scoring is saved there on Ctrl+C, and a later call with the same model and
    imatrix skips what it holds). ``candidates``: ``"all"`` scores every candidate type now;
    ``"window"`` scores nothing yet: each ``plan()`` scores the types near its target (more when a
    tensor's pick lands at the edge of them), adding them to the state file. ``imatrix_label``: the
    name recorded in the output for an Imatrix object (a path names itself). ``defer``: with
    ``"all"``, score nothing yet (check_target() first, then score_all()).
    """
    if candidates not in CANDIDATE_MODES:
        raise LlqxError(f"unknown candidates mode '{candidates}' (use {' or '.join(CANDIDATE_MODES)})")
    info = inspect(model)
    im: Imatrix | None
    label: str | None
    if imatrix is None:
        im, label = None, None
    elif isinstance(imatrix, Imatrix):
        im, label = imatrix, imatrix_label or ""
    else:
        im, label = Imatrix.load(imatrix), imatrix_label or os.fspath(imatrix)
    if im is not None:
        check_imatrix_fits(im, info, label or "")
    arch = info.architecture
    quantizable = [t for t in info.tensors if tensor_is_quantizable(t.name, len(t.shape), arch)]
    for t in quantizable:
        if t.n_per_row % ggml_type(t.type).block_size != 0:
            raise LlqxError(f"cannot read {t.name}")

    cands = {t.name: tensor_candidates(t, im is not None and t.name in im.entries) for t in quantizable}
    key = {
        "model": _model_hash(info),
        "imatrix": _imatrix_hash(im, quantizable),
        "scoring": SCORING_VERSION,
        "sampling": {
            "elements": sample_elements,
            "fraction": SAMPLE_FRACTION,
            "floor": SAMPLE_FLOOR,
            "cap": SAMPLE_CAP,
            "min_rows": MIN_ROWS,
        },
    }
    if state is not None:
        check_state_path(Path(state), {"model": model, "imatrix": None if isinstance(imatrix, Imatrix) else imatrix})
    st = load_state(None if state is None else Path(state), key)
    scorer = _Scorer(info, im, quantizable, cands, st, nthread, sample_elements, progress)
    kvs = [] if im is None else imatrix_kv_overrides(select_imatrix(im), label or "")
    meta = int(_core.layout_meta_size(info.path, kvs, 7))
    has_act = im is not None and im.has_activations
    scores = Scores(info, scorer.curves(), label, meta, has_act, cands, scorer, kvs)
    if candidates == "all" and not defer:
        scores.score_all()
    return scores


class _Scorer:
    """Scores (tensor, candidate type) pairs on demand; the state file holds what is done."""

    def __init__(
        self,
        info: ModelInfo,
        im: Imatrix | None,
        quantizable: list[TensorInfo],
        cands: dict[str, list[int]],
        st: ScoreState,
        nthread: int,
        sample_elements: int | None,
        progress: bool,
    ) -> None:
        self.info = info
        self.im = im
        self.tensors = quantizable
        self.cands = cands
        self.names = {name: [ggml_type(x).name for x in c] for name, c in cands.items()}
        self.st = st
        self.nthread = nthread
        self.sample_elements = sample_elements
        self.progress = progress

    def missing(self, need: dict[str, list[int]]) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for t in self.tensors:
            s = self.st.tensors.get(t.name)
            todo = [x for x in need.get(t.name, []) if s is None or ggml_type(x).name not in s.types]
            if todo:
                out[t.name] = todo
        return out

    def ensure(self, need: dict[str, list[int]]) -> None:
        todo = self.missing(need)
        if todo:
            _run_scoring(self.info, self.im, [t for t in self.tensors if t.name in todo], todo, self)

    def record(self, name: str, types: list[int], errors: list[float], rows: int, energy: float) -> None:
        names = [ggml_type(x).name for x in types]
        s = self.st.tensors.get(name)
        if s is None:
            s = self.st.tensors[name] = TensorScore([], [], rows, energy)
        s.merge(names, errors, rows, energy, self.names[name])

    def curves(self) -> dict[str, TensorCurve]:
        """The scored candidates of every tensor, cheapest first, errors in one unit (output_weights)."""
        scored = {t.name: self.st.tensors[t.name] for t in self.tensors if t.name in self.st.tensors}
        weights = output_weights(self.info, scored, self.im is not None)
        out: dict[str, TensorCurve] = {}
        for t in self.tensors:
            s = self.st.tensors.get(t.name)
            types: list[int] = []
            errors: list[float] = []
            for tid, n in zip(self.cands[t.name], self.names[t.name], strict=True):
                e = None if s is None else s.error_of(n)
                if e is not None:
                    types.append(tid)
                    errors.append(e * weights[t.name])
            out[t.name] = TensorCurve(t.name, t.n_elements, types, [tensor_nbytes(x, t) for x in types], errors)
        return out


def _run_scoring(
    info: ModelInfo,
    im: Imatrix | None,
    todo: list[TensorInfo],
    types: dict[str, list[int]],
    scorer: _Scorer,
) -> None:
    st = scorer.st
    sample_elements = scorer.sample_elements
    jobs = []
    expert_weights = []
    for t in todo:
        ne0, ne1, ne2 = _shape3(t)
        expert_weights.append(_expert_weights(im, t.name, ne2))
        w, a = _importance(im, t)
        job: dict[str, object] = {
            "name": t.name,
            "src_type": t.type,
            "ne": [ne0, ne1, ne2],
            "offset": t.offset,
            "candidates": types[t.name],
        }
        if w is not None:
            job["weights"] = w
        if a is not None:
            job["activations"] = a
        n_sample = (
            sample_elements
            if sample_elements is not None
            else int(max(SAMPLE_FLOOR, min(SAMPLE_CAP, t.n_elements * SAMPLE_FRACTION)))
        )
        job["sample_elements"] = max(1, min(n_sample, t.n_elements))
        jobs.append(job)
    nthread = scorer.nthread if scorer.nthread > 0 else (os.cpu_count() or 1)
    cancel = _core.ScoreCancel()
    last_save = [time.monotonic()]
    bar = None
    task = None
    if scorer.progress:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        bar = Progress(
            TextColumn("scoring"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("tensors"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[name]}"),
            console=_progress_console(),
            transient=True,
        )
        task = bar.add_task("scoring", total=len(jobs), name="")
        bar.start()

    def on_done(j: int, values: np.ndarray, rows: int) -> bool:
        t = todo[j]
        errors, energy = _combine_experts(values, len(types[t.name]), expert_weights[j])
        scorer.record(t.name, types[t.name], errors, int(rows), energy)
        if bar is not None and task is not None:
            bar.update(task, advance=1, name=t.name)
        now = time.monotonic()
        if now - last_save[0] > 2.0:
            st.save()
            last_save[0] = now
        return True

    failure: list[BaseException] = []

    def run() -> None:
        try:
            _core.score_run(
                info.path,
                jobs,
                nthread=nthread,
                sample_elements=SAMPLE_CAP,
                min_rows=MIN_ROWS,
                callback=on_done,
                cancel=cancel,
            )
        except BaseException as exc:  # re-raised in the caller's thread
            failure.append(exc)

    worker = threading.Thread(target=run, name="llqx-score", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.1)
    except KeyboardInterrupt:
        cancel.set()
        worker.join()
        st.save()
        if bar is not None:
            bar.stop()
        if st.path is not None:
            log.warning("scoring interrupted: %d tensors saved to %s", len(st.tensors), st.path)
        raise
    if bar is not None:
        bar.stop()
    st.save()
    if failure:
        exc = failure[0]
        raise LlqxError(f"scoring failed: {exc}") from exc
