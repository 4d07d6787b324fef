"""`llqx imatrix` / collect_imatrix against upstream llama-imatrix, llama-quantize and numpy."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

import llqx
from conftest import default_sigint, subprocess_env
from llqx.cli import main as cli_main
from llqx.imatrix import Imatrix
from llqx.imatrix_collect import ImatrixCollector
from llqx.imatrix_stats import layer_stats, tensor_stats

REPO = Path(__file__).resolve().parent.parent
CTX = 128
CHUNKS = 3


def run_upstream(tool: Path, cwd: Path, *args: str) -> None:
    proc = subprocess.run([str(tool), *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def llqx_cli(*args: str) -> int:
    return cli_main(["imatrix", *args])


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, calib_text: Path) -> Path:
    """A directory holding the calibration text under a short relative name (datasets are paths as given)."""
    d = tmp_path_factory.mktemp("imatrix")
    shutil.copy(calib_text, d / "calib.txt")
    return d


@pytest.fixture(scope="module")
def dense_pair(work: Path, smollm2_f16: Path, llama_imatrix: Path) -> tuple[Path, Path]:
    """Upstream's and llqx's imatrix of the same text, context and chunks on SmolLM2."""
    up = work / "up" / "imatrix.gguf"
    ours = work / "ours" / "imatrix.gguf"
    up.parent.mkdir()
    ours.parent.mkdir()
    run_upstream(llama_imatrix, work, "-m", str(smollm2_f16), "-f", "calib.txt", "-o", str(up),
                 "-c", str(CTX), "--chunks", str(CHUNKS), "-t", "2")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        rc = llqx_cli("-m", str(smollm2_f16), "-f", "calib.txt", "-o", str(ours), "-c", str(CTX),
                      "--chunks", str(CHUNKS), "-t", "2", "--sketch-rank", "16", "--quiet")
    finally:
        os.chdir(cwd)
    assert rc == 0
    return up, ours


def assert_same_stats(up: Imatrix, ours: Imatrix, rtol: float = 1e-4) -> None:
    assert sorted(up.entries) == sorted(ours.entries)
    for name, u in up.entries.items():
        o = ours.entries[name]
        assert o.in_sum2.shape == u.in_sum2.shape, name
        np.testing.assert_array_equal(o.counts, u.counts, err_msg=name)
        rel = np.abs(o.in_sum2.astype(np.float64) - u.in_sum2) / np.maximum(np.abs(u.in_sum2), 1e-30)
        assert rel.max() <= rtol, (name, rel.max())


def test_dense_matches_upstream(dense_pair: tuple[Path, Path]) -> None:
    up, ours = (Imatrix.load(p) for p in dense_pair)
    assert len(up.entries) == 30 * 7
    assert_same_stats(up, ours)
    for name, e in up.entries.items():  # Σx² is summed like upstream: the very same floats
        np.testing.assert_array_equal(ours.entries[name].in_sum2, e.in_sum2, err_msg=name)
    assert ours.has_activations
    assert not up.has_activations
    # every dense tensor carries its sketch of Σ x xᵀ (upstream's file none), whose directions stay below
    # the diagonal they sit on (E[x²] − Σ a² ≥ 0 up to rounding, the rest of the second moments)
    assert not up.has_sketch
    for name, e in ours.entries.items():
        assert e.in_sketch is not None, name
        assert e.in_sketch.shape == (16, e.n_per_row), name
        moments = ours.second_moments(name)
        assert moments is not None, name
        covered = (moments[1][0].astype(np.float64) ** 2).sum(0)
        assert np.all(covered <= ours.values(name)[0] * (1 + 1e-3) + 1e-6), name
    assert (ours.chunk_count, ours.chunk_size, ours.datasets) == (up.chunk_count, up.chunk_size, up.datasets)
    assert ours.chunk_count == CHUNKS
    # the counts are tokens: every token of every chunk reaches every block weight
    assert all(int(e.counts[0]) == CHUNKS * CTX for e in ours.entries.values())


def test_in_sum_matches_numpy_layer0(dense_pair: tuple[Path, Path], smollm2_f16: Path, work: Path) -> None:
    """Σx and Σx² of blk.0.attn_q's input = RMS-normed token embeddings, computed independently in numpy."""
    ours = Imatrix.load(dense_pair[1])
    reader = gguf.GGUFReader(smollm2_f16)
    tensors = {t.name: t for t in reader.tensors}
    emb = np.asarray(tensors["token_embd.weight"].data, dtype=np.float64)
    norm = np.asarray(tensors["blk.0.attn_norm.weight"].data, dtype=np.float64)
    eps = float(reader.fields["llama.attention.layer_norm_rms_epsilon"].contents())
    add_bos = bool(reader.fields["tokenizer.ggml.add_bos_token"].contents())
    bos = int(reader.fields["tokenizer.ggml.bos_token_id"].contents())

    text = (work / "calib.txt").read_bytes().removesuffix(b"\n")
    col = ImatrixCollector(smollm2_f16, n_ctx=CTX, threads=2, compute_ppl=False)
    tokens = col.tokenize(text)[: CHUNKS * CTX].reshape(CHUNKS, CTX).copy()
    if add_bos:
        tokens[:, 0] = bos
    x = emb[tokens.reshape(-1)]
    x = x / np.sqrt(np.mean(x * x, axis=1, keepdims=True) + eps) * norm

    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight"):
        e = ours.entries[name]
        assert e.in_sum is not None
        np.testing.assert_allclose(e.in_sum2[0], (x * x).sum(axis=0), rtol=1e-4)
        scale = np.sqrt(e.in_sum2[0].astype(np.float64) * e.counts[0])  # typical size of the sum's terms
        assert np.max(np.abs(e.in_sum[0] - x.sum(axis=0)) / scale) < 1e-4, name
        np.testing.assert_allclose(ours.activations(name)[0], x.mean(axis=0), atol=1e-4 * np.abs(x).max())
        # the sketch is M·Ω for numpy's second moments M of the same rows; read back, its directions stay
        # below M and are numpy's leading eigenvectors
        m = x.T @ x
        omega_t = llqx._core.sketch_test_matrix(x.shape[1], 16).astype(np.float64)
        ref = (m @ omega_t.T).T
        np.testing.assert_allclose(e.in_sketch, ref, atol=1e-4 * np.abs(ref).max(), err_msg=name)
        moments = ours.second_moments(name)
        assert moments is not None
        a = moments[1][0].astype(np.float64) * np.sqrt(e.counts[0])
        lam, vecs = np.linalg.eigh(m)
        lam, vecs = lam[::-1], vecs[:, ::-1]
        assert np.linalg.eigvalsh(m - a.T @ a)[0] >= -1e-3 * lam[0], name
        for i, cos in enumerate((0.999, 0.99, 0.95)):  # eigenvalues 355, 70, 23, then 17.7: the third is closer
            assert abs(a[i] @ vecs[:, i]) / np.linalg.norm(a[i]) > cos, (name, i)
            assert 0.5 * lam[i] <= float(a[i] @ a[i]) <= lam[i] * (1 + 1e-3), (name, i)


