// Native decode step of llama-style decoder layers on the CPU: one call runs a token through a
// stack of layers (RMSNorm, Q/K/V projections, rotary, grouped-query attention over a static
// KV cache, output projection, gated SiLU MLP, residuals; other families' variants: DecodeLayer's
// optional norms, windows and rotary tables, DecodeShape's activation, LayerNorms, partial
// rotary, ALiBi, parallel layers, MLPs without a gate, one fused Q|K|V projection of any row
// order) and optionally the final norm and LM head with a fused argmax. The Python driver
// (splitkernels/fastpath/) decides which models this covers and keeps every tensor alive; here
// are only pointers and sizes.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace sk {

// One projection y [N] = x [K] @ W^T (+ bias), in one of three weight formats.
struct DecodeLinear {
  enum Kind : int { kLowbit = 0, kDense = 1, kInt8 = 2 };
  int kind = kDense;
  int64_t N = 0, K = 0;
  const float* bias = nullptr;  // fp32 [N] or null
  // kLowbit: the packed weight of docs/FORMATS.md section 2 (computed by sk::lowbit_linear).
  const int32_t* qweight = nullptr;
  int64_t words = 0;
  const void* scale = nullptr;
  const void* zero = nullptr;
  int scale_dtype = 0;
  int bits = 0;
  int64_t group_size = 0;
  // kDense: fp32 [N, K]. With kInt8 (LM head only, optional): the fp32 weight the int8 codes
  // were rounded from, so the top k can be made exact (see DecodeStack::step).
  const float* weight = nullptr;
  // kInt8 (LM head only): int8 [N, K] with one fp32 scale per row (activations are split into
  // two int8 rows, see decode.cpp),
  // codes = round(W / scale), scale = absmax / 127 (|W - codes * scale| <= scale / 2).
  const int8_t* w8 = nullptr;
  const float* w8_scale = nullptr;
};

// The MLP's activation a: down(a(gate) * up) (gated) or down(a(up)): silu (llama), the tanh
// approximation of gelu (gemma, phi), relu(x)^2 (arcee), gelu (erf), relu (opt).
enum DecodeActivation : int { kSilu = 0, kGeluTanh = 1, kRelu2 = 2, kGelu = 3, kRelu = 4 };

struct DecodeShape {
  int64_t hidden = 0, heads = 0, kv_heads = 0, head_dim = 0, intermediate = 0;
  float attn_scale = 1.f;
  int act = kSilu;
  float attn_softcap = 0.f;  // > 0: attention scores s become attn_softcap tanh(s / attn_softcap) (gemma 2)
  bool rope_interleaved = false;  // rotary pairs (2i, 2i + 1) rather than halves (i, i + rotary_dim / 2)
  float residual_scale = 1.f;  // each sublayer adds residual_scale times its output (granite)
  // With q_pos_period > 0, the queries at position p scale by 1 + q_pos_beta log(1 + floor(p /
  // q_pos_period)) (ministral 3's attention at positions past its original context).
  float q_pos_beta = 0.f;
  int64_t q_pos_period = 0;
  int64_t rotary_dim = 0;  // rotary turns each head's first rotary_dim values (even; 0: all head_dim)
  // Norms are LayerNorms, (x - mean) / sqrt(var + eps) * w (+ b), rather than RMSNorms.
  bool layer_norm = false;
  // h + attn + mlp, the MLP taking the attention's normed input (phi, cohere) or, where the layer
  // has a post_norm, its own norm of the layer's input (gpt-neox).
  bool parallel = false;
  bool gated = true;      // the MLP is down(act(gate) * up); false: down(act(up)) with no gate
  float clip_qkv = 0.f;   // > 0: q, k and v are clamped to [-clip_qkv, clip_qkv] (olmo)
};

// A mixture of experts in place of the MLP (mixtral, qwen-moe, olmoe): a softmax over the
// router's logits (or with `sigmoid` each logit's sigmoid: flint) picks the top_k experts (their
// scores renormalised to sum 1 with `renormalize`), each a gated MLP whose fp32 weights are one
// slice of 3-D tensors, the outputs summed by score; and optionally a shared expert (a gated MLP) scaled by
// sigmoid(shared_scale . x), or added in full without shared_scale. experts == 0: a plain MLP.
struct DecodeMoE {
  int64_t experts = 0, top_k = 0, expert_dim = 0;
  const float* router = nullptr;   // fp32 [experts, hidden]
  const float* gate_up = nullptr;  // fp32 [experts, 2 expert_dim, hidden]: each expert's gate rows, then up rows
  const float* down = nullptr;     // fp32 [experts, hidden, expert_dim]
  bool renormalize = false;
  bool sigmoid = false, choose_by_logit = false;
  // DeepSeek-V3's choice (glm4-moe): experts are chosen by score + choice_bias (null: none) among
  // the top_groups of `groups` equal groups (ranked by the sum of their two best), weighted by
  // their scores alone (renormalised as above) and scaled by routed_scale. choose_by_logit: by
  // logit + choice_bias instead (kolibri's sigmoid scores).
  const float* choice_bias = nullptr;
  int64_t groups = 1, top_groups = 1;
  float routed_scale = 1.f;
  DecodeLinear shared_gate, shared_up, shared_down;  // shared_up.N == 0: no shared expert
  const float* shared_scale = nullptr;               // fp32 [hidden] or null
  // Input-major experts (gpt-oss, aria): gate_up [experts, hidden, 2 expert_dim] whose columns
  // 2i and 2i + 1 are gate i and up i (`alternate`, gpt-oss) or i and expert_dim + i, down
  // [experts, expert_dim, hidden]; biases of both ([experts, 2 expert_dim], [experts, hidden];
  // null: none) and of the router's logits ([experts]). With swiglu_limit > 0 the gate's
  // activation is the clamped SwiGLU: (u + 1) g sigmoid(swiglu_alpha g) with g = min(gate, limit),
  // u = up clamped to [-limit, limit].
  bool input_major = false, alternate = false;
  const float* gate_up_bias = nullptr;
  const float* down_bias = nullptr;
  const float* router_bias = nullptr;
  float swiglu_alpha = 0.f, swiglu_limit = 0.f;
};

