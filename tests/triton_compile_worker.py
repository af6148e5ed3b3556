"""Compile the project's Triton and Gluon kernels for sm_90 (H100 / H200) without a GPU.

Run as a script in a process without TRITON_INTERPRET (under the
interpreter, @triton.jit and Triton's own library give interpreted functions
that cannot be compiled).  Prints one JSON object: case name -> "ok" or the
compiler's error.  Used by tests/test_kernel_compile.py.

    python tests/triton_compile_worker.py --sass-digest [case ...]

adds "sass_digest": case -> a digest of the compiled machine code's
instructions (nvdisasm's listing without addresses, line tables or
comments): a change to a kernel's source that leaves its digests as they
were leaves the code the GPU runs as it was, which can be checked on a
machine without one.
"""

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fox_megatron.kernels.forgetting_attn import triton_ops  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
# the last compiled kernel's cubin (for --sass-digest)
COMPILED = {}

# pointer element types by argument name; other upper-case names are int32
# tables, lower-case ones int32 scalars except the softmax scales
FP32_POINTERS = {"CQ", "CK", "LSE", "DLT", "THR", "DCQ", "DCK", "DQA", "X", "Y", "OUT"}
ACTIVATIONS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
INT_SCALARS_UPPER = {"T", "H", "SEARCH_STEPS_N", "SEARCH_STEPS_M"}
FLOAT_SCALARS = {"scale", "scale2"}


def signature(kernel, act, fp32_outputs=(), fp64_pointers=()):
    sig = {}
    for p in kernel.params:
        if p.is_constexpr:
            continue
        name = p.name
        if name in FLOAT_SCALARS:
            sig[name] = "fp32"
        elif name in INT_SCALARS_UPPER or not name.isupper():
            sig[name] = "i32"
        elif name in fp64_pointers:
            sig[name] = "*fp64"
        elif name in FP32_POINTERS or name in fp32_outputs:
            sig[name] = "*fp32"
        elif name in ACTIVATIONS:
            sig[name] = act
        else:
            sig[name] = "*i32"
    return sig


def compile_kernel(kernel, constexprs, num_warps=4, num_stages=2, act="*bf16", fp32_outputs=(), fp64_pointers=()):
    sig = {**signature(kernel, act, fp32_outputs, fp64_pointers), **{name: "constexpr" for name in constexprs}}
    src = ASTSource(fn=kernel, signature=sig,
                    constexprs={(kernel.arg_names.index(n),): v for n, v in constexprs.items()})
    out = triton.compile(src, target=HOPPER, options={"num_warps": num_warps, "num_stages": num_stages})
    if "cubin" not in out.asm:
        raise RuntimeError(f"no cubin produced (stages: {sorted(out.asm)})")
    COMPILED["cubin"] = out.asm["cubin"]
    # float64 instructions in the PTX (precise decays only)
    return sum(".f64" in line for line in out.asm["ptx"].splitlines())


