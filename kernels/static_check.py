"""Ahead-of-time compile report for the Triton kernels: registers, spills, shared memory, loads.

No GPU and no driver are needed. The project's own launchers run on ``meta`` tensors of the real
(PixArt-α XL/2) shapes inside :func:`capture_launches`, which records every kernel launch
(kernel object, positional arguments, keyword arguments) instead of running it. Each record is
then expanded the way Triton's runtime would expand it on a GPU: over every autotune config
(after the autotuner's ``early_config_prune``, if any), through the ``triton.heuristics``
values, and specialized argument by argument with Triton's own ``native_specialize_impl``
(pointers 16-byte aligned or not, integers divisible by 16, integers equal to 1). The result is
compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``, which
runs the ``ptxas`` bundled in the triton wheel; ``cuobjdump`` (also bundled) disassembles the
cubin. Per compile this records:

* ``regs``, ``spill_stores`` / ``spill_loads`` / ``stack`` (bytes), from ptxas' ``-v`` log;
* ``shared``: the dynamic shared memory the launch needs (Triton's metadata);
* global loads in the PTX by width (``ld.global.b16`` = 16 bits, ``ld.global.v4.b32`` = 128),
  ``cp.async`` copies by size (16 bytes = one 128-bit vector), the same in the SASS
  (``LDG.E.128``, ``LDGSTS.E.BYPASS.128``), tensor-core instructions, and whether the TTIR
  has a loop (``scf.for``);
* ``problems``: the checks of :func:`problems` (spills, shared memory over the GPU's limit,
  un-vectorized 16-bit tile loads, a loop with ``num_stages > 1`` that is not pipelined,
  launch arguments that break the kernel's alignment contract).

Compiles are cached on disk (``~/.cache/e2ed2/static_check`` or ``$E2ED2_STATIC_CHECK_CACHE``),
keyed by the kernel's source hash (Triton's ``JITFunction.cache_key``, which covers the jit
helpers it calls) plus signature, constexprs, attributes, options, target and Triton version,
so a re-run only compiles what changed.

Run as ``python -m e2ed2.kernels.static_check`` (or ``benchmarks/bench_kernel_static.py`` for the
full report). ``TRITON_INTERPRET`` must be unset: under the interpreter ``@triton.jit`` builds
no compilable functions.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
import triton
from triton import knobs
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner, Heuristics
from triton.runtime.jit import JITFunction, native_specialize_impl

__all__ = [
    "GPU_LIMITS",
    "CompileJob",
    "GpuLimits",
    "Launch",
    "capture_launches",
    "compile_job",
    "expand_launch",
    "problems",
    "run_jobs",
]

ANALYSIS_VERSION = 2  # bump when the recorded fields change (invalidates the disk cache)


# --------------------------------------------------------------------------------------------
# Hardware limits
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GpuLimits:
    """Per-SM and per-block limits of one compute capability (CUDA programming guide, table 21)."""

    name: str
    max_shared_per_block: int  # bytes, the opt-in maximum of dynamic shared memory per block
    shared_per_sm: int  # bytes of shared memory per SM (the carve-out maximum)
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    # Shared memory the system reserves per resident block (1 KiB since sm_80).
    reserved_shared_per_block: int = 1024


GPU_LIMITS: dict[int, GpuLimits] = {
    80: GpuLimits("A100 (sm_80)", max_shared_per_block=163 * 1024, shared_per_sm=164 * 1024),
    90: GpuLimits("H100 (sm_90)", max_shared_per_block=227 * 1024, shared_per_sm=228 * 1024),
}


def blocks_per_sm(regs: int, num_warps: int, shared: int, limits: GpuLimits) -> dict[str, int]:
    """Resident blocks per SM allowed by registers, shared memory and warps (the minimum wins).

    Registers are allocated per warp in units of 256 (8 per thread), as the occupancy calculator
    does.
    """
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = limits.regs_per_sm // (regs_per_warp * num_warps)
    by_shared = limits.shared_per_sm // (shared + limits.reserved_shared_per_block)
    by_warps = limits.max_warps_per_sm // num_warps
    return {
        "by_regs": by_regs,
        "by_shared": by_shared,
        "by_warps": by_warps,
        "blocks": min(by_regs, by_shared, by_warps, limits.max_blocks_per_sm),
    }


# --------------------------------------------------------------------------------------------
# Capturing launches
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Launch:
    """One kernel launch as the launcher made it (grid not recorded: it does not affect code)."""

    kernel: Any  # an Autotuner, Heuristics or JITFunction
    args: tuple
    kwargs: dict


@contextlib.contextmanager
def capture_launches() -> Iterator[list[Launch]]:
    """Record instead of running every Triton launch made inside the block.

    ``kernel[grid](*args, **kwargs)`` ends in the outermost object's ``run``; patching ``run`` of
    the three classes a launcher can hold (autotuner, heuristics, plain jit function) catches
    every launch, whatever the launcher's structure. Launchers run unchanged on ``meta`` tensors
    (they only allocate outputs), so the shapes can be full size at no cost.
    """
    launches: list[Launch] = []
    saved = {cls: cls.run for cls in (Autotuner, Heuristics, JITFunction)}

    def record(self, *args, **kwargs):
        kwargs.pop("grid", None)
        kwargs.pop("warmup", None)
        launches.append(Launch(self, args, kwargs))

    try:
        for cls in saved:
            cls.run = record
        yield launches
    finally:
        for cls, run in saved.items():
            cls.run = run


# --------------------------------------------------------------------------------------------
# Expanding a launch into compile jobs (what the runtime would compile on a GPU)
# --------------------------------------------------------------------------------------------

# Launch options (not kernel parameters) that change the generated code.
_OPTION_NAMES = ("num_warps", "num_stages", "num_ctas", "maxnreg")


@dataclasses.dataclass
class CompileJob:
    """Everything ``triton.compile`` needs, in picklable form, plus labels for the report."""

    fn_module: str
    fn_name: str
    signature: dict[str, str]
    constexprs: dict[str, Any]
    attrs: dict[int, list]  # parameter index -> [["tt.divisibility", 16]]
    options: dict[str, int]
    labels: dict[str, Any]
    # Arguments that break the kernel's alignment contract (filled by expand_launch).
    contract_violations: list[str] = dataclasses.field(default_factory=list)

    def jit_function(self) -> JITFunction:
        fn = getattr(importlib.import_module(self.fn_module), self.fn_name)
        if not isinstance(fn, JITFunction):
            raise TypeError(
                f"{self.fn_module}.{self.fn_name} is not a compilable JITFunction (is "
                "TRITON_INTERPRET set? the static check needs it unset)"
            )
        return fn

    def key(self, arch: int) -> str:
        fn = self.jit_function()
        payload = json.dumps(
            [
                ANALYSIS_VERSION,
                triton.__version__,
                arch,
                fn.cache_key,
                self.signature,
                {k: repr(v) for k, v in self.constexprs.items()},
                sorted((str(k), v) for k, v in self.attrs.items()),
                self.options,
            ],
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _innermost_jit(kernel: Any) -> JITFunction:
    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def _specialize(fn: JITFunction, bound: dict[str, Any]) -> tuple[dict, dict, dict]:
    """``(signature, constexprs, attrs)`` exactly as ``JITFunction.run`` would derive them."""
    signature: dict[str, str] = {}
    constexprs: dict[str, Any] = {}
    attrs: dict[int, list] = {}
    for index, param in enumerate(fn.params):
        value = bound[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
            continue
        ty, spec = native_specialize_impl(
            BaseBackend,
            value,
            param.is_const,
            not param.do_not_specialize,
            not param.do_not_specialize_on_alignment,
        )
        if param.annotation_type:
            ty = param.annotation_type
        if ty == "constexpr":  # integers equal to 1 (and None) become compile-time constants
            signature[param.name] = "constexpr"
            constexprs[param.name] = spec
            continue
        signature[param.name] = ty
        if isinstance(spec, str) and "D" in spec:
            attrs[index] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _bind(fn: JITFunction, args: tuple, kwargs: dict) -> tuple[dict[str, Any], dict[str, int]]:
    """Kernel parameters (defaults applied) and launch options from one call."""
    names = [p.name for p in fn.params]
    bound = dict(zip(names, args, strict=False))
    options = {}
    for key, value in kwargs.items():
        if key in names:
            bound[key] = value
        elif key in _OPTION_NAMES and value is not None:
            options[key] = value
    for param in fn.params:
        if param.name not in bound:
            if not param.has_default:
                raise TypeError(f"{fn.__name__}: no value for parameter {param.name!r}")
            bound[param.name] = param.default
    return bound, options


def alignment_contract(fn: JITFunction) -> dict[str, Any] | None:
    """The alignment a kernel assumes of its arguments (``ALIGNMENT`` in its module), or None.

    ``{"pointer_bytes": 16, "stride_elements": 8, "pointers": (...)}``: the named pointer
    arguments (all tensors if absent) 16-byte aligned and every ``stride_*`` argument a multiple
    of 8 elements (what the kernel's ``tl.multiple_of`` hints promise the compiler).
    """
    return getattr(sys.modules.get(fn.fn.__module__), "ALIGNMENT", None)


def _contract_violations(fn: JITFunction, bound: dict[str, Any]) -> list[str]:
    contract = alignment_contract(fn)
    if not contract:
        return []
    pointers = contract.get("pointers")
    bad = []
    for param in fn.params:
        value = bound[param.name]
        if isinstance(value, torch.Tensor) and (pointers is None or param.name in pointers):
            offset = value.storage_offset() * value.element_size()
            # Meta tensors have no address; their storage offset is what a real view would add
            # to a (256-byte aligned) allocation.
            address = offset if value.device.type == "meta" else value.data_ptr()
            if address % contract["pointer_bytes"]:
                bad.append(f"{param.name} is not {contract['pointer_bytes']}-byte aligned")
        elif (
            param.name.startswith("stride_")
            and isinstance(value, int)
            and value % contract["stride_elements"]
        ):
            bad.append(f"{param.name}={value} is not a multiple of {contract['stride_elements']}")
    return bad


def expand_launch(
    launch: Launch, labels: dict[str, Any], max_configs: int | None = None
) -> list[CompileJob]:
    """The compile jobs one launch implies: one per autotune config (after pruning).

    ``max_configs``: only the first N configs (the launchers list their preferred one first).
    """
    kernel = launch.kernel
    fn = _innermost_jit(kernel)
    names = [p.name for p in fn.params]
    if isinstance(kernel, Autotuner):
        nargs = dict(zip(kernel.arg_names, launch.args, strict=False))
        configs = kernel.configs
        if kernel.early_config_prune:
            configs = kernel.early_config_prune(configs, nargs, **launch.kwargs)
        configs = configs[:max_configs]
        variants = [({**launch.kwargs, **config.all_kwargs()}, config) for config in configs]
        inner = kernel.fn
    else:
        variants = [(dict(launch.kwargs), None)]
        inner = kernel
    jobs = []
    for kwargs, config in variants:
        layer = inner
        while isinstance(layer, Heuristics):
            for name, heuristic in layer.values.items():
                kwargs[name] = heuristic({**dict(zip(names, launch.args, strict=False)), **kwargs})
            layer = layer.fn
        bound, options = _bind(fn, launch.args, kwargs)
        options.setdefault("num_warps", 4)
        options.setdefault("num_stages", 3)
        signature, constexprs, attrs = _specialize(fn, bound)
        meta = {k: v for k, v in config.kwargs.items()} if config is not None else {}
        tiles = " ".join(f"{k.replace('BLOCK_', '')}{v}" for k, v in meta.items())
        jobs.append(
            CompileJob(
                fn_module=fn.fn.__module__,
                fn_name=fn.__name__,
                signature=signature,
                constexprs=constexprs,
                attrs=attrs,
                options=options,
                labels={
                    **labels,
                    "kernel": fn.__name__,
                    "config": f"{tiles} w{options['num_warps']} s{options['num_stages']}".strip(),
                },
                contract_violations=_contract_violations(fn, bound),
            )
        )
    return jobs


# --------------------------------------------------------------------------------------------
# Compiling and reading the code
# --------------------------------------------------------------------------------------------

_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)
_PTX_LOAD = re.compile(r"\bld\.global((?:\.[\w:]+)*)\s")
# cp.async.cg.shared.global [dst], [src], 0x10, %src_size;  (copy size in bytes, hex or decimal)
_PTX_CP_ASYNC = re.compile(
    r"\bcp\.async\.c[ag]\.shared\.global(?:\.[\w:]+)*\s+\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)"
)
_SASS_LOAD = re.compile(r"\b(LDG|LDGSTS)((?:\.[A-Z0-9_]+)*)")
_TYPE_BITS = re.compile(r"^[bfsu](8|16|32|64)$|^bf16$")


def _ptx_load_bits(suffix: str) -> int:
    """Bits moved by one ``ld.global<suffix>``: vector count times element width."""
    vector, bits = 1, 32
    for part in suffix.strip(".").split("."):
        if part in ("v2", "v4", "v8"):
            vector = int(part[1:])
        elif _TYPE_BITS.match(part):
            bits = 16 if part == "bf16" else int(part[1:])
    return vector * bits


def _sass_load_bits(suffix: str) -> int:
    for part in suffix.strip(".").split("."):
        if part in ("128", "64"):
            return int(part)
        if part in ("U16", "S16"):
            return 16
        if part in ("U8", "S8"):
            return 8
    return 32


def _analyze_code(ptx: str, sass: str, ttir: str) -> dict[str, Any]:
    ptx_loads = Counter(_ptx_load_bits(m.group(1)) for m in _PTX_LOAD.finditer(ptx))
    cp_async = Counter(int(m.group(1), 0) for m in _PTX_CP_ASYNC.finditer(ptx))
    sass_ldg: Counter = Counter()
    sass_ldgsts: Counter = Counter()
    for m in _SASS_LOAD.finditer(sass):
        (sass_ldg if m.group(1) == "LDG" else sass_ldgsts)[_sass_load_bits(m.group(2))] += 1
    return {
        "ptx_global_loads_by_bits": {str(k): v for k, v in sorted(ptx_loads.items())},
        "ptx_ld128": ptx_loads.get(128, 0),
        "ptx_ld16": ptx_loads.get(16, 0),
        "ptx_cp_async_by_bytes": {str(k): v for k, v in sorted(cp_async.items())},
        "ptx_cp_async": sum(cp_async.values()),
        "ptx_cp_async16": cp_async.get(16, 0),
        "ptx_cp_async_bulk": len(re.findall(r"\bcp\.async\.bulk", ptx)),
        "ptx_mma": len(re.findall(r"\bmma\.sync", ptx)),
        "ptx_wgmma": len(re.findall(r"\bwgmma\.mma_async", ptx)),
        "sass_ldg_by_bits": {str(k): v for k, v in sorted(sass_ldg.items())},
        "sass_ldgsts_by_bits": {str(k): v for k, v in sorted(sass_ldgsts.items())},
        "sass_ldg128": sass_ldg.get(128, 0),
        "sass_ldgsts128": sass_ldgsts.get(128, 0),
        "has_loop": "scf.for" in ttir,
    }


def _bundled_tool(name: str) -> str | None:
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.exists() else None


def _sass(cubin: bytes) -> str:
    tool = _bundled_tool("cuobjdump")
    if tool is None:
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        result = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True)
    return result.stdout


def default_cache_dir() -> Path:
    env = os.environ.get("E2ED2_STATIC_CHECK_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "e2ed2" / "static_check"


def compile_job(job: CompileJob, arch: int, cache_dir: Path | None = None) -> dict[str, Any]:
    """Compile one job for ``sm_<arch>`` (or read it from the disk cache): the recorded stats."""
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    key = job.key(arch)
    path = cache_dir / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    fn = job.jit_function()
    src = ASTSource(
        fn=fn,
        signature=job.signature,
        constexprs=job.constexprs,
        attrs={(index,): value for index, value in job.attrs.items()},
    )
    log = io.StringIO()
    # Triton prints the ptxas -v log only when it runs ptxas, so skip its own cache.
    with (
        knobs.nvidia.scope(),
        knobs.compilation.scope(),
        knobs.cache.scope(),
        contextlib.redirect_stdout(log),
    ):
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True
        knobs.cache.dir = str(cache_dir / "triton")
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=job.options)
    text = log.getvalue()
    regs = _PTXAS_REGS.search(text)
    spills = _PTXAS_SPILLS.search(text)
    stats = {
        "regs": int(regs.group(1)) if regs else None,
        "stack": int(spills.group(1)) if spills else 0,
        "spill_stores": int(spills.group(2)) if spills else 0,
        "spill_loads": int(spills.group(3)) if spills else 0,
        "shared": int(compiled.metadata.shared),
        "num_warps": int(compiled.metadata.num_warps),
        "num_stages": int(job.options.get("num_stages", 3)),
        **_analyze_code(compiled.asm["ptx"], _sass(compiled.asm["cubin"]), compiled.asm["ttir"]),
    }
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(stats))
    tmp.replace(path)
    return stats


def _compile_worker(item: tuple[CompileJob, int, str]) -> dict[str, Any]:
    job, arch, cache_dir = item
    return compile_job(job, arch, Path(cache_dir))


def run_jobs(
    jobs: list[CompileJob],
    archs: tuple[int, ...] = (80, 90),
    *,
    cache_dir: Path | None = None,
    workers: int = 1,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Compile every job for every arch (unique compiles once); one row per (job, arch)."""
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    unique: dict[str, tuple[CompileJob, int]] = {}
    pairs = []
    for job in jobs:
        for arch in archs:
            key = job.key(arch)
            unique.setdefault(key, (job, arch))
            pairs.append((key, job, arch))
    keys = list(unique)
    items = [(unique[k][0], unique[k][1], str(cache_dir)) for k in keys]
    stats: dict[str, dict] = {}
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            for i, (key, result) in enumerate(
                zip(keys, pool.map(_compile_worker, items), strict=True)
            ):
                stats[key] = result
                if progress:
                    progress(f"[{i + 1}/{len(keys)}] {items[i][0].labels} sm_{items[i][1]}")
    else:
        for i, (key, item) in enumerate(zip(keys, items, strict=True)):
            stats[key] = _compile_worker(item)
            if progress:
                progress(f"[{i + 1}/{len(keys)}] {item[0].labels} sm_{item[1]}")
    rows = []
    for key, job, arch in pairs:
        row = {**job.labels, "arch": arch, "gpu": GPU_LIMITS[arch].name, "key": key, **stats[key]}
        row["blocks_per_sm"] = blocks_per_sm(
            row["regs"] or 0, row["num_warps"], row["shared"], GPU_LIMITS[arch]
        )
        row["contract_violations"] = list(job.contract_violations)
        row["problems"] = problems(row, GPU_LIMITS[arch])
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def problems(row: dict[str, Any], limits: GpuLimits) -> list[str]:
    """What is wrong with one compiled config on one GPU (empty = clean).

    * any register spill (local-memory traffic in the inner loop);
    * dynamic shared memory over the per-block maximum (the launch would fail);
    * registers x threads over the SM's register file (the launch would fail);
    * for 16-bit inputs (``labels["dtype"]`` fp16/bf16): any 16-bit-wide global load (a tile read
      two bytes at a time; tile loads must be 128-bit vectors or 16-byte ``cp.async``), and no
      128-bit load or copy at all;
    * a loop compiled with ``num_stages > 1`` but no ``cp.async`` (the software pipeline did not
      happen, so each iteration waits for its own loads);
    * launch arguments that break the kernel's alignment contract (its hints would be lies).
    """
    found = []
    if row["spill_stores"] or row["spill_loads"]:
        found.append(
            f"spills {row['spill_stores']} B stores / {row['spill_loads']} B loads "
            f"({row['regs']} registers)"
        )
    if row["shared"] > limits.max_shared_per_block:
        found.append(f"shared memory {row['shared']} B > {limits.max_shared_per_block} B per block")
    regs_per_warp = -(-(row["regs"] or 0) * 32 // 256) * 256
    if regs_per_warp * row["num_warps"] > limits.regs_per_sm:
        found.append(f"{row['regs']} registers x {row['num_warps']} warps exceed the register file")
    if row.get("dtype") in ("fp16", "bf16"):
        if row["ptx_ld16"]:
            found.append(f"{row['ptx_ld16']} scalar 16-bit global loads (tile not vectorized)")
        if not (row["ptx_ld128"] or row["ptx_cp_async16"]):
            found.append("no 128-bit global load or 16-byte cp.async")
    if row["has_loop"] and row["num_stages"] > 1 and not row["ptx_cp_async"]:
        found.append(f"loop not pipelined: num_stages={row['num_stages']} but no cp.async")
    found.extend(f"alignment contract: {v}" for v in row.get("contract_violations", []))
    return found


# --------------------------------------------------------------------------------------------
# The project's launches at PixArt-α XL/2 shapes
# --------------------------------------------------------------------------------------------

HEADS = 16
TEXT_TOKENS = 120
HIDDEN = 1152  # PixArt-α XL/2 hidden size (16 heads x 72)
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _launchers() -> dict[str, Callable]:
    """The launchers under test (the one place that names the kernels' internal modules)."""
    attention = importlib.import_module("e2ed2.kernels.attention.launcher")
    embedding = importlib.import_module("e2ed2.kernels.embedding.launcher")
    return {
        "attn_forward": attention.flash_forward,
        "attn_backward": attention.flash_backward,
        "temb_forward": embedding.temb_forward_first,
        "temb_backward": embedding.temb_backward_first,
    }


def _bnhd_view(batch: int, tokens: int, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """``(B, H, N, D)`` view of a ``(B, N, H*D)`` projection, as the attention processor passes."""
    flat = torch.empty(batch, tokens, HEADS * head_dim, device="meta", dtype=dtype)
    return flat.view(batch, tokens, HEADS, head_dim).transpose(1, 2)


def attention_launches(
    head_dim: int, dtype: str, n_q: int, n_k: int, masked: bool, *, batch: int = 8
) -> list[Launch]:
    """Forward + backward launches of one attention call (PixArt layout, meta tensors)."""
    launch = _launchers()
    dt = _DTYPES[dtype]
    q = _bnhd_view(batch, n_q, head_dim, dt)
    k = _bnhd_view(batch, n_k, head_dim, dt)
    v = _bnhd_view(batch, n_k, head_dim, dt)
    keep = torch.empty(batch, n_k, device="meta", dtype=torch.uint8) if masked else None
    scale = head_dim**-0.5
    with capture_launches() as launches:
        launch["attn_forward"](q, k, v, keep, scale)
    o = torch.empty_like(q)
    lse = torch.empty(batch, HEADS, n_q, device="meta", dtype=torch.float32)
    do = torch.empty_like(q)
    with capture_launches() as backward:
        launch["attn_backward"](do, q, k, v, o, lse, keep, scale)
    return launches + backward


def timestep_launches(dtype: str, *, batch: int = 8, channels: int = 256) -> list[Launch]:
    """Forward + backward launches of PixArt-α's fused timestep embedding (256 -> 1152)."""
    launch = _launchers()
    dt = _DTYPES[dtype]
    t = torch.empty(batch, device="meta", dtype=torch.float32)
    freqs = torch.empty(channels // 2, device="meta", dtype=torch.float32)
    w1 = torch.empty(HIDDEN, channels, device="meta", dtype=dt)
    b1 = torch.empty(HIDDEN, device="meta", dtype=dt)
    dh = torch.empty(batch, HIDDEN, device="meta", dtype=dt)
    with capture_launches() as launches:
        launch["temb_forward"](t, freqs, w1, b1, 1.0, True)
        launch["temb_backward"](dh, t, freqs, w1, b1, 1.0, True)
    return launches


# The sweep: PixArt-α XL/2 (16 heads x 72), plus D = 64 and 128 for comparison; self-attention
# at 512 px (1024 tokens) and 1024 px (4096 tokens), cross-attention to 120 padded text tokens.
ATTENTION_CASES = (
    ("self 1024", 1024, 1024, False),
    ("self 4096", 4096, 4096, False),
    ("cross 4096x120 masked", 4096, TEXT_TOKENS, True),
)


def pixart_jobs(
    head_dims: tuple[int, ...] = (72, 64, 128),
    dtypes: tuple[str, ...] = ("bf16", "fp16"),
    cases: tuple[tuple[str, int, int, bool], ...] = ATTENTION_CASES,
    timestep: bool = True,
    max_configs: int | None = None,
) -> list[CompileJob]:
    """Every compile the launchers imply at PixArt-α shapes (see ATTENTION_CASES)."""
    jobs = []
    for dtype in dtypes:
        for head_dim in head_dims:
            for case, n_q, n_k, masked in cases:
                labels = {"op": "attention", "case": case, "head_dim": head_dim, "dtype": dtype}
                for launch in attention_launches(head_dim, dtype, n_q, n_k, masked):
                    jobs.extend(expand_launch(launch, labels, max_configs))
        if timestep:
            labels = {"op": "timestep_embedding", "case": "B=8 256->1152", "dtype": dtype}
            for launch in timestep_launches(dtype):
                jobs.extend(expand_launch(launch, {**labels, "head_dim": None}))
    return jobs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[72, 64, 128])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"])
    parser.add_argument("--archs", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--cases", nargs="+", default=None, help="subset of case names")
    parser.add_argument("--no-timestep", action="store_true")
    parser.add_argument("--max-configs", type=int, default=None)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET"):
        print("static_check: unset TRITON_INTERPRET (the interpreter compiles nothing)")
        return 2
    cases: tuple[tuple[str, int, int, bool], ...] = ATTENTION_CASES
    if args.cases:
        cases = tuple(c for c in ATTENTION_CASES if c[0] in args.cases)
    jobs = pixart_jobs(
        tuple(args.head_dims), tuple(args.dtypes), cases, not args.no_timestep, args.max_configs
    )
    rows = run_jobs(
        jobs,
        tuple(args.archs),
        cache_dir=args.cache_dir,
        workers=args.workers,
        progress=None if args.quiet else lambda s: print(s, file=sys.stderr, flush=True),
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    bad = [r for r in rows if r["problems"]]
    for r in bad:
        print(
            f"{r['kernel']} {r['case']} D={r['head_dim']} {r['dtype']} sm_{r['arch']} "
            f"[{r['config']}]: " + "; ".join(r["problems"])
        )
    print(f"{len(rows)} compiled configs, {len(bad)} with problems")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
