"""Triton flash attention vs the fp32 torch reference: outputs and dq/dk/dv, odd shapes, masks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from e2ed2.kernels import SUPPORTED_HEAD_DIMS, attention_reference, flash_attention, head_dim_tiles
from e2ed2.kernels.attention import resolve_backend

# Per-dtype tolerances vs the fp32 reference evaluated on the same (rounded) inputs. fp16 rounds
# P and dS to fp16 before their matmuls, as every flash kernel does.
TOLERANCES = {torch.float32: (2e-5, 2e-5), torch.float16: (4e-3, 1e-2)}


def _inputs(
    batch: int,
    heads: int,
    n_q: int,
    n_k: int,
    head_dim: int,
    dtype: torch.dtype,
    device: str,
    *,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (
        torch.randn(batch, heads, n, head_dim, generator=g).to(device, dtype)
        for n in (n_q, n_k, n_k, n_q)
    )
    return q, k, v, do


def _padding_mask(batch: int, n_k: int, device: str, *, seed: int = 1) -> torch.Tensor:
    """Random key padding with at least one kept key per sample (True = attend)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, n_k, generator=g) > 0.4
    mask[:, 0] = True
    return mask.to(device)


def _run(fn, q, k, v, do, mask, **kwargs):
    """Output and (dq, dk, dv) of ``fn`` on fresh leaves."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves, mask, **kwargs)
    out.backward(do.to(out.dtype))
    return out.detach(), [x.grad for x in leaves]


def _reference(q, k, v, do, mask, **kwargs):
    return _run(attention_reference, q.float(), k.float(), v.float(), do.float(), mask, **kwargs)


def _assert_close(actual, expected, dtype, what):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.float().cpu(), expected.cpu(), atol=atol, rtol=rtol, msg=what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("n_q,n_k", [(77, 19), (1, 33)])
@pytest.mark.parametrize("head_dim", [16, 40, 64, 72, 128])
def test_triton_matches_reference(head_dim, n_q, n_k, masked, dtype, device):
    q, k, v, do = _inputs(2, 2, n_q, n_k, head_dim, dtype, device)
    mask = _padding_mask(2, n_k, device) if masked else None
    out, grads = _run(flash_attention, q, k, v, do, mask, backend="triton")
    ref_out, ref_grads = _reference(q, k, v, do, mask)
    assert out.dtype == dtype and out.shape == (2, 2, n_q, head_dim)
    _assert_close(out, ref_out, dtype, "out")
    for name, grad, ref in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        assert grad.dtype == dtype
        _assert_close(grad, ref, dtype, name)


@pytest.mark.parametrize(
    "head_dim,n_q,n_k",
    [(8, 64, 96), (24, 40, 77), (104, 33, 64), (72, 64, 96), (72, 100, 130)],
)
def test_triton_other_head_dims_and_block_multiples(head_dim, n_q, n_k, device):
    """Masked single tiles (8, 24, 104) and sequence lengths that fill whole blocks (no row mask)."""
    q, k, v, do = _inputs(1, 2, n_q, n_k, head_dim, torch.float32, device, seed=3)
    mask = _padding_mask(1, n_k, device, seed=4)
    for m in (None, mask):
        out, grads = _run(flash_attention, q, k, v, do, m, backend="triton")
        ref_out, ref_grads = _reference(q, k, v, do, m)
        _assert_close(out, ref_out, torch.float32, "out")
        for grad, ref in zip(grads, ref_grads, strict=True):
            _assert_close(grad, ref, torch.float32, "grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_fully_masked_rows_are_zero_with_zero_grads(dtype, device):
    q, k, v, do = _inputs(3, 2, 45, 37, 72, dtype, device, seed=5)
    mask = _padding_mask(3, 37, device)
    mask[1] = False  # sample 1 has no key at all
    out, (dq, dk, dv) = _run(flash_attention, q, k, v, do, mask, backend="triton")
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(t).all(), name
        assert (t[1] == 0).all(), name
    # Padded keys of the other samples get no gradient either.
    assert (dk[0][:, ~mask[0]] == 0).all() and (dv[2][:, ~mask[2]] == 0).all()
    ref_out, ref_grads = _reference(q, k, v, do, mask)
    _assert_close(out, ref_out, dtype, "out")
    for grad, ref in zip((dq, dk, dv), ref_grads, strict=True):
        _assert_close(grad, ref, dtype, "grad")


def test_strided_inputs_and_expanded_grad(device):
    """(B, N, H, D) -> (B, H, N, D) views as processors pass them; output keeps q's layout."""
    batch, heads, n_q, n_k, head_dim = 2, 3, 50, 41, 40
    g = torch.Generator().manual_seed(7)
    q_bnhd = torch.randn(batch, n_q, heads, head_dim, generator=g).to(device)
    kv_bnhd = torch.randn(batch, n_k, 2, heads, head_dim, generator=g).to(device)
    q = q_bnhd.transpose(1, 2).requires_grad_()
    k = kv_bnhd[:, :, 0].transpose(1, 2).detach().requires_grad_()
    v = kv_bnhd[:, :, 1].transpose(1, 2).detach().requires_grad_()
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    out = flash_attention(q, k, v, backend="triton")
    assert out.stride() == q.stride()
    out.sum().backward()  # dO is an expanded scalar: every stride is 0
    ref_leaves = [x.detach().float().contiguous().requires_grad_() for x in (q, k, v)]
    ref = attention_reference(*ref_leaves)
    ref.sum().backward()
    _assert_close(out.detach(), ref.detach(), torch.float32, "out")
    for x, r in zip((q, k, v), ref_leaves, strict=True):
        _assert_close(x.grad, r.grad, torch.float32, "grad")