def _rope(m: np.ndarray, d: int, base: float) -> np.ndarray:
    """llama.cpp's normal RoPE (adjacent pairs) of rows at positions 0, 1, ..., heads of width d."""
    pos = np.arange(m.shape[0])[:, None] * base ** (-np.arange(0, d, 2) / d)[None, :]
    cos, sin = np.cos(pos)[:, None], np.sin(pos)[:, None]
    m = m.reshape(m.shape[0], -1, d // 2, 2)
    a, b = m[..., 0], m[..., 1]
    return np.stack([a * cos - b * sin, a * sin + b * cos], -1)


def _layer0_numpy(smollm2_f16: Path, tokens: np.ndarray) -> dict[str, np.ndarray]:
    """SmolLM2's layer 0 in float64 numpy, per chunk (rows of ``tokens``): the inputs of its two residual
    writers and the stream right after each adds to it."""
    reader = gguf.GGUFReader(smollm2_f16)
    w = {t.name: np.asarray(t.data, dtype=np.float64) for t in reader.tensors if t.name.startswith(("blk.0.", "tok"))}
    field = lambda k: reader.fields[f"llama.{k}"].contents()  # noqa: E731
    eps, base = float(field("attention.layer_norm_rms_epsilon")), float(field("rope.freq_base"))
    n_head, n_head_kv = int(field("attention.head_count")), int(field("attention.head_count_kv"))
    rms = lambda v, g: v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + eps) * g  # noqa: E731
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("attn_in", "ffn_inp", "down_in", "l_out")}
    for chunk in tokens:
        x = w["token_embd.weight"][chunk]
        h = rms(x, w["blk.0.attn_norm.weight"])
        q, k, v = (h @ w[f"blk.0.attn_{n}.weight"].T for n in "qkv")
        d = q.shape[1] // n_head
        q, k = _rope(q, d, base).reshape(len(chunk), n_head, d), _rope(k, d, base).reshape(len(chunk), n_head_kv, d)
        v = v.reshape(len(chunk), n_head_kv, d)
        mask = np.triu(np.full((len(chunk), len(chunk)), -np.inf), 1)
        heads = []
        for i in range(n_head):
            j = i // (n_head // n_head_kv)
            a = q[:, i] @ k[:, j].T / np.sqrt(d) + mask
            a = np.exp(a - a.max(axis=1, keepdims=True))
            heads.append((a / a.sum(axis=1, keepdims=True)) @ v[:, j])
        attn_in = np.concatenate(heads, axis=1)
        ffn_inp = x + attn_in @ w["blk.0.attn_output.weight"].T
        g = rms(ffn_inp, w["blk.0.ffn_norm.weight"])
        gate, up = g @ w["blk.0.ffn_gate.weight"].T, g @ w["blk.0.ffn_up.weight"].T
        down_in = gate / (1 + np.exp(-gate)) * up
        for key, val in zip(out, (attn_in, ffn_inp, down_in, ffn_inp + down_in @ w["blk.0.ffn_down.weight"].T),
                            strict=True):
            out[key].append(val)
    return {k: np.concatenate(v) for k, v in out.items()}


