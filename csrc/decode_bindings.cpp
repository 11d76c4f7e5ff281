// pybind11 bindings of the native decode step (csrc/cpu/decode/): the DecodeStack class of
// splitkernels._C. Weights cross as dicts of integer data pointers and sizes; the Python
// driver (splitkernels/fastpath/native.py) keeps the tensors alive and checks dtypes.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "binding_helpers.h"
#include "cpu/decode/decode.h"

namespace py = pybind11;

namespace {

using sk::bind::check;
using sk::bind::ptr;

template <typename T>
T get(const py::dict& d, const char* key, T fallback) {
  return d.contains(key) ? d[key].cast<T>() : fallback;
}

sk::DecodeLinear linear(const py::dict& d) {
  sk::DecodeLinear l;
  l.kind = get<int>(d, "kind", sk::DecodeLinear::kDense);
  l.N = get<int64_t>(d, "N", 0);
  l.K = get<int64_t>(d, "K", 0);
  l.bias = ptr<const float>(get<std::uintptr_t>(d, "bias", 0));
  l.qweight = ptr<const int32_t>(get<std::uintptr_t>(d, "qweight", 0));
  l.words = get<int64_t>(d, "words", 0);
  l.scale = ptr<const void>(get<std::uintptr_t>(d, "scale", 0));
  l.zero = ptr<const void>(get<std::uintptr_t>(d, "zero", 0));
  l.scale_dtype = get<int>(d, "scale_dtype", 0);
  l.bits = get<int>(d, "bits", 0);
  l.group_size = get<int64_t>(d, "group_size", 0);
  l.weight = ptr<const float>(get<std::uintptr_t>(d, "weight", 0));
  l.w8 = ptr<const int8_t>(get<std::uintptr_t>(d, "w8", 0));
  l.w8_scale = ptr<const float>(get<std::uintptr_t>(d, "w8_scale", 0));
  return l;
}

}  // namespace

