"""The static performance check (``e2ed2.kernels.static_check``): the kernels compiled for sm_80 and
sm_90 at PixArt-α shapes, without a GPU, are spill-free, fit shared memory, read their D = 72
tiles with 128-bit loads and pipeline their loops; and the check fails on deliberately bad input.

The compiles run in a subprocess without ``TRITON_INTERPRET`` (this process runs the kernels
under the interpreter, where ``@triton.jit`` builds nothing compilable), with the ptxas bundled in
the triton wheel. The fast tests compile the launchers' first (preferred) config of every kernel;
the full sweep (every config, D = 72 / 64 / 128, fp16 and bf16) is marked slow. Compiles are
cached on disk, so re-runs take seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import triton

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
pytestmark = pytest.mark.skipif(
    not PTXAS.exists(), reason="needs the ptxas bundled with the triton wheel (Linux x86-64)"
)

KERNELS = {
    "_attn_fwd_kernel",
    "_attn_bwd_delta_kernel",
    "_attn_bwd_dkdv_kernel",
    "_attn_bwd_dq_kernel",
    "_temb_fwd_kernel",
    "_temb_bwd_kernel",
}
LOOPED = {"_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"}


def _compile_rows(script: str, timeout: int = 1500) -> list[dict]:
    """Run ``script`` (which prints a JSON list of rows last) in a compiling subprocess."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _assert_clean(rows: list[dict]) -> None:
    from e2ed2.kernels.static_check import GPU_LIMITS

    for r in rows:
        what = f"{r['kernel']} {r['case']} D={r['head_dim']} {r['dtype']} sm_{r['arch']} [{r['config']}]"
        limits = GPU_LIMITS[r["arch"]]
        # The individual properties, then the check's own verdict (which covers the same).
        assert r["regs"] is not None and r["regs"] <= limits.max_regs_per_thread, what
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, what
        assert r["shared"] <= limits.max_shared_per_block, what
        assert r["blocks_per_sm"]["blocks"] >= 1, what
        if r["op"] == "attention":
            # Tiles vectorized: no fp16/bf16 element loaded on its own, 128-bit loads/copies.
            assert r["ptx_ld16"] == 0, what
            assert r["ptx_ld128"] + r["ptx_cp_async16"] > 0, what
        if r["kernel"] in LOOPED:
            assert r["has_loop"], what
            if r["num_stages"] > 1:
                assert r["ptx_cp_async16"] > 0, what  # the main loop is software-pipelined
        assert r["problems"] == [], what


_FAST_SWEEP = """
    import json
    from e2ed2.kernels import static_check as sc
    cases = [c for c in sc.ATTENTION_CASES if c[0] in ("self 1024", "cross 4096x120 masked")]
    jobs = sc.pixart_jobs((72,), ("bf16",), tuple(cases), max_configs=1)
    print(json.dumps(sc.run_jobs(jobs, (80, 90))))
"""


def test_preferred_configs_are_clean_on_sm80_and_sm90():
    """D = 72 bf16, self and cross-attention (mask, 120 keys), first config of every kernel."""
    rows = _compile_rows(_FAST_SWEEP)
    assert {(r["kernel"], r["arch"]) for r in rows} == {(k, a) for k in KERNELS for a in (80, 90)}
    assert {r["case"] for r in rows if r["op"] == "attention"} == {
        "self 1024",
        "cross 4096x120 masked",
    }
    _assert_clean(rows)


@pytest.mark.slow
def test_every_config_is_clean_full_sweep():
    """Every autotune config, D = 72 / 64 / 128, fp16 and bf16, all cases, both GPUs."""
    rows = _compile_rows(
        """
        import json
        from e2ed2.kernels import static_check as sc
        print(json.dumps(sc.run_jobs(sc.pixart_jobs(), (80, 90), workers=2)))
        """,
        timeout=4 * 3600,
    )
    assert {r["head_dim"] for r in rows} == {72, 64, 128, None}
    _assert_clean(rows)