def test_stream_sums_match_numpy_layer0(dense_pair: tuple[Path, Path], smollm2_f16: Path, work: Path) -> None:
    """The residual writers' stream sums (each token's input over rms of the stream right after the write)
    against layer 0 of SmolLM2 computed independently in numpy; upstream reads the file as its own, and
    tensors that do not write into the stream have none."""
    ours = Imatrix.load(dense_pair[1])
    add_bos = bool(gguf.GGUFReader(smollm2_f16).fields["tokenizer.ggml.add_bos_token"].contents())
    bos = int(gguf.GGUFReader(smollm2_f16).fields["tokenizer.ggml.bos_token_id"].contents())
    col = ImatrixCollector(smollm2_f16, n_ctx=CTX, threads=2, compute_ppl=False)
    tokens = col.tokenize((work / "calib.txt").read_bytes().removesuffix(b"\n"))[: CHUNKS * CTX]
    tokens = tokens.reshape(CHUNKS, CTX).copy()
    if add_bos:
        tokens[:, 0] = bos
    ref = _layer0_numpy(smollm2_f16, tokens)
    for name, x, s in (("blk.0.attn_output.weight", ref["attn_in"], ref["ffn_inp"]),
                       ("blk.0.ffn_down.weight", ref["down_in"], ref["l_out"])):
        st = ours.entries[name].stream
        assert st is not None, name
        assert st.count == CHUNKS * CTX, name
        inv_rms = 1 / np.sqrt(np.mean(s * s, axis=1, keepdims=True))
        checks = [(st.in_sum2, (x * x * inv_rms**2).sum(axis=0)), (st.in_sum, (x * inv_rms).sum(axis=0))]
        assert sorted(st.in_max2) == [w for w in (32, 256) if x.shape[1] % w == 0], name
        for width, got in st.in_max2.items():  # each token's block maximum, weighted by its own stream
            block_max = np.abs(x).reshape(len(x), -1, width).max(axis=2)
            checks.append((got, (block_max**2 * inv_rms**2).sum(axis=0)))
        for got, want in checks:
            # llama.cpp multiplies F16 weights with F16-rounded activations: they agree to about 1e-3
            np.testing.assert_allclose(got, want, rtol=5e-3, atol=1e-3 * np.abs(want).max(), err_msg=name)
    writers = {n for n, e in ours.entries.items() if e.stream is not None}
    assert writers == {f"blk.{i}.{k}.weight" for i in range(30) for k in ("attn_output", "ffn_down")}
    assert all(ours.entries[n].stream.count == CHUNKS * CTX for n in writers)  # type: ignore[union-attr]


