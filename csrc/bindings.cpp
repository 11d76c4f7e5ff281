// pybind11 bindings of the CPU kernels (module splitkernels._C).
//
// Tensors cross as integer data pointers plus sizes: the module never links libtorch, and the
// Python glue (splitkernels/backends/cpp.py) allocates outputs and checks shapes, dtypes and
// contiguity. Every kernel runs with the GIL released. Kernel-side argument errors come back
// as ValueError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "binding_helpers.h"
#include "cpu/bitpack.h"
#include "cpu/codec.h"
#include "common/half.h"
#include "cpu/codec_v2.h"
#include "cpu/frame_center.h"
#include "cpu/crc32.h"
#include "cpu/linear.h"
#include "cpu/nibble.h"
#include "cpu/rans.h"
#include "cpu/planes.h"
#include "cpu/slots.h"
#include "cpu/rice.h"
#include "cpu/thread_pool.h"
#include "cpu/long_frame.h"
#include "cpu/token_frame.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace {

using sk::bind::check;
using sk::bind::ptr;

// A frame argument's bytes: any contiguous one-dimensional byte buffer (bytes, bytearray, memoryview).
py::buffer_info frame_bytes(const py::buffer& frame) {
  py::buffer_info info = frame.request();
  if (info.ndim != 1 || info.itemsize != 1 || info.strides[0] != 1) {
    throw std::invalid_argument("frame must be a contiguous byte buffer");
  }
  return info;
}

}  // namespace

void bind_decode(py::module_& m);  // csrc/decode_bindings.cpp