def compile_gluon(kernel, constexprs, num_warps, maxnreg, desc_block, act="bf16", fp64_pointers=(),
                  desc_dtypes=None, desc_blocks=None):
    """A Gluon kernel (gluon_fwd.py / gluon_bwd.py): its *_desc arguments
    are TMA descriptors of desc_block tiles (desc_blocks: others by name)
    with the launch's shared layout, of act elements unless desc_dtypes
    names another."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    sig = {}
    plain = signature(kernel, f"*{act}", fp64_pointers=fp64_pointers)
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_desc"):
            dt = (desc_dtypes or {}).get(name, act)
            block = list((desc_blocks or {}).get(name, desc_block))
            layout = gl.NVMMASharedLayout.get_default_for(
                block, getattr(gl, {"bf16": "bfloat16", "fp32": "float32"}[dt]))
            sig[name] = f"tensordesc<{dt}{block},{layout!r}>"
        else:
            sig[name] = plain[name]
    src = GluonASTSource(kernel, sig, {(kernel.arg_names.index(n),): v for n, v in constexprs.items()})
    out = triton.compile(src, target=HOPPER, options={"num_warps": num_warps, "maxnreg": maxnreg})
    if "cubin" not in out.asm:
        raise RuntimeError(f"no cubin produced (stages: {sorted(out.asm)})")
    COMPILED["cubin"] = out.asm["cubin"]
    return sum(".f64" in line for line in out.asm["ptx"].splitlines())


def gluon_fwd_case(module, head_dim, group, acp):
    """(constexprs, compile_gluon options) of the forward kernel of module
    (gluon_fwd.py, or a patched copy of it) as launch_fwd runs it: two
    partitions of 4 MMA warps (ping-pong) and the load warp."""
    bm, bn, _, stages = module.CONFIGS[head_dim]
    abm, abn = triton_ops.fwd_blocks(head_dim, torch.bfloat16)
    consts = dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=True, USE_ACP=acp,
                  STAGES=stages, ACP_BLOCK_M=abm, ACP_BLOCK_N=abn, ORDERED=acp, num_warps=4)
    return consts, dict(num_warps=4, maxnreg=module.MAXNREG, desc_block=(bn, head_dim),
                        desc_blocks={"q_desc": (bm, head_dim)})


def gluon_dkdv_case(module, head_dim, fused, group, acp):
    """(constexprs, compile_gluon options) of the dK / dV kernel of module
    (gluon_bwd.py, or a patched copy of it), with the dQ pass fused in or
    not, as launch_dkdv runs it."""
    bm, bn, warps, stages = module.CONFIGS[head_dim]
    abm, abn = triton_ops.kernel_config("dkdv", head_dim, torch.bfloat16)[:2]
    consts = dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=True, USE_ACP=acp,
                  STAGES=stages, ACP_BLOCK_M=abm, ACP_BLOCK_N=abn, FUSED_DQ=fused, ORDERED=acp, num_warps=warps)
    return consts, dict(num_warps=warps, maxnreg=module.MAXNREG, desc_block=(bm, head_dim),
                        desc_dtypes={n: "fp32" if fused else "bf16" for n in ("dqa_desc", "dcq_desc")},
                        desc_blocks={"dcq_desc": (bm, 16 if fused else head_dim),
                                     "k_desc": (bn, head_dim), "v_desc": (bn, head_dim)})


def gluon_cases():
    from fox_megatron.kernels.forgetting_attn import gluon_bwd, gluon_fwd

    for precise in ("", "_precise"):
        f64 = dict(fp64_pointers=("CQ", "CK")) if precise else {}
        for head_dim in gluon_fwd.CONFIGS:
            consts, opts = gluon_fwd_case(gluon_fwd, head_dim, group=2, acp=True)
            yield (f"gluon_fwd{precise}_d{head_dim}", gluon_fwd._fwd_kernel_sm90_pingpong, consts, dict(opts, **f64))
            yield (f"gluon_fwd_persistent{precise}_d{head_dim}", gluon_fwd._fwd_kernel_sm90_persistent, consts,
                   dict(opts, **f64))
        for head_dim in gluon_bwd.CONFIGS:
            for fused in (False, True):  # with the dQ pass fused in
                consts, opts = gluon_dkdv_case(gluon_bwd, head_dim, fused, group=2, acp=True)
                yield (f"gluon_dkdv{'_dq' if fused else ''}{precise}_d{head_dim}", gluon_bwd._dkdv_kernel_sm90,
                       consts, dict(opts, **f64))
            for group in (1, 2):  # one head per key / value head: the head loop folds away
                consts, opts = gluon_dkdv_case(gluon_bwd, head_dim, False, group=group, acp=True)
                consts.pop("FUSED_DQ")
                yield (f"gluon_dkdv_persistent{'_group1' if group == 1 else ''}{precise}_d{head_dim}",
                       gluon_bwd._dkdv_kernel_sm90_persistent, consts, dict(opts, **f64))


def cases():
    t = triton_ops
    for causal in (True, False):
        yield (f"boundary_causal={causal}", t._acp_boundary_kernel,
               dict(BLOCK_M=128, BLOCK_N=64, LANES=t._BOUNDARY_LANES, CAUSAL=causal,
                    DO_KBLO=True, DO_QBHI=True, DO_COUNT=True, QB_BLOCK_M=32, QB_BLOCK_N=128), {})
    # precise decays: float64 c
    yield ("boundary_precise", t._acp_boundary_kernel,
           dict(BLOCK_M=128, BLOCK_N=64, LANES=t._BOUNDARY_LANES, CAUSAL=True,
                DO_KBLO=True, DO_QBHI=True, DO_COUNT=True, QB_BLOCK_M=32, QB_BLOCK_N=128),
           dict(fp64_pointers=("CQ", "CK")))
    for group in (1, 2):
        yield f"heavy_first_group{group}", t._heavy_first_kernel, dict(GROUP=group, BLOCK=128, CHUNK=64), {}
    yield "decay_scan", t._segmented_scan_kernel, dict(HAS_Y=False, REVERSE=False, BLOCK_T=t._SCAN_BLOCK), {}
    yield ("decay_scan_precise", t._segmented_scan_kernel, dict(HAS_Y=False, REVERSE=False, BLOCK_T=t._SCAN_BLOCK),
           dict(fp64_pointers=("OUT",)))
    yield "decay_grad", t._segmented_scan_kernel, dict(HAS_Y=True, REVERSE=True, BLOCK_T=t._SCAN_BLOCK), {}
    yield "row_delta", t._bwd_preprocess_kernel, dict(HEAD_DIM=128, BLOCK_T=64), {}
    kernels = {"fwd": t._fwd_kernel, "dkdv": t._dkdv_kernel, "dq": t._dq_kernel}
    # the context-parallel ring's variant: fp32 running output / dq, merged
    # or added to in the epilogue
    accumulates = {"fwd": "O", "dq": "DQ"}
    for kind, kernel in kernels.items():
        for head_dim in (64, 128):
            bm, bn, warps, stages = t.kernel_config(kind, head_dim, torch.bfloat16)
            consts = dict(GROUP=2, HEAD_DIM=head_dim, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=True, USE_ACP=True,
                          PRECISION="tf32", ORDERED=True)
            if kind in accumulates:
                consts["ACCUMULATE"] = False
            if kind == "dq":  # delta from o and do
                consts["DELTA_FROM_O"] = True
            yield f"{kind}_d{head_dim}", kernel, consts, dict(num_warps=warps, num_stages=stages)
            # precise decays: float64 c
            yield (f"{kind}_precise_d{head_dim}", kernel, consts,
                   dict(num_warps=warps, num_stages=stages, fp64_pointers=("CQ", "CK")))
            if kind in accumulates:
                acc_consts = {**consts, "CAUSAL": False, "ACCUMULATE": True, "ORDERED": False}
                if kind == "dq":  # the ring passes delta
                    acc_consts["DELTA_FROM_O"] = False
                yield (f"{kind}_accumulate_d{head_dim}", kernel, acc_consts,
                       dict(num_warps=warps, num_stages=stages, fp32_outputs=(accumulates[kind],)))
            if kind == "dkdv":  # the ring takes dK / dV in fp32
                yield (f"dkdv_fp32_grads_d{head_dim}", kernel, {**consts, "CAUSAL": False},
                       dict(num_warps=warps, num_stages=stages, fp32_outputs=("DK", "DV")))


def sass_digest(cubin: bytes) -> str:
    """Digest of a cubin's instructions as nvdisasm (Triton's copy) lists
    them, without addresses, line tables or comments."""
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        listing = subprocess.run([nvdisasm, f.name], capture_output=True, text=True, check=True).stdout
    code = [re.sub(r"/\*[0-9a-f]+\*/", "", line).strip() for line in listing.splitlines()
            if re.match(r"^\s+/\*[0-9a-f]{4,}\*/\s+[A-Z@{]", line)]
    return f"{hashlib.sha1(chr(10).join(code).encode()).hexdigest()[:16]}:{len(code)}"


def main():
    args = sys.argv[1:]
    digest = "--sass-digest" in args
    only = set(a for a in args if a != "--sass-digest")
    results = {"f64_instructions": {}}
    if digest:
        results["sass_digest"] = {}
    todo = [(*case, compile_kernel) for case in cases()] + [(*case, compile_gluon) for case in gluon_cases()]
    for name, kernel, constexprs, launch, compile_fn in todo:
        if only and name not in only:
            continue
        try:
            results["f64_instructions"][name] = compile_fn(kernel, constexprs, **launch)
            results[name] = "ok"
            if digest:
                results["sass_digest"][name] = sass_digest(COMPILED["cubin"])
        except Exception as e:  # the compiler's message is the report
            results[name] = f"{type(e).__name__}: {str(e)[-1500:]}"
    print(json.dumps(results))


if __name__ == "__main__":
    main()