def test_quantize_output_identical(dense_pair: tuple[Path, Path], smollm2_f16: Path,
                                   llama_quantize: Path) -> None:
    """llama-quantize reads our file (with in_sum) and quantizes exactly as with upstream's."""
    outs = []
    for f in dense_pair:
        run_upstream(llama_quantize, f.parent, "--imatrix", f.name, str(smollm2_f16), "q.gguf", "Q4_0", "2")
        outs.append(f.parent / "q.gguf")
    assert outs[0].read_bytes() == outs[1].read_bytes()
    kv = llqx.inspect(outs[1]).metadata
    assert kv["quantize.imatrix.entries_count"] == 210
    assert kv["quantize.imatrix.chunks_count"] == CHUNKS


def test_legacy_dat(dense_pair: tuple[Path, Path], work: Path, smollm2_f16: Path,
                    llama_imatrix: Path) -> None:
    """Upstream's legacy .dat is read right, and ours is byte for byte the same file."""
    up_gguf, ours_gguf = dense_pair
    up_dat = work / "up.dat"
    # llama-imatrix without text rewrites its input in the requested format
    run_upstream(llama_imatrix, work, "-m", str(smollm2_f16), "--in-file", str(up_gguf), "-o", str(up_dat),
                 "-c", str(CTX),
                 "--output-format", "dat")
    dat = Imatrix.load(up_dat)
    ref = Imatrix.load(up_gguf)
    assert dat.legacy
    assert sorted(dat.entries) == sorted(ref.entries)
    assert dat.chunk_count == CHUNKS
    assert dat.datasets == ["calib.txt"]
    for name in ref.entries:
        np.testing.assert_allclose(dat.values(name), ref.values(name), rtol=2e-7, err_msg=name)
        assert int(dat.entries[name].counts[0]) == CHUNKS  # ncall: ceil(tokens / chunk size)

    ours_dat = work / "ours.dat"
    Imatrix.load(ours_gguf).save(ours_dat, "dat")
    assert ours_dat.read_bytes() == up_dat.read_bytes()

    # a .dat as --in-file becomes raw sums again (mean · ncall · chunk size), like llama-imatrix does
    conv = work / "from-dat.gguf"
    assert llqx_cli("--in-file", str(up_dat), "-c", str(CTX), "-o", str(conv), "--quiet") == 0
    back = Imatrix.load(conv)
    for name, e in ref.entries.items():
        np.testing.assert_array_equal(back.entries[name].counts, e.counts)
        np.testing.assert_allclose(back.entries[name].in_sum2, e.in_sum2, rtol=1e-6)