PYBIND11_MODULE(_C, m) {
  m.doc() = "splitkernels CPU kernels (torch-free; pointers and sizes in, see splitkernels/backends/cpp.py)";
  const auto nogil = py::call_guard<py::gil_scoped_release>();

  m.def(
      "pack_bits",
      [](std::uintptr_t codes, int64_t rows, int64_t n, int bits, std::uintptr_t out, bool bitwise) {
        sk::pack_rows(ptr<const uint8_t>(codes), rows, n, bits, ptr<uint8_t>(out), bitwise);
      },
      py::arg("codes"), py::arg("rows"), py::arg("n"), py::arg("bits"), py::arg("out"), py::arg("bitwise") = false,
      nogil, "Pack rows of n uint8 codes into ceil(n*bits/8) bytes each (bitwise: the bit-at-a-time path).");

  m.def(
      "unpack_bits",
      [](std::uintptr_t packed, int64_t rows, int64_t stride, int64_t n, int bits, std::uintptr_t out,
         bool bitwise) {
        sk::unpack_rows(ptr<const uint8_t>(packed), rows, stride, n, bits, ptr<uint8_t>(out), bitwise);
      },
      py::arg("packed"), py::arg("rows"), py::arg("stride"), py::arg("n"), py::arg("bits"), py::arg("out"),
      py::arg("bitwise") = false, nogil, "Unpack n codes from each packed row (rows `stride` bytes apart).");

  m.def(
      "ts_tabq_encode",
      [](std::uintptr_t x, int dtype, int64_t T, int64_t d, bool abs_threshold, double threshold, int64_t capacity,
         const std::vector<int>& menu, double eps, std::uintptr_t forced, std::uintptr_t bits, std::uintptr_t lo,
         std::uintptr_t step, std::uintptr_t hi, std::uintptr_t cnt, std::uintptr_t idx, std::uintptr_t val,
         std::uintptr_t codes, std::uintptr_t nbytes) {
        const sk::EncodeOutputs out{ptr<uint8_t>(bits), ptr<uint16_t>(lo),   ptr<uint16_t>(step),
                                    ptr<float>(hi),     ptr<int32_t>(cnt),   ptr<int32_t>(idx),
                                    ptr<void>(val),     ptr<uint8_t>(codes), ptr<int32_t>(nbytes)};
        check(sk::ts_tabq_encode(ptr<const void>(x), dtype, T, d, abs_threshold, threshold, capacity, menu.data(),
                                 static_cast<int>(menu.size()), eps, ptr<const uint8_t>(forced), out));
      },
      py::arg("x"), py::arg("dtype"), py::arg("T"), py::arg("d"), py::arg("abs_threshold"), py::arg("threshold"),
      py::arg("capacity"), py::arg("menu"), py::arg("eps"), py::arg("forced"), py::arg("bits"), py::arg("lo"),
      py::arg("step"), py::arg("hi"), py::arg("cnt"), py::arg("idx"), py::arg("val"), py::arg("codes"),
      py::arg("nbytes"), nogil, "Fused TS + TAB-Q encode into caller-allocated buffers (forced may be 0).");

  m.def(
      "ts_tabq_decode",
      [](std::uintptr_t bits, std::uintptr_t lo, std::uintptr_t step, std::uintptr_t cnt, std::uintptr_t idx,
         std::uintptr_t val, int64_t capacity, std::uintptr_t codes, int64_t codes_stride, int64_t T, int64_t d,
         int dtype, std::uintptr_t out) {
        check(sk::ts_tabq_decode(ptr<const int32_t>(bits), ptr<const float>(lo), ptr<const float>(step),
                                 ptr<const int32_t>(cnt), ptr<const int32_t>(idx), ptr<const void>(val), capacity,
                                 ptr<const uint8_t>(codes), codes_stride, T, d, dtype, ptr<void>(out)));
      },
      py::arg("bits"), py::arg("lo"), py::arg("step"), py::arg("cnt"), py::arg("idx"), py::arg("val"),
      py::arg("capacity"), py::arg("codes"), py::arg("codes_stride"), py::arg("T"), py::arg("d"), py::arg("dtype"),
      py::arg("out"), nogil, "TS + TAB-Q decode (bits/cnt/idx int32, lo/step fp32) into out [T, d].");

  m.def(
      "lowbit_linear",
      [](std::uintptr_t x, int dtype, int64_t M, int64_t K, std::uintptr_t qweight, int64_t N, int64_t words,
         std::uintptr_t scale, std::uintptr_t zero, int scale_dtype, int bits, int64_t group_size,
         std::uintptr_t bias, std::uintptr_t y, bool fp32_as_bf16) {
        check(sk::lowbit_linear(ptr<const void>(x), dtype, M, K, ptr<const int32_t>(qweight), N, words,
                                ptr<const void>(scale), ptr<const void>(zero), scale_dtype, bits, group_size,
                                ptr<const float>(bias), ptr<void>(y), fp32_as_bf16));
      },
      py::arg("x"), py::arg("dtype"), py::arg("M"), py::arg("K"), py::arg("qweight"), py::arg("N"), py::arg("words"),
      py::arg("scale"), py::arg("zero"), py::arg("scale_dtype"), py::arg("bits"), py::arg("group_size"),
      py::arg("bias"), py::arg("y"), py::arg("fp32_as_bf16") = false, nogil,
      "y = x @ dequant(W)^T + bias (bias fp32 or 0); fp32_as_bf16: fp32 rows may be multiplied as bf16 (M > 1).");

  m.def(
      "int8_linear",
      [](std::uintptr_t x, int dtype, int64_t M, int64_t K, std::uintptr_t w, int64_t N, std::uintptr_t w_scale,
         std::uintptr_t bias, std::uintptr_t y) {
        check(sk::int8_linear(ptr<const void>(x), dtype, M, K, ptr<const int8_t>(w), N, ptr<const float>(w_scale),
                              ptr<const float>(bias), ptr<void>(y)));
      },
      py::arg("x"), py::arg("dtype"), py::arg("M"), py::arg("K"), py::arg("w"), py::arg("N"), py::arg("w_scale"),
      py::arg("bias"), py::arg("y"), nogil, "W8A8 linear (bias fp32 or 0).");

  m.def(
      "v2_quantise",
      [](std::uintptr_t x, int dtype, int64_t T, int64_t d, std::uintptr_t center, std::uintptr_t inv, int kmax,
         int64_t raw_limit, std::uintptr_t sym, std::uintptr_t n_esc, std::uintptr_t raw, std::uintptr_t escapes) {
        int64_t totals[2] = {0, 0};
        check(sk::v2_quantise(ptr<const void>(x), dtype, T, d, ptr<const float>(center), ptr<const float>(inv), kmax,
                              raw_limit, ptr<uint8_t>(sym), ptr<int32_t>(n_esc), ptr<uint8_t>(raw), ptr<void>(escapes),
                              totals));
        return std::make_pair(totals[0], totals[1]);
      },
      py::arg("x"), py::arg("dtype"), py::arg("T"), py::arg("d"), py::arg("center"), py::arg("inv"), py::arg("kmax"),
      py::arg("raw_limit"), py::arg("sym"), py::arg("n_esc"), py::arg("raw"), py::arg("escapes"), nogil,
      "Codec v2 fused quantise of x [T, d] into symbols u8 [T, d], escape counts i32 [T], raw flags u8 [T] and "
      "(escapes != 0) the escaped values; returns (escapes written, non-finite inputs).");

  m.def(
      "v2_center_offsets",
      [](std::uintptr_t x, int dtype, int64_t T, int64_t d, std::uintptr_t center, std::uintptr_t inv, int kmax,
         int64_t raw_limit, std::uintptr_t offsets) {
        if (dtype < sk::kFloat32 || dtype > sk::kBFloat16 || kmax < 1 || kmax > 127 || T < 0 || d < 1)
          throw std::invalid_argument("v2_center_offsets: unknown dtype, or kmax, T or d out of range");
        return sk::fit_center_offsets(ptr<const void>(x), dtype, T, d, ptr<const float>(center), ptr<const float>(inv),
                                      kmax, raw_limit, ptr<int8_t>(offsets));
      },
      py::arg("x"), py::arg("dtype"), py::arg("T"), py::arg("d"), py::arg("center"), py::arg("inv"), py::arg("kmax"),
      py::arg("raw_limit"), py::arg("offsets"), nogil,
      "The center offsets (i8 [d] into offsets) of a codec v2 frame of x [T, d] by the encoder's rule "
      "(docs/FORMATS.md 5.4.2); True when the frame carries them.");

  m.def(
      "v2_fit_offsets",
      [](std::uintptr_t sym, std::uintptr_t raw, int64_t rows, int64_t d, int kmax, std::uintptr_t offsets) {
        if (rows < 1 || rows > sk::kCenterMaxRows || d < 1 || kmax < 1 || kmax > 127)
          throw std::invalid_argument("v2_fit_offsets: rows must be in [1, " + std::to_string(sk::kCenterMaxRows) +
                                      "], d >= 1 and kmax in [1, 127]");
        return sk::center_offsets_of_symbols(ptr<const uint8_t>(sym), ptr<const uint8_t>(raw), rows, d, kmax,
                                             ptr<int8_t>(offsets));
      },
      py::arg("sym"), py::arg("raw"), py::arg("rows"), py::arg("d"), py::arg("kmax"), py::arg("offsets"), nogil,
      "The center offsets (i8 [d] into offsets) of sampled rows' symbols u8 [rows, d] and raw flags u8 [rows] "
      "(docs/FORMATS.md 5.4.2); True when the frame carries them.");

  m.def(
      "v2_dequantise",
      [](std::uintptr_t sym, int64_t T, int64_t d, std::uintptr_t step, std::uintptr_t center, int kmax, int dtype,
         std::uintptr_t out, std::uintptr_t raw, std::uintptr_t escapes, int64_t n_escapes) {
        check(sk::v2_dequantise(ptr<const uint8_t>(sym), T, d, ptr<const float>(step), ptr<const float>(center), kmax,
                                dtype, ptr<void>(out), ptr<const uint8_t>(raw), ptr<const void>(escapes), n_escapes));
      },
      py::arg("sym"), py::arg("T"), py::arg("d"), py::arg("step"), py::arg("center"), py::arg("kmax"),
      py::arg("dtype"), py::arg("out"), py::arg("raw"), py::arg("escapes"), py::arg("n_escapes"), nogil,
      "Codec v2 dequantise of symbols u8 [T, d] into out [T, d], skipping raw rows (raw != 0), the n_escapes "
      "exact values placed at escape symbols (n_escapes < 0: none placed).");

  m.def(
      "v2_decode_nibble",
      [](std::uintptr_t data, int64_t len, int64_t T, int64_t d, std::uintptr_t raw, int a, std::uintptr_t step,
         std::uintptr_t center, int kmax, int dtype, std::uintptr_t out, std::uintptr_t escapes, int64_t n_escapes) {
        return sk::v2_decode_nibble(ptr<const uint8_t>(data), len, T, d, ptr<const uint8_t>(raw), a,
                                    ptr<const float>(step), ptr<const float>(center), kmax, dtype, ptr<void>(out),
                                    ptr<const void>(escapes), n_escapes);
      },
      py::arg("data"), py::arg("len"), py::arg("T"), py::arg("d"), py::arg("raw"), py::arg("a"), py::arg("step"),
      py::arg("center"), py::arg("kmax"), py::arg("dtype"), py::arg("out"), py::arg("escapes"),
      py::arg("n_escapes"), nogil,
      "Decode and dequantise a nibble stream row by row into out [T, d] (coded rows only); returns '' or why the "
      "stream is invalid.");

  m.def(
      "v2_decode_planes",
      [](std::uintptr_t data, int64_t len, int64_t T, int64_t d, std::uintptr_t raw, std::uintptr_t centre,
         std::uintptr_t k, std::uintptr_t step, std::uintptr_t center, int kmax, int dtype, std::uintptr_t out,
         std::uintptr_t escapes, int64_t n_escapes) {
        return sk::v2_decode_planes(ptr<const uint8_t>(data), len, T, d, ptr<const uint8_t>(raw),
                                    ptr<const uint8_t>(centre), ptr<const uint8_t>(k), ptr<const float>(step),
                                    ptr<const float>(center), kmax, dtype, ptr<void>(out), ptr<const void>(escapes),
                                    n_escapes);
      },
      py::arg("data"), py::arg("len"), py::arg("T"), py::arg("d"), py::arg("raw"), py::arg("centre"), py::arg("k"),
      py::arg("step"), py::arg("center"), py::arg("kmax"), py::arg("dtype"), py::arg("out"), py::arg("escapes"),
      py::arg("n_escapes"), nogil,
      "Decode and dequantise a bit-plane stream row by row into out [T, d] (coded rows only); returns '' or why the "
      "stream is invalid.");

  m.def(
      "v2_decode_long_frame",
      [](py::buffer frame, uint32_t crc_seed, int64_t d, int kmax, std::uintptr_t step, std::uintptr_t center,
         int window, std::uintptr_t planes_centre, std::uintptr_t planes_k, std::uintptr_t slots_start,
         std::uintptr_t slots_width, int scale, int dtype, int64_t T, int64_t max_escapes, std::uintptr_t out) {
        const py::buffer_info info = frame_bytes(frame);
        const sk::LongFrameConfig config{crc_seed,   d, kmax, ptr<const float>(step), ptr<const float>(center), window,
                                         ptr<const uint8_t>(planes_centre), ptr<const uint8_t>(planes_k),
                                         ptr<const uint8_t>(slots_start), ptr<const uint8_t>(slots_width), scale};
        py::gil_scoped_release nogil;
        return sk::v2_decode_long_frame(static_cast<const uint8_t*>(info.ptr), info.size, config, dtype, T, max_escapes,
                                        ptr<void>(out));
      },
      py::arg("frame"), py::arg("crc_seed"), py::arg("d"), py::arg("kmax"), py::arg("step"), py::arg("center"),
      py::arg("window"), py::arg("planes_centre"), py::arg("planes_k"), py::arg("slots_start"), py::arg("slots_width"),
      py::arg("scale"), py::arg("dtype"), py::arg("T"), py::arg("max_escapes"), py::arg("out"),
      "A long codec v2 frame of a fused coder (nibble, bit planes or slots) with T tokens of dtype decoded into "
      "out [T, d] (the session config's CRC seed, d, kmax, step and center at the frame's step scale, the coders' "
      "parameters and that scale, 0 for none); False when it "
      "is anything else or invalid (the caller then runs the reference parser).");
  m.def(
      "v2_encode_long_frame",
      [](std::uintptr_t x, int dtype, int64_t T, int64_t d, int coder, std::uintptr_t center, std::uintptr_t inv,
         std::uintptr_t step, int kmax, int64_t raw_limit, int window, std::uintptr_t first, std::uintptr_t second,
         uint32_t crc_seed, int scale) -> py::object {
        if (scale < -128 || scale > 127) throw std::invalid_argument("v2_encode_long_frame: scale is not an i8");
        const sk::FusedCoder fused{coder, window, ptr<const uint8_t>(first), ptr<const uint8_t>(second)};
        sk::LongFrameParts parts;
        bool nonfinite = false;
        std::string err;
        {
          py::gil_scoped_release nogil;
          err = sk::encode_long_parts(ptr<const void>(x), dtype, T, d, ptr<const float>(center), ptr<const float>(inv),
                                      ptr<const float>(step), kmax, raw_limit, fused, &parts, &nonfinite);
        }
        check(err);
        if (nonfinite) return py::none();
        parts.scale = scale;
        PyObject* frame = PyBytes_FromStringAndSize(nullptr, sk::long_frame_size(parts));
        if (!frame) throw py::error_already_set();
        auto bytes = py::reinterpret_steal<py::bytes>(frame);
        {
          py::gil_scoped_release nogil;  // the bytes are not shared yet
          sk::write_long_frame(parts, crc_seed, reinterpret_cast<uint8_t*>(PyBytes_AS_STRING(frame)));
        }
        return bytes;
      },
      py::arg("x"), py::arg("dtype"), py::arg("T"), py::arg("d"), py::arg("coder"), py::arg("center"), py::arg("inv"),
      py::arg("step"), py::arg("kmax"), py::arg("raw_limit"), py::arg("window"), py::arg("first"), py::arg("second"),
      py::arg("crc_seed"), py::arg("scale"),
      "x [T, d] (contiguous, T >= 1; center, inv and step at the frame's step scale, 0 for none) as a long codec v2 "
      "frame of a fused coder (1 nibble with its window start, "
      "4 bit planes or 5 slots with their per-channel u8 [d] arrays first and second), quantised around its center "
      "offsets where it takes them, coded and framed in one call, its CRC continuing crc_seed; None when x holds a "
      "NaN or infinity.");
  m.def(
      "v2_decode_slots",
      [](std::uintptr_t data, int64_t len, int64_t T, int64_t d, std::uintptr_t raw, std::uintptr_t start,
         std::uintptr_t width, std::uintptr_t step, std::uintptr_t center, int kmax, int dtype, std::uintptr_t out,
         std::uintptr_t escapes, int64_t n_escapes) {
        return sk::v2_decode_slots(ptr<const uint8_t>(data), len, T, d, ptr<const uint8_t>(raw),
                                   ptr<const uint8_t>(start), ptr<const uint8_t>(width), ptr<const float>(step),
                                   ptr<const float>(center), kmax, dtype, ptr<void>(out), ptr<const void>(escapes),
                                   n_escapes);
      },
      py::arg("data"), py::arg("len"), py::arg("T"), py::arg("d"), py::arg("raw"), py::arg("start"), py::arg("width"),
      py::arg("step"), py::arg("center"), py::arg("kmax"), py::arg("dtype"), py::arg("out"), py::arg("escapes"),
      py::arg("n_escapes"), nogil,
      "Decode and dequantise a slot stream row by row into out [T, d] (coded rows only); returns '' or why the "
      "stream is invalid.");

  m.def("v2_isas", &sk::v2_isas, "Instruction sets of the codec v2 passes this CPU supports, best last.");
  m.def("v2_isa", &sk::v2_isa, "Instruction set the codec v2 passes use now.");
  m.def(
      "set_v2_isa", [](const std::string& name) { check(sk::set_v2_isa(name)); }, py::arg("name"),
      "Use the codec v2 passes of this instruction set (scalar, avx2 or avx512).");

  m.def("rans_tables_bytes", []() { return static_cast<int64_t>(sizeof(sk::RansTables)); },
        "Bytes of the rANS coder tables of one frequency table (allocate, then rans_build_tables).");
  m.def(
      "rans_build_tables",
      [](std::uintptr_t freq, int nsym, std::uintptr_t tables) {
        check(sk::rans_build_tables(ptr<const uint32_t>(freq), nsym, ptr<sk::RansTables>(tables)));
      },
      py::arg("freq"), py::arg("nsym"), py::arg("tables"), nogil,
      "Build the encode/decode tables of freq u32[nsym] into rans_tables_bytes() bytes at tables (8-aligned).");

  m.def(
      "rans_encode",
      [](std::uintptr_t sym, int64_t n, std::uintptr_t tables, int64_t period, int lanes, std::uintptr_t out,
         int64_t capacity) {
        const int64_t len = sk::rans_encode(ptr<const uint8_t>(sym), n, ptr<const sk::RansTables* const>(tables),
                                            period, lanes, ptr<uint8_t>(out), capacity);
        if (len < 0)
          throw std::invalid_argument(
              "rans_encode: a symbol is outside the table, lanes is not 1, 4 or 32, period < 1 or out is too small");
        return len;
      },
      py::arg("sym"), py::arg("n"), py::arg("tables"), py::arg("period"), py::arg("lanes"), py::arg("out"),
      py::arg("capacity"), nogil,
      "Static-table rANS encode of n u8 symbols on lanes (1, 4 or 32) states; tables: period pointers to built "
      "tables, symbol i uses tables[i % period]. Returns the stream length in bytes.");

  m.def(
      "rans_decode",
      [](std::uintptr_t data, int64_t len, int64_t n, std::uintptr_t tables, int64_t period, int lanes,
         std::uintptr_t out, int count_of) {
        int64_t count = 0;
        std::string err = sk::rans_decode(ptr<const uint8_t>(data), len, n, ptr<const sk::RansTables* const>(tables),
                                          period, lanes, ptr<uint8_t>(out), count_of, &count);
        return std::make_pair(err, count);
      },
      py::arg("data"), py::arg("len"), py::arg("n"), py::arg("tables"), py::arg("period"), py::arg("lanes"),
      py::arg("out"), py::arg("count_of") = -1, nogil,
      "Static-table rANS decode of exactly n symbols on lanes (1, 4 or 32) states into out (symbol i with "
      "tables[i % period]); returns ('' or why the stream is invalid, how many decoded symbols equal count_of).");
  m.def("rans_isas", &sk::rans_isas, "Instruction sets of the wide (32-lane) rANS coder this CPU supports, best last.");
  m.def("rans_isa", &sk::rans_isa, "Instruction set the wide rANS coder uses now.");
  m.def(
      "set_rans_isa", [](const std::string& name) { check(sk::set_rans_isa(name)); }, py::arg("name"),
      "Use the wide rANS coder of this instruction set (scalar or avx512).");

  m.def("rice_capacity", &sk::rice_capacity, py::arg("n"), "Bytes of out that rice_encode needs for n symbols.");
  m.def(
      "rice_encode",
      [](std::uintptr_t sym, int64_t n, std::uintptr_t centre, std::uintptr_t k, int64_t period, int nsym,
         std::uintptr_t out, int64_t capacity) {
        const int64_t len = sk::rice_encode(ptr<const uint8_t>(sym), n, ptr<const uint8_t>(centre),
                                            ptr<const uint8_t>(k), period, nsym, ptr<uint8_t>(out), capacity);
        if (len < 0)
          throw std::invalid_argument("rice_encode: a symbol or parameter is out of range or out is too small");
        return len;
      },
      py::arg("sym"), py::arg("n"), py::arg("centre"), py::arg("k"), py::arg("period"), py::arg("nsym"),
      py::arg("out"), py::arg("capacity"), nogil,
      "Rice-code n u8 symbols on 32 lanes; symbol i uses centre[i % period] and k[i % period] (u8 arrays). "
      "Returns the stream length in bytes.");
  m.def(
      "rice_decode",
      [](std::uintptr_t data, int64_t len, int64_t n, std::uintptr_t centre, std::uintptr_t k, int64_t period,
         int nsym, std::uintptr_t out, int count_of) {
        int64_t count = 0;
        std::string err = sk::rice_decode(ptr<const uint8_t>(data), len, n, ptr<const uint8_t>(centre),
                                          ptr<const uint8_t>(k), period, nsym, ptr<uint8_t>(out), count_of, &count);
        return std::make_pair(err, count);
      },
      py::arg("data"), py::arg("len"), py::arg("n"), py::arg("centre"), py::arg("k"), py::arg("period"),
      py::arg("nsym"), py::arg("out"), py::arg("count_of") = -1, nogil,
      "Decode exactly n Rice-coded symbols into out; returns ('' or why the stream is invalid, how many decoded "
      "symbols equal count_of).");
  m.def("rice_isas", &sk::rice_isas, "Instruction sets of the Rice coder this CPU supports, best last.");
  m.def("rice_isa", &sk::rice_isa, "Instruction set the Rice coder uses now.");
  m.def(
      "set_rice_isa", [](const std::string& name) { check(sk::set_rice_isa(name)); }, py::arg("name"),
      "Use the Rice coder of this instruction set (scalar, avx2 or avx512).");

  m.def("planes_capacity", &sk::planes_capacity, py::arg("rows"), py::arg("d"),
        "Bytes of out that planes_encode needs for rows coded rows of d symbols.");
  m.def(
      "planes_encode",
      [](std::uintptr_t sym, int64_t T, int64_t d, std::uintptr_t raw, std::uintptr_t centre, std::uintptr_t k, int nsym,
         std::uintptr_t out, int64_t capacity) {
        const int64_t len = sk::planes_encode(ptr<const uint8_t>(sym), T, d, ptr<const uint8_t>(raw),
                                              ptr<const uint8_t>(centre), ptr<const uint8_t>(k), d, nsym,
                                              ptr<uint8_t>(out), capacity);
        if (len < 0)
          throw std::invalid_argument("planes_encode: a symbol or parameter is out of range or out is too small");
        return len;
      },
      py::arg("sym"), py::arg("T"), py::arg("d"), py::arg("raw"), py::arg("centre"), py::arg("k"), py::arg("nsym"),
      py::arg("out"), py::arg("capacity"), nogil,
      "Bit-plane code the rows of sym u8 [T, d] whose raw flag is 0 (raw may be 0); channel i uses centre[i] and "
      "k[i] (u8 [d]). Returns the stream length.");
  m.def(
      "planes_decode",
      [](std::uintptr_t data, int64_t len, int64_t T, int64_t d, std::uintptr_t raw, std::uintptr_t centre,
         std::uintptr_t k, int nsym, std::uintptr_t out, int count_of) {
        int64_t count = 0;
        std::string err = sk::planes_decode(ptr<const uint8_t>(data), len, T, d, ptr<const uint8_t>(raw),
                                            ptr<const uint8_t>(centre), ptr<const uint8_t>(k), d, nsym,
                                            ptr<uint8_t>(out), count_of, &count);
        return std::make_pair(err, count);
      },
      py::arg("data"), py::arg("len"), py::arg("T"), py::arg("d"), py::arg("raw"), py::arg("centre"), py::arg("k"),
      py::arg("nsym"), py::arg("out"), py::arg("count_of") = -1, nogil,
      "Decode a bit-plane stream of exactly len bytes into out u8 [T, d] (raw rows 0); returns ('' or why it is "
      "invalid, how many symbols of coded rows equal count_of).");
  m.def("planes_isas", &sk::planes_isas, "Instruction sets of the bit-plane coder this CPU supports, best last.");
  m.def("planes_isa", &sk::planes_isa, "Instruction set the bit-plane coder uses now.");
  m.def(
      "set_planes_isa", [](const std::string& name) { check(sk::set_planes_isa(name)); }, py::arg("name"),
      "Use the bit-plane coder of this instruction set (scalar or avx512).");

  m.def("slots_capacity", &sk::slots_capacity, py::arg("rows"), py::arg("d"),
        "Bytes of out that slots_encode needs for rows coded rows of d symbols.");
  m.def(
      "slots_encode",
      [](std::uintptr_t sym, int64_t T, int64_t d, std::uintptr_t raw, std::uintptr_t start, std::uintptr_t width,
         int nsym, std::uintptr_t out, int64_t capacity) {
        const int64_t len = sk::slots_encode(ptr<const uint8_t>(sym), T, d, ptr<const uint8_t>(raw),
                                             ptr<const uint8_t>(start), ptr<const uint8_t>(width), d, nsym,
                                             ptr<uint8_t>(out), capacity);
        if (len < 0)
          throw std::invalid_argument("slots_encode: a symbol or parameter is out of range or out is too small");
        return len;
      },
      py::arg("sym"), py::arg("T"), py::arg("d"), py::arg("raw"), py::arg("start"), py::arg("width"), py::arg("nsym"),
      py::arg("out"), py::arg("capacity"), nogil,
      "Slot code the rows of sym u8 [T, d] whose raw flag is 0 (raw may be 0); channel i uses window start[i] and "
      "width[i] (u8 [d]). Returns the stream length.");
  m.def(
      "slots_decode",
      [](std::uintptr_t data, int64_t len, int64_t T, int64_t d, std::uintptr_t raw, std::uintptr_t start,
         std::uintptr_t width, int nsym, std::uintptr_t out, int count_of) {
        int64_t count = 0;
        std::string err = sk::slots_decode(ptr<const uint8_t>(data), len, T, d, ptr<const uint8_t>(raw),
                                           ptr<const uint8_t>(start), ptr<const uint8_t>(width), d, nsym,
                                           ptr<uint8_t>(out), count_of, &count);
        return std::make_pair(err, count);
      },
      py::arg("data"), py::arg("len"), py::arg("T"), py::arg("d"), py::arg("raw"), py::arg("start"), py::arg("width"),
      py::arg("nsym"), py::arg("out"), py::arg("count_of") = -1, nogil,
      "Decode a slot stream of exactly len bytes into out u8 [T, d] (raw rows 0); returns ('' or why it is "
      "invalid, how many symbols of coded rows equal count_of).");
  m.def("slots_isas", &sk::slots_isas, "Instruction sets of the slot coder this CPU supports, best last.");
  m.def("slots_isa", &sk::slots_isa, "Instruction set the slot coder uses now.");
  m.def(
      "set_slots_isa", [](const std::string& name) { check(sk::set_slots_isa(name)); }, py::arg("name"),
      "Use the slot coder of this instruction set (scalar or avx512).");

  m.def("nibble_capacity", [](int64_t rows, int64_t d) { return sk::nibble_capacity(rows, d) + sk::kNibbleSlack; },
        py::arg("rows"), py::arg("d"), "Bytes of out that nibble_encode needs for rows coded rows of d symbols.");
  m.def(
      "nibble_encode",
      [](std::uintptr_t sym, int64_t T, int64_t d, std::uintptr_t raw, int nsym, int a, std::uintptr_t out,
         int64_t capacity) {
        const int64_t len = sk::nibble_encode(ptr<const uint8_t>(sym), T, d, ptr<const uint8_t>(raw), nsym, a,
                                              ptr<uint8_t>(out), capacity);
        if (len < 0) throw std::invalid_argument("nibble_encode: a symbol is outside the table or out is too small");
        return len;
      },
      py::arg("sym"), py::arg("T"), py::arg("d"), py::arg("raw"), py::arg("nsym"), py::arg("a"), py::arg("out"),
      py::arg("capacity"), nogil,
      "Nibble-code the rows of sym u8 [T, d] whose raw flag is 0 (raw may be 0); returns the stream length.");
  m.def(
      "nibble_decode",
      [](std::uintptr_t data, int64_t len, int64_t T, int64_t d, std::uintptr_t raw, int nsym, int a,
         std::uintptr_t out, int count_of) {
        int64_t count = 0;
        std::string err = sk::nibble_decode(ptr<const uint8_t>(data), len, T, d, ptr<const uint8_t>(raw), nsym, a,
                                            ptr<uint8_t>(out), count_of, &count);
        return std::make_pair(err, count);
      },
      py::arg("data"), py::arg("len"), py::arg("T"), py::arg("d"), py::arg("raw"), py::arg("nsym"), py::arg("a"),
      py::arg("out"), py::arg("count_of") = -1, nogil,
      "Decode a nibble stream of exactly len bytes into out u8 [T, d] (raw rows 0); returns ('' or why it is "
      "invalid, how many symbols equal count_of).");
  m.def("nibble_isas", &sk::nibble_isas, "Instruction sets of the nibble coder this CPU supports, best last.");
  m.def("nibble_isa", &sk::nibble_isa, "Instruction set the nibble coder uses now.");
  m.def(
      "set_nibble_isa", [](const std::string& name) { check(sk::set_nibble_isa(name)); }, py::arg("name"),
      "Use the nibble coder of this instruction set (scalar or avx512).");
  m.def(
      "v2_decode_token_frame",
      [](py::buffer frame, uint32_t crc_seed, int64_t d, int kmax, std::uintptr_t tables, int64_t period,
         std::uintptr_t classes, int64_t n_classes, std::uintptr_t step, std::uintptr_t center, int scale, int dtype,
         int64_t max_escapes, int64_t id_bytes, int64_t start, int shift, std::uintptr_t out) {
        const py::buffer_info info = frame_bytes(frame);
        const sk::TokenFrameConfig config{crc_seed, d, kmax, ptr<const sk::RansTables* const>(tables), period,
                                          ptr<const sk::RansTables* const>(classes), n_classes,
                                          ptr<const float>(step), ptr<const float>(center), scale};
        py::gil_scoped_release nogil;
        return sk::v2_decode_token_frame(static_cast<const uint8_t*>(info.ptr), info.size, config, dtype, max_escapes,
                                         id_bytes, start, shift, ptr<void>(out));
      },
      py::arg("frame"), py::arg("crc_seed"), py::arg("d"), py::arg("kmax"), py::arg("tables"), py::arg("period"),
      py::arg("classes"), py::arg("n_classes"), py::arg("step"), py::arg("center"), py::arg("scale"), py::arg("dtype"),
      py::arg("max_escapes"), py::arg("id_bytes"), py::arg("start"), py::arg("shift"), py::arg("out"),
      "A codec v2 frame of one rANS-coded token of dtype (the session config's CRC seed, d, kmax, rANS table "
      "pointers per channel and per class, step and center at the frame's step scale, and that scale: 0 or the "
      "frame's scale byte) decoded into out [1, d]; id_bytes of token ids after the escape count are skipped (the "
      "caller reads them); shift > 0: a shifted frame from position start whose token has that shift, 0: no "
      "shifted bit. False when it is anything else or invalid (the caller then runs the reference parser).");

  m.def(
      "v2_encode_token_frame",
      [](std::uintptr_t x, uint32_t crc_seed, int64_t d, int kmax, std::uintptr_t tables, int64_t period,
         std::uintptr_t inv, std::uintptr_t center, int scale, int64_t raw_limit, int dtype, int lanes,
         py::bytes ids, int src_dtype, int64_t start, int shift) -> py::object {
        if (src_dtype < 0) src_dtype = dtype;
        if (d < 1 || dtype < sk::kFloat32 || dtype > sk::kBFloat16 || src_dtype > sk::kBFloat16) {
          throw std::invalid_argument("v2_encode_token_frame: bad d, dtype or src_dtype");
        }
        if (scale < -128 || scale > 127) throw std::invalid_argument("v2_encode_token_frame: scale is not an i8");
        if (lanes != 1 && lanes != sk::kRansLongLanes) throw std::invalid_argument("v2_encode_token_frame: lanes is not 1 or 4");
        if (shift < 0 || shift > sk::kMaxTokenShift || start < 0 || start > sk::kMaxTokenStart) {
          throw std::invalid_argument("v2_encode_token_frame: shift or start out of range");
        }
        const sk::TokenFrameConfig config{crc_seed, d, kmax, ptr<const sk::RansTables* const>(tables), period,
                                          nullptr, 0, nullptr, ptr<const float>(center), scale};
        const std::string_view id_section = ids;
        const auto id_bytes = static_cast<int64_t>(id_section.size());
        thread_local std::vector<uint8_t> out;
        out.resize(sk::v2_token_frame_capacity(d, dtype, id_bytes));
        int64_t len;
        {
          py::gil_scoped_release nogil;
          len = sk::v2_encode_token_frame(ptr<const void>(x), src_dtype, config, ptr<const float>(inv), raw_limit,
                                          dtype, lanes, reinterpret_cast<const uint8_t*>(id_section.data()), id_bytes,
                                          start, shift, out.data());
        }
        if (len <= 0) return py::int_(len);
        return py::bytes(reinterpret_cast<const char*>(out.data()), len);
      },
      py::arg("x"), py::arg("crc_seed"), py::arg("d"), py::arg("kmax"), py::arg("tables"), py::arg("period"),
      py::arg("inv"), py::arg("center"), py::arg("scale"), py::arg("raw_limit"), py::arg("dtype"), py::arg("lanes"),
      py::arg("ids") = py::bytes(), py::arg("src_dtype") = -1, py::arg("start") = 0, py::arg("shift") = 0,
      "One token x [1, d] of src_dtype (contiguous; -1: dtype), rounded to dtype where they differ, as a codec v2 "
      "rANS frame (the session config's CRC seed, d, kmax, rANS table pointers, 1/step and center at the frame's "
      "step scale, and that scale, 0 for none; lanes: 1, or 4 for the four-lane layout (coder 6); ids: the "
      "token-id section of a config's prediction, x then the residual): the frame's bytes, 0 when the token "
      "travels raw (more than raw_limit escapes) or -1 when x in dtype is not finite (the caller's general path "
      "handles both); shift > 0: the token's shift at position start, as fine codes with a residual section.");

  m.def(
      "crc32",
      [](std::uintptr_t data, int64_t n, uint32_t crc, bool table_only) {
        return table_only ? sk::crc32_table(crc, ptr<const uint8_t>(data), n) : sk::crc32(crc, ptr<const uint8_t>(data), n);
      },
      py::arg("data"), py::arg("n"), py::arg("crc") = 0, py::arg("table_only") = false, nogil,
      "zlib-compatible CRC-32 of n bytes continuing crc (carry-less multiply when the CPU has it).");

  m.def(
      "lowbit_dequantize",
      [](std::uintptr_t qweight, int64_t N, int64_t words, int64_t K, std::uintptr_t scale, std::uintptr_t zero,
         int scale_dtype, int bits, int64_t group_size, std::uintptr_t out, int out_dtype) {
        check(sk::lowbit_dequantize(ptr<const int32_t>(qweight), N, words, K, ptr<const void>(scale),
                                    ptr<const void>(zero), scale_dtype, bits, group_size, ptr<void>(out), out_dtype));
      },
      py::arg("qweight"), py::arg("N"), py::arg("words"), py::arg("K"), py::arg("scale"), py::arg("zero"),
      py::arg("scale_dtype"), py::arg("bits"), py::arg("group_size"), py::arg("out"), py::arg("out_dtype"), nogil,
      "Dequantise W into out [N, K] of out_dtype (float32 or bfloat16 code).");

  m.def("lowbit_bf16_kernel", &sk::lowbit_bf16_kernel, py::arg("dtype"), py::arg("bits"), py::arg("group_size"),
        "Whether lowbit_linear runs the bf16-activation kernels for this dtype code and layout (at every M).");
  m.def("lowbit_vnni", &sk::lowbit_vnni, py::arg("dtype"), py::arg("bits"), py::arg("group_size"), py::arg("M"),
        py::arg("K"), "Whether lowbit_linear runs the VNNI path for this dtype code, layout, M and K (finite x).");
  m.def("lowbit_isas", &sk::lowbit_isas, "Instruction sets of the lowbit and int8 kernels this CPU supports, best last.");
  m.def("lowbit_isa", &sk::lowbit_isa, "Instruction set the lowbit and int8 kernels use now.");
  m.def(
      "set_lowbit_isa", [](const std::string& name) { check(sk::set_lowbit_isa(name)); }, py::arg("name"),
      "Use the lowbit and int8 kernels of one instruction set (tests and benchmarks).");

  m.def("set_num_threads", [](int n) {
    sk::set_num_threads(n);
#ifdef _OPENMP
    omp_set_num_threads(n < 1 ? 1 : n);
#endif
  }, py::arg("n"), "Threads of later kernel calls (the worker pool, and OpenMP for this Python thread).");

  m.def("num_threads", &sk::num_threads, "Threads the lowbit and int8 kernels use, the caller included.");
  m.def("set_spin_us", &sk::set_spin_us, py::arg("us"),
        "How long an idle pool worker spins for the next job before it sleeps (microseconds, 0..10000).");
  m.def("spin_us", &sk::spin_us, "The pool workers' spin before they sleep, in microseconds.");
  m.def("team_stats", [] {
    const sk::TeamStats s = sk::team_stats();
#ifdef _OPENMP
    const bool openmp = true;
#else
    const bool openmp = false;
#endif
    return py::dict(py::arg("openmp") = openmp, py::arg("team_calls") = s.team_calls,
                    py::arg("pool_calls") = s.pool_calls, py::arg("spin_backoffs") = s.spin_backoffs);
  }, "Whether parallel calls can run on torch's OpenMP team (built with OpenMP), how many so far ran on "
     "the calling thread's OpenMP team and on the worker pool, and how often a spinning pool worker found "
     "its core taken and paused the spin.");

  bind_decode(m);
}
