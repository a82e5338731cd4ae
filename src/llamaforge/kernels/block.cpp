// One transformer block for one new token of one sequence (block_decode), or for a batch of
// one-token rows each in its own cache slot and position (block_rows: batched decode, and the
// verify forward of speculative decoding, whose rows share a slot), in one call from Python.
//
// A decode step of a small model is bound by per-operation overhead, not arithmetic: the bundled
// 135M model spent about as long in the Python and dispatch around its 30 blocks (a dozen module
// calls and some thirty torch operations each) as in their matrix products. This is the same
// block as model.py's TransformerBlock, made of the same kernels and torch operations in the same
// order, so its output is bit-identical to the module path (tests/test_native.py checks it):
//
//   x = rms_norm(h) ; q, k, v = x Wq, x Wk, x Wv ; rope(q), rope(k) ; cache <- k, v
//   h = h + attention(q, cache) Wo ; x = rms_norm(h) ; h = h + (silu(x W1) * x W3) W2
#include <torch/extension.h>

#include <vector>

namespace lf {
std::vector<torch::Tensor> ggml_matmul(torch::Tensor x, std::vector<torch::Tensor> ws, int64_t type, int64_t K,
                                       bool int8);
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, c10::optional<torch::Tensor> mask,
                               c10::optional<torch::Tensor> rows);
torch::Tensor quantize_q8_0(torch::Tensor x);
torch::Tensor rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps);
void lora_add_(torch::Tensor y, torch::Tensor x, std::vector<torch::Tensor> a, std::vector<torch::Tensor> bt,
               torch::Tensor idx, torch::Tensor scaling);

namespace {
// x times each of the matrices ws[i] (GGML type types[i]); matrices of one type in one call, as
// GGMLLinear's sibling groups do (q/k/v, gate/up), so the products are the module path's
std::vector<torch::Tensor> products(const torch::Tensor& x, const std::vector<torch::Tensor>& ws,
                                    const std::vector<int64_t>& types, bool int8) {
  bool same = true;
  for (size_t i = 1; i < ws.size(); ++i) same = same && types[i] == types[0];
  const int64_t K = x.size(-1);
  if (same) return ggml_matmul(x, ws, types[0], K, int8);
  std::vector<torch::Tensor> out;
  for (size_t i = 0; i < ws.size(); ++i) out.push_back(ggml_matmul(x, {ws[i]}, types[i], K, int8)[0]);
  return out;
}

// float32 keys or values in a cache's storage type (Q8_0 blocks for a uint8 cache), as KVCache._encode
torch::Tensor encode(const torch::Tensor& x, c10::ScalarType t) {
  return t == torch::kByte ? quantize_q8_0(x) : x.to(t);
}

// k [1, 1, Kh, Hd] float32 into the cache window [1, Kh, 1, Hd | row bytes] of the cache's type
void store(const torch::Tensor& window, const torch::Tensor& k) {
  window.copy_(encode(k.view({1, k.size(2), 1, k.size(3)}), window.scalar_type()));
}

// No adapter updates (block_decode): `adapt(i, y, x)` adds projection i's to its product y of x.
struct NoAdapters {
  void operator()(int, torch::Tensor&, const torch::Tensor&) const {}
};

// The block's second half, h + (silu(x W1) * x W3) W2 with x = rms_norm(h), w[4..6] the FFN's
template <class Adapt>
torch::Tensor feed_forward(const torch::Tensor& h, const std::vector<torch::Tensor>& w, const std::vector<int64_t>& types,
                           bool int8, const torch::Tensor& norm, double eps, const Adapt& adapt) {
  auto x = rms_norm(h, norm, eps);
  auto gu = products(x, {w[4], w[5]}, {types[4], types[5]}, int8);
  adapt(4, gu[0], x);
  adapt(5, gu[1], x);
  auto a = at::silu(gu[0]) * gu[1];
  auto d = ggml_matmul(a, {w[6]}, types[6], a.size(-1), int8)[0];
  adapt(6, d, a);
  return h + d;
}
}  // namespace

// h [1, 1, D] float32; w: the blocks of wq, wk, wv, wo, w1, w3, w2 with their GGML types;
// cos, sin [1, 1, Hd / 2]; kv: this layer's cache windows (new k, new v [1, Kh, 1, .], then the
// attended k, v [1, Kh, L, .]). Returns the block's output h' [1, 1, D].
torch::Tensor block_decode(torch::Tensor h, std::vector<torch::Tensor> w, std::vector<int64_t> types, bool int8,
                           torch::Tensor attn_norm, torch::Tensor ffn_norm, double eps, torch::Tensor cos,
                           torch::Tensor sin, std::vector<torch::Tensor> kv) {
  TORCH_CHECK(h.dim() == 3 && h.size(0) == 1 && h.size(1) == 1 && h.scalar_type() == torch::kFloat32,
              "block_decode takes one token of one sequence: float32 h [1, 1, D]");
  TORCH_CHECK(w.size() == 7 && types.size() == 7 && kv.size() == 4, "block_decode: 7 matrices and 4 cache windows");
  const int64_t Kh = kv[0].size(1), Hd = cos.size(-1) * 2;
  const int64_t H = w[0].size(0) / Hd;
  TORCH_CHECK(H * Hd == w[0].size(0) && Kh * Hd == w[1].size(0), "block_decode: head sizes do not match");

  auto qkv = products(rms_norm(h, attn_norm, eps), {w[0], w[1], w[2]}, {types[0], types[1], types[2]}, int8);
  auto q = rope(qkv[0].view({1, 1, H, Hd}), cos, sin);           // [1, 1, H, Hd]
  auto k = rope(qkv[1].view({1, 1, Kh, Hd}), cos, sin);
  store(kv[0], k);
  store(kv[1], qkv[2].view({1, 1, Kh, Hd}));
  auto att = decode_attention(q.view({1, H, 1, Hd}), kv[2], kv[3], c10::nullopt, c10::nullopt);   // [1, H, 1, Hd]
  h = h + ggml_matmul(att.view({1, 1, H * Hd}), {w[3]}, types[3], H * Hd, int8)[0];
  return feed_forward(h, w, types, int8, ffn_norm, eps, NoAdapters{});
}