def test_moe_matches_upstream_and_batch_independent(work: Path, moe_f16: Path, llama_imatrix: Path) -> None:
    up = work / "moe-up.gguf"
    run_upstream(llama_imatrix, work, "-m", str(moe_f16), "-f", "calib.txt", "-o", str(up),
                 "-c", str(CTX), "--chunks", str(CHUNKS), "-t", "2")
    text = (work / "calib.txt").read_bytes().removesuffix(b"\n")
    ours = llqx.collect_imatrix(moe_f16, text, n_ctx=CTX, chunks=CHUNKS, threads=2, dataset="calib.txt")
    ref = Imatrix.load(up)
    assert_same_stats(ref, ours)
    exps = [n for n in ours.entries if "_exps" in n]
    assert len(exps) == 30 * 3
    for n in exps:
        assert ours.entries[n].n_expert == 4
        np.testing.assert_array_equal(ours.entries[n].counts, [CHUNKS * CTX] * 4)  # all 4 experts active

    # another batch split (2 sequences a batch, ubatches of 128 instead of one of 384) gives the same sums
    other = llqx.collect_imatrix(moe_f16, text, n_ctx=CTX, chunks=CHUNKS, threads=2, n_batch=2 * CTX,
                                 n_ubatch=CTX, compute_ppl=False)
    assert_same_stats(ours, other)
    for n, e in ours.entries.items():
        o = other.entries[n]
        assert e.in_sum is not None
        assert o.in_sum is not None
        scale = np.sqrt(np.maximum(e.in_sum2.astype(np.float64), 1e-30) * e.counts[:, None])
        assert np.max(np.abs(e.in_sum - o.in_sum) / scale) < 1e-4, n
        assert not np.allclose(e.in_sum, 0)


def test_sigint_saves_and_in_file_continues(work: Path, smollm2_f16: Path) -> None:
    """Ctrl+C in a real `llqx imatrix` keeps whole chunks; --in-file + --chunk finishes the same job."""
    total = 4
    part = work / "sigint" / "part.gguf"
    part.parent.mkdir()
    env = subprocess_env()
    # one chunk a batch, saved after every chunk
    cmd = [sys.executable, "-m", "llqx.cli", "imatrix", "-m", str(smollm2_f16), "-f", "calib.txt",
           "-o", str(part), "-c", str(CTX), "-b", str(CTX), "--chunks", str(total), "-t", "2",
           "--output-frequency", "1", "--quiet", "--no-ppl"]
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=default_sigint)
    deadline = time.monotonic() + 120
    while not part.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert part.exists(), proc.communicate()[1].decode()[-2000:]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()[-2000:]
    done = Imatrix.load(part)
    k = done.chunk_count
    assert 1 <= k < total
    assert all(int(e.counts[0]) == k * CTX for e in done.entries.values())

    final = part  # continued in place: the --in-file is read before the output is written
    full = work / "sigint" / "full.gguf"
    cwd = os.getcwd()
    os.chdir(work)
    try:
        # same batch layout as the interrupted run: every chunk's activations are the same bits
        same = ("-m", str(smollm2_f16), "-f", "calib.txt", "-c", str(CTX), "-b", str(CTX), "-t", "2",
                "--quiet", "--no-ppl")
        assert llqx_cli(*same, "-o", str(final), "--in-file", str(part), "--chunk", str(k),
                        "--chunks", str(total - k)) == 0
        assert llqx_cli(*same, "-o", str(full), "--chunks", str(total)) == 0
    finally:
        os.chdir(cwd)
    a, b = Imatrix.load(final), Imatrix.load(full)
    assert a.chunk_count == b.chunk_count == total
    assert a.datasets == ["calib.txt", "calib.txt"]  # the interrupted part's and the continuation's
    assert_same_stats(b, a, rtol=1e-5)  # float sums of the same terms, split in two
    for n, e in b.entries.items():
        scale = np.sqrt(e.in_sum2.astype(np.float64) * e.counts[:, None])
        assert np.max(np.abs(a.entries[n].in_sum - e.in_sum) / scale) < 1e-6, n