_BAD_CONFIGS = """
    import json
    import torch
    from e2ed2.kernels import static_check as sc
    from e2ed2.kernels._triton import tile_configs
    from e2ed2.kernels.attention import launcher as attn
    from e2ed2.kernels.embedding import launcher as emb

    rows = []
    # 1. A tile that overflows shared memory on both GPUs: 8 pipeline stages of 128 keys x 128
    #    columns of K and V (bf16) are 512 KiB.
    attn._attn_fwd.configs = tile_configs([(64, 128, 4, 8)])
    launches = sc.attention_launches(128, "bf16", 1024, 1024, False)
    fwd = [j for launch in launches[:1] for j in sc.expand_launch(launch, {"case": "oversized",
           "head_dim": 128, "dtype": "bf16", "op": "attention"})]
    rows += sc.run_jobs(fwd, (80, 90))

    # 2. An unaligned W1 (a view 3 elements into a flat buffer, as a flat-parameter layout could
    #    give) handed to the kernel without the launcher's copy fallback.
    w1 = torch.empty(1152 * 256 + 3, device="meta", dtype=torch.bfloat16)[3:].view(1152, 256)
    args = (torch.empty(8, device="meta"), torch.empty(128, device="meta"), w1,
            torch.empty(1152, device="meta", dtype=torch.bfloat16), 1.0, True)
    labels = {"case": "unaligned W1", "head_dim": None, "dtype": "bf16", "op": "embedding"}
    with sc.capture_launches() as with_fallback:
        emb.temb_forward_first(*args)
    emb.aligned_for_kernel = lambda x: x
    emb.check_aligned = lambda **tensors: None
    with sc.capture_launches() as without_fallback:
        emb.temb_forward_first(*args)
    ok = sc.expand_launch(with_fallback[0], labels)
    assert ok[0].contract_violations == [], ok[0].contract_violations
    rows += sc.run_jobs(sc.expand_launch(without_fallback[0], labels), (80,))
    print(json.dumps(rows))
"""


def test_check_fails_on_bad_configs():
    rows = _compile_rows(_BAD_CONFIGS)
    oversized = [r for r in rows if r["case"] == "oversized"]
    assert {r["arch"] for r in oversized} == {80, 90}
    for r in oversized:
        assert r["shared"] > 227 * 1024
        assert any("shared memory" in p for p in r["problems"]), r["problems"]
    (unaligned,) = [r for r in rows if r["case"] == "unaligned W1"]
    assert any(
        "alignment contract: W1 is not 16-byte aligned" in p for p in unaligned["problems"]
    ), unaligned["problems"]


def test_contract_violations_found_without_compiling():
    """Launch capture and the contract check alone (no compile): an unaligned head stride."""
    script = """
        import json
        import torch
        from e2ed2.kernels import static_check as sc
        from e2ed2.kernels.attention import launcher

        # (B, N, H*D + 4) projections sliced to H*D: row stride 1156 is not a multiple of 8.
        buf = torch.empty(2, 64, 16 * 72 + 4, device="meta", dtype=torch.float16)
        q = buf[..., : 16 * 72].view(2, 64, 16, 72).transpose(1, 2)
        found = {}
        for name, fallback in (("with", True), ("without", False)):
            if not fallback:
                launcher.aligned_for_kernel = lambda x: x
                launcher.check_aligned = lambda **tensors: None
            with sc.capture_launches() as launches:
                launcher.flash_forward(q, q, q, None, 0.1)
            (job,) = sc.expand_launch(launches[0], {}, max_configs=1)
            found[name] = job.contract_violations
        print(json.dumps(found))
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["with"] == []
    assert "stride_qn=1156 is not a multiple of 8" in found["without"]
    assert "stride_kn=1156 is not a multiple of 8" in found["without"]


def test_occupancy_model():
    from e2ed2.kernels.static_check import GPU_LIMITS, blocks_per_sm

    a100 = GPU_LIMITS[80]
    # 255 registers round up to 256 per thread: 4 warps use 32768 of 65536 -> 2 blocks.
    assert blocks_per_sm(255, 4, 0, a100)["by_regs"] == 2
    assert blocks_per_sm(128, 4, 0, a100)["by_regs"] == 4
    # 60 KiB of shared memory (+1 KiB reserved each) -> 2 blocks in 164 KiB.
    assert blocks_per_sm(64, 4, 60 * 1024, a100)["by_shared"] == 2
    assert blocks_per_sm(64, 8, 0, a100)["by_warps"] == 8
    assert blocks_per_sm(255, 8, 60 * 1024, a100)["blocks"] == 1