void bind_decode(py::module_& m) {
  py::class_<sk::DecodeStack>(m, "DecodeStack",
                              "Native decode step of llama-style layers (see csrc/cpu/decode/decode.h).")
      .def(py::init([](int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t intermediate,
                       float attn_scale, int act, float attn_softcap, bool rope_interleaved, float residual_scale,
                       float q_pos_beta, int64_t q_pos_period, int64_t rotary_dim, bool layer_norm, bool parallel,
                       bool gated, float clip_qkv) {
             if (hidden <= 0 || heads <= 0 || kv_heads <= 0 || head_dim <= 0 || intermediate <= 0)
               throw std::invalid_argument("hidden, heads, kv_heads, head_dim and intermediate must be positive");
             if (heads % kv_heads) throw std::invalid_argument("heads must be a multiple of kv_heads");
             if (head_dim % 2) throw std::invalid_argument("head_dim must be even (rotary halves)");
             if (rotary_dim < 0 || rotary_dim > head_dim || rotary_dim % 2)
               throw std::invalid_argument("rotary_dim must be even and in [0, head_dim] (0: head_dim)");
             if (act < sk::kSilu || act > sk::kRelu)
               throw std::invalid_argument(
                   "act must be 0 (silu), 1 (gelu, tanh approximation), 2 (relu^2), 3 (gelu) or 4 (relu)");
             if (!(clip_qkv >= 0.f) || std::isinf(clip_qkv))
               throw std::invalid_argument("clip_qkv must be finite and >= 0 (0: none)");
             if (!(attn_softcap >= 0.f) || std::isinf(attn_softcap))
               throw std::invalid_argument("attn_softcap must be finite and >= 0 (0: none)");
             if (!std::isfinite(residual_scale)) throw std::invalid_argument("residual_scale must be finite");
             if (!std::isfinite(q_pos_beta) || q_pos_period < 0)
               throw std::invalid_argument("q_pos_beta must be finite and q_pos_period >= 0 (0: none)");
             return sk::DecodeStack(
                 sk::DecodeShape{hidden, heads, kv_heads, head_dim, intermediate, attn_scale, act, attn_softcap,
                                 rope_interleaved, residual_scale, q_pos_beta, q_pos_period, rotary_dim, layer_norm,
                                 parallel, gated, clip_qkv});
           }),
           py::arg("hidden"), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("intermediate"),
           py::arg("attn_scale"), py::arg("act") = 0, py::arg("attn_softcap") = 0.f,
           py::arg("rope_interleaved") = false, py::arg("residual_scale") = 1.f, py::arg("q_pos_beta") = 0.f,
           py::arg("q_pos_period") = 0, py::arg("rotary_dim") = 0, py::arg("layer_norm") = false,
           py::arg("parallel") = false, py::arg("gated") = true, py::arg("clip_qkv") = 0.f)
      .def(
          "add_layer",
          [](sk::DecodeStack& s, std::uintptr_t input_norm, std::uintptr_t post_norm, float eps, const py::dict& q,
             const py::dict& k, const py::dict& v, const py::dict& o, const py::dict& gate, const py::dict& up,
             const py::dict& down, std::uintptr_t q_norm, std::uintptr_t k_norm, std::uintptr_t attn_out_norm,
             std::uintptr_t mlp_out_norm, int64_t window, int64_t rope, bool head_norm_whole,
             std::uintptr_t input_norm_bias, std::uintptr_t post_norm_bias, const py::dict& moe,
             std::uintptr_t sinks, const py::dict& qkv, std::uintptr_t q_norm_bias, std::uintptr_t k_norm_bias,
             bool head_norm_each, std::uintptr_t alibi, std::uintptr_t qkv_rows) {
            sk::DecodeLayer l;
            l.input_norm = ptr<const float>(input_norm);
            l.post_norm = ptr<const float>(post_norm);
            l.input_norm_bias = ptr<const float>(input_norm_bias), l.post_norm_bias = ptr<const float>(post_norm_bias);
            l.eps = eps;
            l.q = linear(q), l.k = linear(k), l.v = linear(v), l.o = linear(o), l.qkv = linear(qkv);
            l.gate = linear(gate), l.up = linear(up), l.down = linear(down);
            l.q_norm = ptr<const float>(q_norm), l.k_norm = ptr<const float>(k_norm);
            l.attn_out_norm = ptr<const float>(attn_out_norm), l.mlp_out_norm = ptr<const float>(mlp_out_norm);
            l.q_norm_bias = ptr<const float>(q_norm_bias), l.k_norm_bias = ptr<const float>(k_norm_bias);
            l.window = window, l.rope = rope, l.head_norm_whole = head_norm_whole, l.head_norm_each = head_norm_each;
            l.sinks = ptr<const float>(sinks), l.alibi = ptr<const float>(alibi);
            l.qkv_rows = ptr<const int64_t>(qkv_rows);
            if (!moe.empty()) {
              sk::DecodeMoE& x = l.moe;
              x.experts = get<int64_t>(moe, "experts", 0), x.top_k = get<int64_t>(moe, "top_k", 0);
              x.expert_dim = get<int64_t>(moe, "expert_dim", 0), x.renormalize = get<bool>(moe, "renormalize", false);
              x.sigmoid = get<bool>(moe, "sigmoid", false);
              x.choose_by_logit = get<bool>(moe, "choose_by_logit", false);
              x.choice_bias = ptr<const float>(get<std::uintptr_t>(moe, "choice_bias", 0));
              x.groups = get<int64_t>(moe, "groups", 1), x.top_groups = get<int64_t>(moe, "top_groups", 1);
              x.routed_scale = get<float>(moe, "routed_scale", 1.f);
              x.router = ptr<const float>(get<std::uintptr_t>(moe, "router", 0));
              x.gate_up = ptr<const float>(get<std::uintptr_t>(moe, "gate_up", 0));
              x.down = ptr<const float>(get<std::uintptr_t>(moe, "down", 0));
              x.input_major = get<bool>(moe, "input_major", false), x.alternate = get<bool>(moe, "alternate", false);
              x.gate_up_bias = ptr<const float>(get<std::uintptr_t>(moe, "gate_up_bias", 0));
              x.down_bias = ptr<const float>(get<std::uintptr_t>(moe, "down_bias", 0));
              x.router_bias = ptr<const float>(get<std::uintptr_t>(moe, "router_bias", 0));
              x.swiglu_alpha = get<float>(moe, "swiglu_alpha", 0.f);
              x.swiglu_limit = get<float>(moe, "swiglu_limit", 0.f);
              if (moe.contains("shared_up")) {
                x.shared_gate = linear(moe["shared_gate"].cast<py::dict>());
                x.shared_up = linear(moe["shared_up"].cast<py::dict>());
                x.shared_down = linear(moe["shared_down"].cast<py::dict>());
                x.shared_scale = ptr<const float>(get<std::uintptr_t>(moe, "shared_scale", 0));
              }
            }
            check(s.add_layer(l));
          },
          py::arg("input_norm"), py::arg("post_norm"), py::arg("eps"), py::arg("q"), py::arg("k"), py::arg("v"),
          py::arg("o"), py::arg("gate"), py::arg("up"), py::arg("down"), py::arg("q_norm") = 0, py::arg("k_norm") = 0,
          py::arg("attn_out_norm") = 0, py::arg("mlp_out_norm") = 0, py::arg("window") = 0, py::arg("rope") = 0,
          py::arg("head_norm_whole") = false, py::arg("input_norm_bias") = 0, py::arg("post_norm_bias") = 0,
          py::arg("moe") = py::dict(), py::arg("sinks") = 0, py::arg("qkv") = py::dict(), py::arg("q_norm_bias") = 0,
          py::arg("k_norm_bias") = 0, py::arg("head_norm_each") = false, py::arg("alibi") = 0,
          py::arg("qkv_rows") = 0)
      .def(
          "set_head",
          [](sk::DecodeStack& s, std::uintptr_t norm, float eps, const py::dict& head, std::uintptr_t norm_bias) {
            check(s.set_head(ptr<const float>(norm), eps, linear(head), ptr<const float>(norm_bias)));
          },
          py::arg("norm"), py::arg("eps"), py::arg("head"), py::arg("norm_bias") = 0)
      .def(
          "step",
          [](const sk::DecodeStack& s, std::uintptr_t h, int64_t pos, std::uintptr_t kv, int64_t capacity,
             std::uintptr_t cos, std::uintptr_t sin, std::uintptr_t logits, int64_t k, std::uintptr_t ids,
             std::uintptr_t vals) {
            int64_t token = -1;
            std::string err;
            {
              py::gil_scoped_release nogil;
              err = s.step(ptr<float>(h), pos, ptr<float>(kv), capacity, ptr<const float>(cos), ptr<const float>(sin),
                           ptr<float>(logits), k, ids ? ptr<int64_t>(ids) : &token, ptr<float>(vals));
            }
            check(err);
            return ids && s.has_head() ? ptr<int64_t>(ids)[0] : token;
          },
          py::arg("h"), py::arg("pos"), py::arg("kv"), py::arg("capacity"), py::arg("cos"), py::arg("sin"),
          py::arg("logits") = 0, py::arg("k") = 1, py::arg("ids") = 0, py::arg("vals") = 0,
          "Run h [hidden] fp32 (in place) at pos through the layers (and head); the argmax token or -1.\n"
          "With a head and k > 1: the top k rows into ids [k] int64 and vals [k] fp32 (see decode.h).")
      .def(
          "step_batch",
          [](const sk::DecodeStack& s, std::uintptr_t h, int64_t rows, std::uintptr_t pos, std::uintptr_t kv,
             std::uintptr_t capacity, std::uintptr_t cos, std::uintptr_t sin, std::uintptr_t logits, int64_t k,
             std::uintptr_t ids, std::uintptr_t vals) {
            if (rows < 1 || !pos || !kv || !capacity || !cos || !sin)
              throw std::invalid_argument("step_batch needs rows >= 1 and the pos, kv, capacity, cos and sin arrays");
            std::string err;
            {
              py::gil_scoped_release nogil;
              err = s.step_batch(ptr<float>(h), rows, ptr<const int64_t>(pos), ptr<float* const>(kv),
                                 ptr<const int64_t>(capacity), ptr<const float* const>(cos),
                                 ptr<const float* const>(sin), ptr<float>(logits), k, ptr<int64_t>(ids),
                                 ptr<float>(vals));
            }
            check(err);
          },
          py::arg("h"), py::arg("rows"), py::arg("pos"), py::arg("kv"), py::arg("capacity"), py::arg("cos"),
          py::arg("sin"), py::arg("logits"), py::arg("k"), py::arg("ids"), py::arg("vals"),
          "Run `rows` sequences' tokens h [rows, hidden] fp32 (in place) as one step; pos, capacity [rows] int64\n"
          "and kv, cos, sin [rows] arrays of data pointers (one cache and rotary row per sequence). With a head:\n"
          "the top k of each row into ids [rows, k] (vals [rows, k] may be 0), all logits [rows, vocab] when\n"
          "logits is given (see decode.h).")
      .def_property_readonly("num_layers", &sk::DecodeStack::num_layers)
      .def_property_readonly("has_head", &sk::DecodeStack::has_head);
  m.def("decode_isa", &sk::decode_isa, "Instruction set of the decode step's vector primitives.");
}