def upstream_statistics(tool: Path, model: Path, path: Path) -> dict[tuple[int, str], list[str]]:
    """llama-imatrix --show-statistics rows by (layer, tensor kind): its printed columns as text.

    Its asynchronous log can lose the tail of the table when the process exits, so the rows of a
    few runs are pooled.
    """
    rows: dict[tuple[int, str], list[str]] = {}
    for _ in range(8):
        proc = subprocess.run([str(tool), "-m", str(model), "--show-statistics", "--in-file", str(path)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr[-2000:]
        for line in (proc.stdout + proc.stderr).splitlines():
            cols = [c.strip() for c in line.split("\t")]
            if len(cols) == 13 and cols[0].split()[-1].isdigit():
                rows[(int(cols[0].split()[-1]), cols[1])] = cols
        if len(rows) == 210:
            break
    return rows


def test_statistics(dense_pair: tuple[Path, Path], smollm2_f16: Path, llama_imatrix: Path,
                    capsys: pytest.CaptureFixture[str]) -> None:
    path = dense_pair[1]
    assert llqx_cli("--show-statistics", "--in-file", str(path), "--json") == 0
    out = json.loads(capsys.readouterr().out)
    im = Imatrix.load(path)
    by_name = {t["name"]: t for t in out["tensors"]}
    assert len(by_name) == 210
    assert len(out["layers"]) == 30

    name, prev = "blk.5.ffn_down.weight", "blk.4.ffn_down.weight"
    v = im.entries[name].in_sum2[0].astype(np.float64) / im.entries[name].counts[0]
    w = im.entries[prev].in_sum2[0].astype(np.float64) / im.entries[prev].counts[0]
    a = im.entries[name].in_sum[0] / im.entries[name].counts[0]
    p = v / v.sum()
    t = by_name[name]
    assert (t["elements"], t["layer"], t["kind"]) == (1536, 5, "ffn_down")
    assert t["sum_energy"] == pytest.approx(v.sum(), rel=1e-6)
    assert t["entropy"] == pytest.approx(-(p * np.log2(p)).sum(), rel=1e-6)
    assert t["entropy_norm"] == pytest.approx(t["entropy"] / np.log2(1536), rel=1e-9)
    assert t["active"] == pytest.approx(np.mean(v > 1e-5))
    assert t["mean_act"] == pytest.approx(a.mean(), rel=1e-5, abs=1e-9)
    assert t["std_act"] == pytest.approx(a.std(), rel=1e-5)
    assert t["cossim"] == pytest.approx(v @ w / np.linalg.norm(v) / np.linalg.norm(w), rel=1e-6)
    assert by_name["blk.0.ffn_down.weight"]["cossim"] is None

    layers = {lay["layer"]: lay for lay in out["layers"]}
    ts = [x for x in out["tensors"] if x["layer"] == 5]
    n = sum(x["elements"] for x in ts)
    assert layers[5]["sum_energy"] == pytest.approx(sum(x["sum_energy"] * x["elements"] for x in ts) / n)
    assert layer_stats(tensor_stats(im))[5].cossim == pytest.approx(layers[5]["cossim"])

    # the columns llama-imatrix shows too agree with its own --show-statistics on the same file
    up = upstream_statistics(llama_imatrix, smollm2_f16, path)
    assert len(up) >= 60
    for t in out["tensors"]:
        cols = up.get((t["layer"], t["kind"]))
        if cols is None:
            continue
        assert float(cols[2]) == pytest.approx(t["sum_energy"], rel=1e-4, abs=0.006)
        assert float(cols[7].rstrip("%")) == pytest.approx(100 * t["active"], abs=0.006)
        assert int(cols[8]) == t["elements"]
        assert float(cols[9]) == pytest.approx(t["entropy"], rel=1e-4, abs=6e-5)
        if t["cossim"] is not None:
            assert float(cols[12]) == pytest.approx(t["cossim"], abs=6e-4)

    assert llqx_cli("--show-statistics", "--in-file", str(path)) == 0
    shown = capsys.readouterr().out
    assert "ffn_down" in shown
    assert "per layer" in shown


def test_non_finite_activations_named(work: Path, smollm2_f16: Path) -> None:
    """An inf in blk.0's norm weight makes the activations of blk.0's projections non-finite."""
    bad = work / "inf-model.gguf"
    shutil.copy(smollm2_f16, bad)
    t = llqx.inspect(bad).tensor("blk.0.attn_norm.weight")
    with bad.open("r+b") as f:
        f.seek(t.offset)
        f.write(np.full(4, np.inf, dtype=np.float32).tobytes())
    text = (work / "calib.txt").read_bytes()
    with pytest.raises(llqx.LlqxError, match=r"non-finite activations in the input of blk\.0\.attn_[qkv]\."):
        llqx.collect_imatrix(bad, text, n_ctx=CTX, chunks=1, threads=2)
    bad.unlink()


def test_bad_input(work: Path, smollm2_f16: Path, moe_f16: Path, dense_pair: tuple[Path, Path],
                   capsys: pytest.CaptureFixture[str]) -> None:
    out = work / "bad" / "out.gguf"
    out.parent.mkdir()
    out.write_bytes(b"keep me")
    short = work / "bad" / "short.txt"
    short.write_text("Far too short for one chunk of text.\n")
    capsys.readouterr()

    def fails(*args: str, match: str) -> None:
        assert llqx_cli(*args, "--quiet") == 1
        err = capsys.readouterr().err
        assert match in " ".join(err.split()), err
        assert err.count("error:") == 1, err  # one message (rich may wrap it at the terminal width)
        assert "Traceback" not in err
        assert out.read_bytes() == b"keep me"

    base = ("-c", str(CTX), "-t", "2", "-o", str(out))
    fails("-m", str(smollm2_f16), "-f", str(short), *base, match="too short")
    junk = work / "bad" / "junk.gguf"
    junk.write_bytes(b"GGUF" + os.urandom(4000))
    fails("-m", str(junk), "-f", str(short), *base, match="cannot load model")
    fails("-m", str(work / "bad" / "missing.gguf"), "-f", str(short), *base, match="model not found")
    fails("-m", str(moe_f16), "-f", str(work / "calib.txt"), "--in-file", str(dense_pair[1]), *base,
          match="does not belong to this model")
    fails("-m", str(smollm2_f16), "-f", str(work / "calib.txt"), "-c", str(CTX), "-o", str(out.parent),
          match="output is a directory")
    fails("-m", str(smollm2_f16), "-f", str(work / "calib.txt"), "--sketch-rank", "-1", *base,
          match="the sketch rank must be between 0 and 64, not -1")
    assert sorted(p.name for p in out.parent.iterdir()) == ["junk.gguf", "out.gguf", "short.txt"]


def test_sketch_rank(dense_pair: tuple[Path, Path], smollm2_f16: Path, work: Path) -> None:
    """By default (and with --sketch-rank 0) no sketch and the same sums; another size stores that many columns."""
    default = Imatrix.load(dense_pair[1])  # --sketch-rank 16
    for rank in (None, 0, 4):
        out = work / f"rank{rank}.gguf"
        assert llqx_cli("-m", str(smollm2_f16), "-f", str(work / "calib.txt"), "-o", str(out), "-c", str(CTX),
                        "--chunks", str(CHUNKS), "-t", "2", *([] if rank is None else ["--sketch-rank", str(rank)]),
                        "--quiet") == 0
        im = Imatrix.load(out)
        assert im.has_sketch == bool(rank)
        for name, e in default.entries.items():
            np.testing.assert_array_equal(im.entries[name].in_sum2, e.in_sum2, err_msg=name)
            mine = im.entries[name].in_sketch
            if not rank:
                assert mine is None, name
                continue
            assert mine is not None, name
            assert mine.shape == (rank, e.n_per_row), name
            # Ω of 4 columns is the first 4 of 16: the same products, in the same order
            np.testing.assert_array_equal(mine, e.in_sketch[:rank], err_msg=name)  # type: ignore[index]


def untied_copy(source: Path, target: Path) -> Path:
    """The same model with its own output.weight (a copy of token_embd): what --process-output collects."""
    from llqx.data import _copy_fields

    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(target, arch=str(reader.fields["general.architecture"].contents()),
                             use_temp_file=False)
    _copy_fields(reader, writer, {"general.architecture"}, file_type=None)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.asarray(t.data))
        if t.name == "token_embd.weight":
            writer.add_tensor("output.weight", np.asarray(t.data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def test_process_output(work: Path, smollm2_f16: Path, llama_imatrix: Path) -> None:
    model = untied_copy(smollm2_f16, work / "untied.gguf")
    try:
        up = work / "po-up.gguf"
        run_upstream(llama_imatrix, work, "-m", str(model), "-f", "calib.txt", "-o", str(up), "-c", str(CTX),
                     "--chunks", "2", "-t", "2", "--process-output", "--no-ppl")
        text = (work / "calib.txt").read_bytes().removesuffix(b"\n")
        ours = llqx.collect_imatrix(model, text, n_ctx=CTX, chunks=2, threads=2, process_output=True,
                                    compute_ppl=False, dataset="calib.txt")
        without = llqx.collect_imatrix(model, text, n_ctx=CTX, chunks=2, threads=2, compute_ppl=False)
    finally:
        model.unlink()
    ref = Imatrix.load(up)
    assert "output.weight" in ref.entries
    assert_same_stats(ref, ours)
    out = ours.entries["output.weight"]
    assert out.n_per_row == 576
    assert int(out.counts[0]) == 2 * CTX  # every token's logits
    assert "output.weight" not in without.entries
    assert len(without.entries) == len(ours.entries) - 1


def test_moe_partial_experts(work: Path, moe_f16: Path, llama_imatrix: Path) -> None:
    """2 of 4 experts used per token: per-expert counts follow the router, exactly as upstream counts them."""
    model = work / "moe-top2.gguf"
    shutil.copy(moe_f16, model)
    key = b"llama.expert_used_count"
    with model.open("r+b") as f:
        head = f.read(32 << 20)  # the key-value section (the tokenizer makes it a few MB)
        pos = head.index(key) + len(key)
        assert struct.unpack_from("<II", head, pos) == (4, 4)  # u32 type, 4 experts used
        f.seek(pos + 4)
        f.write(struct.pack("<I", 2))
    try:
        up = work / "moe-top2-up.gguf"
        run_upstream(llama_imatrix, work, "-m", str(model), "-f", "calib.txt", "-o", str(up), "-c", str(CTX),
                     "--chunks", "2", "-t", "2", "--no-ppl")
        text = (work / "calib.txt").read_bytes().removesuffix(b"\n")
        ours = llqx.collect_imatrix(model, text, n_ctx=CTX, chunks=2, threads=2, compute_ppl=False)
    finally:
        model.unlink()
    ref = Imatrix.load(up)
    assert_same_stats(ref, ours)
    assert any(np.any(e.counts == 0) for n, e in ours.entries.items() if "_exps" in n)  # idle experts
    for name, e in ours.entries.items():
        if "_exps" in name:
            assert e.counts.sum() == 2 * 2 * CTX, name  # two experts per token
            idle = e.counts == 0
            np.testing.assert_array_equal(ours.values(name)[idle], 1.0)  # llama-quantize's rule
            np.testing.assert_array_equal(ours.activations(name)[idle], 0.0)
        else:
            assert int(e.counts[0]) == 2 * CTX