struct DecodeLayer {
  // fp32 [hidden] RMSNorm weights of the attention's and the MLP's inputs; null: the input as
  // it is (families that norm only the sublayers' outputs).
  const float* input_norm = nullptr;
  const float* post_norm = nullptr;
  const float* input_norm_bias = nullptr;  // of a LayerNorm (null: none)
  const float* post_norm_bias = nullptr;
  float eps = 1e-6f;
  DecodeLinear q, k, v, o, gate, up, down;
  // qkv.N > 0: q, k and v are one projection [(heads + 2 kv_heads) head_dim, hidden] (q, k and v
  // then empty) whose output row r is value qkv_rows[r] of q | k | v, one after another (a
  // permutation: the family's layout, e.g. for each key/value head its query heads, its key and
  // its value in gpt-neox).
  DecodeLinear qkv;
  const int64_t* qkv_rows = nullptr;
  // Optional (null: none): norms of each query and key head [head_dim] before rotary (or, with
  // head_norm_whole, of each row's whole query [heads * head_dim] and key [kv_heads * head_dim]
  // projection), and of the attention's and the MLP's outputs [hidden] before their residual
  // adds (gemma's layers). The head norms are of the shape's kind (LayerNorms with their optional
  // biases, or RMSNorms); with head_norm_each every head has weights (and biases) of its own,
  // q_norm [heads, head_dim] and k_norm [kv_heads, head_dim] (stablelm, cohere).
  const float* q_norm = nullptr;
  const float* k_norm = nullptr;
  const float* q_norm_bias = nullptr;
  const float* k_norm_bias = nullptr;
  bool head_norm_whole = false;
  bool head_norm_each = false;
  const float* attn_out_norm = nullptr;
  const float* mlp_out_norm = nullptr;
  int64_t window = 0;  // attend over the last `window` positions (this one included); 0: all
  int64_t rope = 0;    // which of the rotary tables of a position row this layer uses
  const float* sinks = nullptr;  // fp32 [heads]: each query head's attention sink (null: none)
  // fp32 [heads] (null: none): ALiBi's slopes, the score of each earlier position gaining its
  // head's slope times its distance back, -slope (pos - j) (bloom, mpt); no rotary with them.
  const float* alibi = nullptr;
  DecodeMoE moe;       // experts > 0: a mixture of experts instead of gate / up / down
};

// A stack of decoder layers (and an optional head) sharing one shape. The KV cache of a
// sequence is fp32 [layers, 2, kv_heads, capacity, head_dim] (keys after rotary), owned by the
// caller so that prefill can fill it from another cache.
class DecodeStack {
 public:
  explicit DecodeStack(const DecodeShape& shape) : shape_(shape) {}

  // Checks a layer's sizes against the shape; "" or an error naming the field.
  std::string add_layer(const DecodeLayer& layer);
  // Final norm weights fp32 [hidden] (and a LayerNorm's bias, or null) and the LM head (K =
  // hidden). A null norm: the head's input arrives normed (a stack of no layers serving a model
  // whose own forward ran the rest).
  std::string set_head(const float* norm, float eps, const DecodeLinear& head, const float* norm_bias = nullptr);

  // Runs h [hidden] (fp32, in place) at position `pos` through every layer, writing each
  // layer's key and value at `pos` of `kv`. cos/sin: rotary tables' rows for `pos`, [tables,
  // head_dim] (a layer reads row `rope`).
  // With a head: fills logits [vocab] (may be null) and the k rows of largest logit, largest
  // first (ties: lower row first), into ids [k] and vals [k] (may be null); ids[0] is the argmax.
  // An int8 head (W8A8 on VNNI) with its fp32 weight gives the fp32 head's top k exactly:
  // every row whose W8A8 logit is within the rounding bound of the k-th best is recomputed in
  // fp32. With `logits` it computes every row from the fp32 weight instead (full logits are
  // for sampling from the whole distribution, which must be the model's).
  std::string step(float* h, int64_t pos, float* kv, int64_t capacity, const float* cos, const float* sin,
                   float* logits, int64_t k, int64_t* ids, float* vals) const;
  // The step of M sequences at once (continuous batching on the server): row m of h [M, hidden]
  // at position pos[m] of its own cache kv[m] (capacity[m]), with its rotary rows cos[m]/sin[m].
  // Every weight is read once for all rows (a mixture of experts reads each row's own experts).
  // Each row's results (h, cache, logits, top k) are
  // bit-identical to step() on that row alone: every sum runs in the same order. logits is
  // [M, vocab] (may be null), ids and vals [M, k]. step() is this with M = 1.
  std::string step_batch(float* h, int64_t M, const int64_t* pos, float* const* kv, const int64_t* capacity,
                         const float* const* cos, const float* const* sin, float* logits, int64_t k, int64_t* ids,
                         float* vals) const;

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }
  bool has_head() const { return has_head_; }
  const DecodeShape& shape() const { return shape_; }

 private:
  DecodeShape shape_;
  std::vector<DecodeLayer> layers_;
  bool has_head_ = false;
  const float* head_norm_ = nullptr;
  const float* head_norm_bias_ = nullptr;
  float head_eps_ = 1e-6f;
  DecodeLinear head_;
};

// Name of the vector primitives in use (follows the low-bit kernels' instruction set).
std::string decode_isa();

}  // namespace sk