def test_softmax_scale(device):
    q, k, v, do = _inputs(1, 1, 20, 30, 64, torch.float32, device, seed=8)
    out, grads = _run(flash_attention, q, k, v, do, None, softmax_scale=0.3, backend="triton")
    ref_out, ref_grads = _reference(q, k, v, do, None, softmax_scale=0.3)
    _assert_close(out, ref_out, torch.float32, "out")
    for grad, ref in zip(grads, ref_grads, strict=True):
        _assert_close(grad, ref, torch.float32, "grad")


def test_torch_backend_matches_reference():
    q, k, v, do = _inputs(3, 2, 33, 21, 72, torch.float32, "cpu", seed=9)
    mask = _padding_mask(3, 21, "cpu")
    mask[2] = False
    out, grads = _run(flash_attention, q, k, v, do, mask, backend="torch")
    ref_out, ref_grads = _reference(q, k, v, do, mask)
    assert (out[2] == 0).all()
    _assert_close(out, ref_out, torch.float32, "out")
    for grad, ref in zip(grads, ref_grads, strict=True):
        assert torch.isfinite(grad).all()
        _assert_close(grad, ref, torch.float32, "grad")


def test_auto_backend_is_triton_only_on_real_cuda_tensors():
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", torch.device("cuda", 0)) == "triton"
    assert resolve_backend("auto", torch.empty(1, device="meta")) == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("xformers", torch.device("cpu"))


