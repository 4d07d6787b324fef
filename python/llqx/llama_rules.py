"""llama.cpp's rules that llqx mirrors (b11312): which tensors it quantizes, which type it really writes
for a row width (its fallback), which types need an importance matrix, and the candidate types llqx
scores per tensor. Each rule names the llama-quant.cpp function it follows; see docs/method.md.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import cache

from . import _core
from .errors import LlqxError
from .model import ModelInfo, TensorInfo
from .types import ggml_type, ggml_types, parse_tensor_type

# the types llqx scores (docs/method.md, candidates); the 16-bit one is F16, or BF16 for a BF16 source
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
TOKEN_EMBD = ("token_embd.weight", "per_layer_token_embd.weight")


def tensor_is_quantizable(name: str, n_dims: int, arch: str) -> bool:
    """Whether llama_model_quantize would quantize this tensor (else it keeps its type)."""
    if n_dims < 2 or not name.endswith("weight"):
        return False
    if any(s in name for s in _KEEP_SUBSTRINGS):
        return False
    if name in ("position_embd.weight", "token_types.weight"):
        return False
    return not (arch == "glm5-next" and any(s in name for s in _KEEP_GLM5_NEXT))


def quantizable_tensors(info: ModelInfo) -> list[TensorInfo]:
    """The tensors llama_model_quantize would quantize, in file order."""
    return [t for t in info.tensors if tensor_is_quantizable(t.name, len(t.shape), info.architecture)]


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
    """llama.cpp refuses these without importance data: its rule, from the one C++ copy in llqx._core."""
    return _core.tensor_requires_imatrix(name, type_id)


def shape3(t: TensorInfo) -> tuple[int, int, int]:
    """(row width, rows, matrices) of a tensor: experts and higher dims folded into the third."""
    s = [*list(t.shape), 1, 1, 1]
    return s[0], s[1], s[2] * s[3]


@cache
def grid_type_ids() -> frozenset[int]:
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


def resolve_pins(
    model: ModelInfo,
    candidates: list[str],
    has_imatrix: bool,
    tensor_types: Iterable[tuple[str, str | int] | str] = (),
    output_tensor_type: str | int | None = None,
    token_embedding_type: str | int | None = None,
    leave_output_tensor: bool = False,
) -> dict[str, int]:
    """Types fixed by the user, resolved per tensor (of ``candidates``) as llama.cpp would: first matching
    pattern wins, the token embedding and output options before the patterns, width fallback applied.

    ``tensor_types`` holds ``(pattern, type)`` pairs or ``"pattern=type"`` strings; with
    ``leave_output_tensor`` output.weight keeps the type it has.
    """
    pairs = [parse_tensor_type(x) if isinstance(x, str) else x for x in tensor_types]
    patterns = [(re.compile(p.lower()), ggml_type(tt).id) for p, tt in pairs]
    tied = all(t.name != "output.weight" for t in model.tensors)
    out: dict[str, int] = {}
    for name in candidates:
        t = model.tensor(name)
        chosen: int | None = None
        named = next((tt for rx, tt in patterns if rx.search(name)), None)
        if (
            token_embedding_type is not None
            and name in TOKEN_EMBD
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
        if needs_imatrix(name, chosen) and not has_imatrix:
            raise LlqxError(f"pinning {name} to {ggml_type(chosen).name} needs an imatrix")
        out[name] = chosen
    return out
