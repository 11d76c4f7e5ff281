"""Compile the kernels for an NVIDIA architecture without a GPU, and check the rounding-critical PTX.

The interpreter runs the kernels' arithmetic on CPU but not the compiler, so code that only the
compiler rejects (a non-constexpr global, a type that differs between branches) would first
fail on a GPU. Triton ships ptxas, so every kernel family can be compiled to a cubin here, and
the PTX shows that the codec divides with ``div.rn.f32`` (never the approximate default) and
that decode and the v2 quantiser/dequantiser have no fused multiply-add.

Usage: TRITON_INTERPRET=0 python -m splitkernels.triton.compile_check [--arch 90]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import (bitpack, codec_decode, codec_encode, codec_v2_count, codec_v2_dequantise, codec_v2_gather,
               codec_v2_quantise, codec_v2_scan, int8_gemm, lowbit_dequant, lowbit_gemv, lowbit_tiled)

_P8 = "*u8"
_GEMM = {"x_ptr": "*fp16", "qw_ptr": "*i32", "scale_ptr": "*fp16", "zero_ptr": "*fp16", "bias_ptr": "*fp16",
         "y_ptr": "*fp16", "M": "i32", "N": "i32", "K": "i32", "W": "i32", "NG": "i32", "GROUP": "i32",
         "K_SPLIT": "i32"}


def _encode_sig(dt: str) -> dict:
    return {"x_ptr": "*" + dt, "forced_ptr": _P8, "bits_ptr": _P8, "lo_ptr": "*fp16", "step_ptr": "*fp16",
            "hi_ptr": "*fp32", "cnt_ptr": "*i32", "idx_ptr": "*i32", "val_ptr": "*" + dt, "codes_ptr": _P8,
            "nbytes_ptr": "*i32", "d": "i32", "C": "i32", "thr_bits": "i64", "eps2_bits": "i64", "menu": "i32"}


def _decode_sig(dt: str) -> dict:
    return {"bits_ptr": _P8, "lo_ptr": "*fp16", "step_ptr": "*fp16", "cnt_ptr": "*i32", "idx_ptr": "*i32",
            "val_ptr": "*" + dt, "codes_ptr": _P8, "out_ptr": "*" + dt, "d": "i32", "C": "i32", "codes_stride": "i32",
            "codes_width": "i32"}


_I64 = "*i64"
_V2_ROW = {"d": "i32", "kmax": "i32"}


def _v2_quantise_sig(dt: str, bits: str) -> dict:
    return {"x_ptr": "*" + dt, "center_ptr": "*fp32", "inv_ptr": "*fp32", "raw_ptr": _P8, "sym_ptr": _P8,
            "cnt_ptr": _I64, "bad_ptr": _I64, **_V2_ROW, "raw_limit": "i32", "xbits_ptr": bits, "header_ptr": _I64,
            "val_ptr": bits}


def _v2_dequantise_sig(bits: str) -> dict:
    return {"raw_ptr": _P8, "sym_ptr": _P8, "step_ptr": "*fp32", "center_ptr": "*fp32", "val_ptr": bits,
            "cnt_ptr": _I64, "esc_off_ptr": _I64, "raw_off_ptr": _I64, "out_ptr": bits, **_V2_ROW,
            "n_escapes": "i64"}


def _gemm_sig(dt: str, out: str | None = None) -> dict:
    sig = {k: v.replace("fp16", dt) for k, v in _GEMM.items()}
    if out:
        sig["y_ptr"] = "*" + out
    return sig


def variants() -> list[tuple[str, object, dict, dict, dict]]:
    """(name, kernel, signature, constexprs, options) for each representative specialisation."""
    nofuse = {"enable_fp_fusion": False, "num_warps": 8}
    gemv = {"HAS_BIAS": True, "OUT_BF16": False, "BLOCK_N": 16, "BLOCK_K": 256}
    tiled = {"HAS_BIAS": True, "OUT_BF16": False, "SPLIT_K": 1, "DOT_FP16": True, "PRECISION": "ieee", "WORD_TILE": True,
             "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64}
    return [
        ("pack", bitpack._pack_kernel, {"codes_ptr": _P8, "out_ptr": _P8, "n": "i32", "nbytes": "i32"},
         {"BITS": 3, "G": 128}, {}),
        ("unpack", bitpack._unpack_kernel, {"packed_ptr": _P8, "out_ptr": _P8, "n": "i32", "row_stride": "i32",
                                            "nbytes": "i32"}, {"BITS": 5, "BLOCK": 1024}, {}),
        ("encode fp16", codec_encode._encode_kernel, _encode_sig("fp16"),
         {"ABS_MODE": False, "FORCED": False, "RAW": 16, "BLOCK_D": 4096, "BLOCK_C": 16}, nofuse),
        ("encode fp32 forced abs", codec_encode._encode_kernel, _encode_sig("fp32"),
         {"ABS_MODE": True, "FORCED": True, "RAW": 32, "BLOCK_D": 1024, "BLOCK_C": 1}, nofuse),
        ("decode bf16", codec_decode._decode_kernel, _decode_sig("bf16"),
         {"RAW": 16, "OUT_BF16": True, "BLOCK_D": 4096, "BLOCK_C": 16}, nofuse),
        ("v2 quantise fp16", codec_v2_quantise._quantise_kernel, _v2_quantise_sig("fp16", "*i16"),
         {"X_BF16": False, "ONE_TOKEN": False, "BLOCK_D": 4096}, nofuse),
        ("v2 quantise bf16 bits one token", codec_v2_quantise._quantise_kernel, _v2_quantise_sig("i16", "*i16"),
         {"X_BF16": True, "ONE_TOKEN": True, "BLOCK_D": 1024}, nofuse),
        ("v2 scan", codec_v2_scan._scan_kernel,
         {"raw_ptr": _P8, "cnt_ptr": _I64, "bad_ptr": _I64, "esc_off_ptr": _I64, "raw_off_ptr": _I64,
          "header_ptr": _I64, "t": "i32"}, {"HAS_BAD": True, "BLOCK_T": 1024}, {"num_warps": 4}),
        ("v2 gather", codec_v2_gather._gather_kernel,
         {"x_ptr": "*i16", "raw_ptr": _P8, "sym_ptr": _P8, "cnt_ptr": _I64, "esc_off_ptr": _I64,
          "raw_off_ptr": _I64, "header_ptr": _I64, "val_ptr": "*i16", **_V2_ROW}, {"BLOCK_D": 4096}, nofuse),
        ("v2 count", codec_v2_count._count_kernel, {"sym_ptr": _P8, "raw_ptr": _P8, "cnt_ptr": _I64, **_V2_ROW},
         {"BLOCK_D": 4096}, nofuse),
        ("v2 dequantise fp32", codec_v2_dequantise._dequantise_kernel, _v2_dequantise_sig("*i32"),
         {"OUT": 0, "ONE_TOKEN": False, "BLOCK_D": 4096}, nofuse),
        ("v2 dequantise bf16 one token", codec_v2_dequantise._dequantise_kernel, _v2_dequantise_sig("*i16"),
         {"OUT": 2, "ONE_TOKEN": True, "BLOCK_D": 1024}, nofuse),
        ("gemv W4 word tiles", lowbit_gemv._gemv_kernel, _gemm_sig("fp16"),
         {**gemv, "BITS": 4, "SPLIT_K": 1, "WORD_TILE": True}, {}),
        ("gemv W3 split-K", lowbit_gemv._gemv_kernel, _gemm_sig("fp16", "fp32"),
         {**gemv, "BITS": 3, "SPLIT_K": 2, "WORD_TILE": False}, {}),
        ("tiled W4 fp16", lowbit_tiled._tiled_kernel, _gemm_sig("fp16"), {**tiled, "BITS": 4}, {"num_stages": 3}),
        ("tiled W3 bf16 tf32", lowbit_tiled._tiled_kernel, _gemm_sig("bf16"),
         {**tiled, "BITS": 3, "OUT_BF16": True, "DOT_FP16": False, "PRECISION": "tf32", "WORD_TILE": False,
          "BLOCK_M": 64},
         {"num_stages": 3}),
        ("dequant W8", lowbit_dequant._dequant_kernel,
         {"qw_ptr": "*i32", "scale_ptr": "*fp16", "zero_ptr": "*fp16", "w_ptr": "*fp16", "N": "i32", "K": "i32",
          "W": "i32", "NG": "i32", "GROUP": "i32"}, {"BITS": 8, "BLOCK_N": 32, "BLOCK_K": 128},
         {"enable_fp_fusion": False}),
        ("int8 quantize rows", int8_gemm._quantize_rows_kernel,
         {"x_ptr": "*bf16", "q_ptr": "*i8", "s_ptr": "*fp32", "K": "i32"}, {"BLOCK_K": 4096}, {}),
        ("int8 matmul", int8_gemm._int8_mm_kernel,
         {"xq_ptr": "*i8", "xs_ptr": "*fp32", "w_ptr": "*i8", "ws_ptr": "*fp32", "bias_ptr": "*fp16",
          "y_ptr": "*fp16", "M": "i32", "N": "i32", "K": "i32"},
         {"HAS_BIAS": True, "OUT_BF16": False, "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64}, {}),
    ]


def compile_all(arch: int = 90, verbose: bool = True) -> dict[str, str]:
    """Compile every variant for ``sm_<arch>``; returns PTX per variant name."""
    target = GPUTarget("cuda", arch, 32)
    ptx = {}
    for name, kernel, sig, consts, options in variants():
        t0 = time.time()
        src = ASTSource(kernel, signature={**sig, **{k: "constexpr" for k in consts}}, constexprs=consts)
        ptx[name] = triton.compile(src, target=target, options=options).asm["ptx"]
        if verbose:
            print(f"{name}: compiled for sm_{arch} in {time.time() - t0:.1f} s", flush=True)
    return ptx


def check_rounding(ptx: dict[str, str]) -> list[str]:
    """Problems with the rounding-critical instructions (empty when all is well)."""
    problems = []
    for name, text in ptx.items():
        if name.startswith("encode"):
            if "div.rn.f32" not in text or "div.full.f32" in text or "div.approx" in text:
                problems.append(f"{name}: fp32 division is not div.rn.f32 throughout")
            if "sqrt.approx" in text:
                problems.append(f"{name}: approximate square root")
        if name.startswith(("decode", "dequant")) and "fma.rn.f32" in text:
            problems.append(f"{name}: q * step + lo was fused into an FMA")
        if name.startswith(("v2 quantise", "v2 dequantise")) and "fma.rn.f32" in text:
            problems.append(f"{name}: a v2 multiply and add were fused into an FMA")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability as an int, e.g. 80, 90")
    ns = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check: unset TRITON_INTERPRET (the interpreter does not compile)", file=sys.stderr)
        return 2
    problems = check_rounding(compile_all(ns.arch))
    for p in problems:
        print("PROBLEM:", p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