// h [B, 1, D] float32: row b is the token at position pos[b] of cache slot slots[b]; kc, vc: this
// layer's whole cache [S, Kh, max_seq, Hd | row bytes]; mask [B, 1, 1, L] bool, L the keys to attend;
// cos, sin [B, 1, Hd / 2]. The module path of a batched decode step (KVCache.update's scattered
// writes, then ops.attention reading the slots in place), with the same kernels in the same order.
// Multi-LoRA rows (multilora.py): lora_a[i], lora_bt[i], lora_scaling[i] are projection i's
// adapter factors in the bank's order (empty: no adapter targets it), lora_rows [B] each row's
// adapter (-1: none); each update is added to its product as MultiLoraLinear does (lora_add_).
torch::Tensor block_rows(torch::Tensor h, std::vector<torch::Tensor> w, std::vector<int64_t> types, bool int8,
                         torch::Tensor attn_norm, torch::Tensor ffn_norm, double eps, torch::Tensor cos,
                         torch::Tensor sin, torch::Tensor kc, torch::Tensor vc, torch::Tensor slots,
                         torch::Tensor pos, torch::Tensor mask, std::vector<std::vector<torch::Tensor>> lora_a,
                         std::vector<std::vector<torch::Tensor>> lora_bt, std::vector<torch::Tensor> lora_scaling,
                         c10::optional<torch::Tensor> lora_rows) {
  TORCH_CHECK(h.dim() == 3 && h.size(1) == 1 && h.scalar_type() == torch::kFloat32,
              "block_rows takes one-token rows: float32 h [B, 1, D]");
  TORCH_CHECK(w.size() == 7 && types.size() == 7, "block_rows: 7 matrices");
  const int64_t B = h.size(0), Kh = kc.size(1), Hd = cos.size(-1) * 2, H = w[0].size(0) / Hd;
  TORCH_CHECK(H * Hd == w[0].size(0) && Kh * Hd == w[1].size(0), "block_rows: head sizes do not match");
  TORCH_CHECK(kc.dim() == 4 && vc.sizes() == kc.sizes() && mask.dim() == 4 && mask.size(0) == B,
              "block_rows: cache [S, K, max_seq, .] and mask [B, 1, 1, L]");
  const int64_t L = mask.size(-1);
  TORCH_CHECK(L <= kc.size(2), "block_rows: more keys than the cache holds");
  auto sl = slots.to(torch::kLong).contiguous(), ps = pos.to(torch::kLong).contiguous();
  TORCH_CHECK(sl.numel() == B && ps.numel() == B, "block_rows: one slot and one position per row");
  const int64_t* S = sl.data_ptr<int64_t>();
  const int64_t* P = ps.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(S[b] >= 0 && S[b] < kc.size(0) && P[b] >= 0 && P[b] < L, "block_rows: row ", b, " writes outside the cache");

  const bool lora = lora_rows.has_value() && lora_rows->defined();
  TORCH_CHECK(!lora || (lora_a.size() == 7 && lora_bt.size() == 7 && lora_scaling.size() == 7),
              "block_rows: adapter factors for each of the 7 matrices");
  auto adapt = [&](int i, torch::Tensor& y, const torch::Tensor& x) {   // y [B, 1, out] += row updates
    if (lora && !lora_a[i].empty())
      lora_add_(y.view({B, y.size(-1)}), x.reshape({B, x.size(-1)}), lora_a[i], lora_bt[i], *lora_rows, lora_scaling[i]);
  };
  auto x = rms_norm(h, attn_norm, eps);
  auto qkv = products(x, {w[0], w[1], w[2]}, {types[0], types[1], types[2]}, int8);
  for (int i = 0; i < 3; ++i) adapt(i, qkv[i], x);
  auto q = rope(qkv[0].view({B, 1, H, Hd}), cos, sin);           // [B, 1, H, Hd]
  auto k = encode(rope(qkv[1].view({B, 1, Kh, Hd}), cos, sin).view({B, Kh, Hd}), kc.scalar_type());
  auto v = encode(qkv[2].view({B, Kh, Hd}), vc.scalar_type());
  for (int64_t b = 0; b < B; ++b) {                               // kc[slot, :, pos] = k[b]
    kc.select(0, S[b]).select(1, P[b]).copy_(k[b]);
    vc.select(0, S[b]).select(1, P[b]).copy_(v[b]);
  }
  auto att = decode_attention(q.view({B, H, 1, Hd}), kc.narrow(2, 0, L), vc.narrow(2, 0, L), mask, sl)
                 .view({B, 1, H * Hd});
  auto o = ggml_matmul(att, {w[3]}, types[3], H * Hd, int8)[0];
  adapt(3, o, att);
  return feed_forward(h + o, w, types, int8, ffn_norm, eps, adapt);
}
}  // namespace lf
