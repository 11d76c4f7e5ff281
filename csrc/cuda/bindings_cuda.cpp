// pybind11 bindings of the CUDA launchers. Pointers, sizes and the stream are plain ints, so
// this module never links libtorch; splitkernels/backends/cuda.py does the torch side.
#include <pybind11/pybind11.h>

#include "launchers.h"

namespace py = pybind11;
using namespace sk::cuda;

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "splitkernels CUDA kernels (raw device pointers; use splitkernels.ops, not this module)";
  m.attr("GEMV_TILE_ROWS") = kGemvTileRows;
  m.attr("VARIANT_CC_PREFETCH") = kVariantCcPrefetch;
  m.attr("CODEC_MAX_D") = kCodecMaxD;
  m.attr("V2_HEADER_BYTES") = kV2HeaderBytes;
  m.def("device_count", &device_count, "Devices visible to this module's CUDA runtime (raises with the reason)");
  m.def("version_string", &version_string, "CUDA runtime and driver versions as seen by this module");
  // Launchers only enqueue work, but they validate on the host first: keep the GIL-free window
  // to the launch itself.
  m.def("pack_bits", &pack_bits, py::arg("codes"), py::arg("packed"), py::arg("rows"), py::arg("n"), py::arg("bits"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def("unpack_bits", &unpack_bits, py::arg("packed"), py::arg("codes"), py::arg("rows"), py::arg("n"),
        py::arg("packed_stride"), py::arg("bits"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def("ts_tabq_encode", &ts_tabq_encode, py::arg("x"), py::arg("dtype"), py::arg("t"), py::arg("d"),
        py::arg("abs_threshold"), py::arg("threshold"), py::arg("capacity"), py::arg("bit_menu"), py::arg("eps"),
        py::arg("forced_bits"), py::arg("bits"), py::arg("lo"), py::arg("step"), py::arg("hi"), py::arg("cnt"),
        py::arg("idx"), py::arg("val"), py::arg("codes"), py::arg("nbytes"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());
  m.def("ts_tabq_decode", &ts_tabq_decode, py::arg("bits"), py::arg("lo"), py::arg("step"), py::arg("cnt"),
        py::arg("idx"), py::arg("val"), py::arg("codes"), py::arg("dtype"), py::arg("t"), py::arg("d"),
        py::arg("capacity"), py::arg("codes_stride"), py::arg("out"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());
  m.def("v2_encode", &v2_encode, py::arg("x"), py::arg("dtype"), py::arg("t"), py::arg("d"), py::arg("center"),
        py::arg("inv"), py::arg("kmax"), py::arg("raw_limit"), py::arg("packed"), py::arg("sym_off"),
        py::arg("val_off"), py::arg("scratch"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def("v2_decode", &v2_decode, py::arg("packed"), py::arg("sym_off"), py::arg("val_off"), py::arg("n_escapes"),
        py::arg("t"), py::arg("d"), py::arg("step"), py::arg("center"), py::arg("kmax"), py::arg("dtype"),
        py::arg("out"), py::arg("scratch"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def("lowbit_gemv", &lowbit_gemv, py::arg("x"), py::arg("qweight"), py::arg("scale"), py::arg("zero"),
        py::arg("bias"), py::arg("y"), py::arg("dtype"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("bits"),
        py::arg("group_size"), py::arg("splits"), py::arg("partial"), py::arg("tile_done"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());
  m.def("gemv_fused", &gemv_fused, py::arg("m"), py::arg("k"), py::arg("bits"), py::arg("group_size"), py::arg("dtype"),
        "Whether lowbit_gemv takes this product (else dequantise and a library matmul)");
  m.def("gemv_tc_min_m", &gemv_tc_min_m, py::arg("value"),
        "Smallest M for the W4 tensor-core GEMV; value > 0 sets it (benchmarks), 0 reads; returns the old value");
  m.def("gemv_variant", &gemv_variant, py::arg("value"),
        "GEMV kernel variants (bit 1: CUDA-core prefetch at M = 1); value >= 0 sets them (benchmarks), -1 "
        "reads; returns the old value");
  m.def("gemv_splits", &gemv_splits, py::arg("m"), py::arg("n"), py::arg("k"), py::arg("bits"), py::arg("group_size"),
        py::arg("dtype"),
        "Blocks the GEMV splits K over on the current device (1 = no split-K)");
  m.def("dequantize_weight", &dequantize_weight, py::arg("qweight"), py::arg("scale"), py::arg("zero"), py::arg("w"),
        py::arg("dtype"), py::arg("n"), py::arg("k"), py::arg("bits"), py::arg("group_size"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());
}
