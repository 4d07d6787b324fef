"""The estimator (docs/method.md, propagation): pure functions that put every tensor's scored error into
one unit, the squared error of the residual stream at the output, per token. Plain data in, numbers out:
no model I/O, no scoring, no llama.cpp calls.
"""

from __future__ import annotations

import re

import numpy as np

from .imatrix import Imatrix
from .llama_rules import TOKEN_EMBD
from .model import ModelInfo
from .state import TensorScore


def expert_weights(im: Imatrix | None, name: str, n_expert: int) -> np.ndarray:
    """Share of the tokens each expert slice sees (imatrix counts), uniform without them."""
    if im is not None and name in im.entries and n_expert > 1:
        c = np.asarray(im.entries[name].counts, dtype=np.float64).reshape(-1)
        if c.size == n_expert and c.sum() > 0:
            return c / c.sum()
    return np.full(n_expert, 1.0 / n_expert)


def combine_experts(values: np.ndarray, n_cand: int, weights: np.ndarray) -> tuple[list[float], float, list[float]]:
    """The scorer's per-slice sums (see llqx_score.h) as one expected error per candidate, the energy, and
    one expected error per input noise that followed them."""
    v = np.asarray(values, dtype=np.float64).reshape(-1, weights.size)
    per = v @ weights
    return [float(x) for x in per[:n_cand]], float(per[n_cand]), [float(x) for x in per[n_cand + 1:]]


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
        if n in TOKEN_EMBD:
            t = info.tensor(n)
            # Gemma models multiply the looked-up row by sqrt(n_embd) before the first layer
            scale = t.shape[0] if info.architecture.startswith("gemma") and n == "token_embd.weight" else 1
            embedding += energy[n] * scale / t.n_rows
    writer = {n: _writer_of(n, names) for n in names}  # None: writes into the stream itself
    written: dict[tuple[int, int], float] = {}  # energy each sub-layer writes, per token
    loose = 0.0  # writers outside the layer pattern: counted at the output, unpropagated
    for n in names:
        if n in TOKEN_EMBD or n == "output.weight" or writer[n] is not None:
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
        if n in TOKEN_EMBD:
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


def local_error_divisors(scored: dict[str, TensorScore]) -> dict[str, float]:
    """Per tensor, the divisor that turns its scored error into its local error, the unit measured
    sensitivities price (llqx.sensitivity): a tensor that writes into the residual stream (attn_output,
    ffn_down) counts the absolute error it adds there (divisor 1; where the imatrix has its stream sums the
    scorer's stream errors replace it, score_metric.stream_metric); every other tensor counts its output
    error relative to the energy of its output, the relative change it makes in what its block computes
    (0 when that energy is unknown). No propagation: the measured factor of the tensor's group supplies it.
    """
    names = set(scored)
    out: dict[str, float] = {}
    for n in names:
        writes = _sublayer(n) is not None and _writer_of(n, names) is None
        out[n] = 1.0 if writes else scored[n].energy
    return out


def _experts_used(info: ModelInfo) -> int:
    """Experts each token passes through (the GGUF's expert_used_count; 1 for a dense model)."""
    k = info.metadata.get(f"{info.architecture}.expert_used_count")
    return int(k) if isinstance(k, int) and k >= 1 else 1