def test_fake_cuda_tensors_trace_through_torch_backend():
    """FakeTensorMode (the engine's memory estimates): "auto" traces, "triton" refuses clearly."""
    with FakeTensorMode():
        q = torch.randn(2, 4, 9, 72, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(2, 4, 5, 72, device="cuda", dtype=torch.bfloat16)
        mask = torch.ones(2, 5, dtype=torch.bool, device="cuda")
        assert resolve_backend("auto", q) == "torch"
        out = flash_attention(q, k, k, mask)
        assert out.shape == q.shape and out.device.type == "cuda"
        with pytest.raises(RuntimeError, match="fake tensors"):
            flash_attention(q, k, k, mask, backend="triton")


def test_head_dim_tiles_cover_without_padding_to_128():
    assert head_dim_tiles(72) == (64, 16)  # 80 columns of work, not 128
    assert head_dim_tiles(128) == (128, 0)
    for head_dim in SUPPORTED_HEAD_DIMS:
        main, tail = head_dim_tiles(head_dim)
        for tile in (main, tail):
            assert tile == 0 or (tile >= 16 and tile & (tile - 1) == 0)
        assert head_dim <= main + tail
        # Never wider than the next power of two, and within 16 columns of D where split.
        assert main + tail <= max(16, 1 << (head_dim - 1).bit_length())
        if tail:
            assert main + tail - head_dim < 16


@pytest.mark.parametrize("head_dim", [4, 36, 136])
def test_unsupported_head_dim_raises(head_dim, device):
    q = torch.randn(1, 1, 5, head_dim, device=device)
    with pytest.raises(ValueError, match="multiples of 8 up to 128"):
        flash_attention(q, q, q, backend="triton")


def test_bad_inputs_raise(device):
    q = torch.randn(2, 2, 5, 16, device=device)
    k = torch.randn(2, 2, 7, 16, device=device)
    with pytest.raises(ValueError, match="same shape"):
        flash_attention(q, k, k[:, :, :6])
    with pytest.raises(ValueError, match="disagree"):
        flash_attention(q, k[:1], k[:1])
    with pytest.raises(TypeError, match="dtype"):
        flash_attention(q, k.half(), k.half())
    with pytest.raises(TypeError, match="bool"):
        flash_attention(q, k, k, torch.ones(2, 7, device=device))
    with pytest.raises(ValueError, match=r"\(B, Nk\)"):
        flash_attention(q, k, k, torch.ones(2, 5, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match="non-empty"):
        flash_attention(q[:, :, :0], k, k)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the interpreter's limits on CPU")
def test_bf16_under_interpreter_raises():
    q = torch.randn(1, 1, 4, 16, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="bfloat16"):
        flash_attention(q, q, q, backend="triton")


_NO_INTERPRETER_SCRIPT = """
import torch
from e2ed2.kernels import flash_attention, timestep_embedding
q = torch.randn(1, 1, 4, 16)
for call in (
    lambda: flash_attention(q, q, q, backend="triton"),
    lambda: timestep_embedding(
        torch.arange(2), torch.randn(8, 32), torch.randn(8), torch.randn(8, 8), torch.randn(8),
        backend="triton",
    ),
):
    try:
        call()
    except RuntimeError as err:
        print("RAISED:", err)
    else:
        print("NO ERROR")
print("auto:", flash_attention(q, q, q).shape)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_triton_backend_on_cpu_without_interpreter_raises_clearly():
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", _NO_INTERPRETER_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    lines = [
        line for line in result.stdout.splitlines() if line.startswith(("RAISED", "NO ", "auto"))
    ]
    assert len(lines) == 3, result.stdout + result.stderr
    for line in lines[:2]:
        assert line.startswith("RAISED:") and "TRITON_INTERPRET=1" in line and "CUDA" in line
    assert lines[2] == "auto: torch.Size([1, 1, 4, 16])"


# --------------------------------------------------------------------------------------------
# The alignment contract: the kernels assume 16-byte aligned tile pointers and strides that are
# multiples of 8 elements (their `tl.multiple_of` hints); the launchers copy views that break it.
# --------------------------------------------------------------------------------------------


def _unaligned_views(device, dtype=torch.float32):
    """q at a 1-element offset (misaligned pointer), k/v with a row stride of 76 (not 8 | 76)."""
    g = torch.Generator().manual_seed(11)
    batch, heads, n_q, n_k, head_dim = 2, 2, 37, 21, 72
    q_buf = torch.randn(batch, heads, n_q, head_dim + 8, generator=g).to(device, dtype)
    q = q_buf[..., 1 : head_dim + 1]
    k = torch.randn(batch, heads, n_k, 76, generator=g).to(device, dtype)[..., :head_dim]
    v = torch.randn(batch, heads, n_k, 76, generator=g).to(device, dtype)[..., 4 : head_dim + 4]
    do = torch.randn(batch, heads, n_q, head_dim, generator=g).to(device, dtype)
    return q, k, v, do


def test_unaligned_views_are_copied_and_match_reference(device):
    from e2ed2.kernels._triton import aligned_for_kernel, is_aligned

    q, k, v, do = _unaligned_views(device)
    for x in (q, k, v):
        assert x.stride(-1) == 1 and not is_aligned(x)
        copy = aligned_for_kernel(x)
        assert copy is not x and is_aligned(copy) and torch.equal(copy, x)
    mask = _padding_mask(2, k.shape[2], device)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]  # views, not contiguous copies
    out = flash_attention(*leaves, mask, backend="triton")
    out.backward(do)
    ref_out, ref_grads = _reference(q, k, v, do, mask)
    _assert_close(out.detach(), ref_out, torch.float32, "out")
    for name, leaf, ref in zip(("dq", "dk", "dv"), leaves, ref_grads, strict=True):
        assert leaf.grad.shape == leaf.shape
        _assert_close(leaf.grad, ref, torch.float32, name)


def test_aligned_views_are_read_in_place(device):
    """The processors' (B, N, H, D) -> (B, H, N, D) transposes meet the contract: no copy."""
    from e2ed2.kernels._triton import aligned_for_kernel

    x = torch.randn(2, 9, 3, 72, device=device).transpose(1, 2)
    assert aligned_for_kernel(x) is x
    expanded = torch.ones((), device=device).expand(2, 3, 9, 72)  # a sum()'s gradient
    copy = aligned_for_kernel(expanded)
    assert copy is not expanded and copy.stride(-1) == 1 and torch.equal(copy, expanded)


def test_launcher_refuses_to_launch_on_unaligned_tensors_without_fallback(device, monkeypatch):
    """Disabling the copy fallback trips the launcher's own check, before any kernel runs."""
    from e2ed2.kernels.attention import launcher

    monkeypatch.setattr(launcher, "aligned_for_kernel", lambda x: x)
    q, k, v, _ = _unaligned_views(device)
    with pytest.raises(AssertionError, match="alignment contract"):
        flash_attention(q, k, v, backend="triton")
