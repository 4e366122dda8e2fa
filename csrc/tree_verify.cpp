// CPU tree verification op and the torch op registrations (soaes::tree_verify).
#include "tree_verify.h"

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <vector>

namespace soaes {
namespace {

constexpr int64_t kChunk = 2048;

// Sum of r[v] (v in [lo, hi)), 8 independent accumulators so the compiler can vectorise it.
template <typename T>
double range_sum(const T* r, int64_t lo, int64_t hi) {
  double a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t v = lo;
  for (; v + 8 <= hi; v += 8)
    for (int j = 0; j < 8; ++j) a[j] += static_cast<double>(r[v + j]);
  double s = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
  for (; v < hi; ++v) s += static_cast<double>(r[v]);
  return s;
}

// Float rows: 16 float lanes per block of 256 (SIMD without -ffast-math), blocks accumulated in double.
template <>
double range_sum<float>(const float* r, int64_t lo, int64_t hi) {
  double s = 0.0;
  int64_t v = lo;
  for (; v + 256 <= hi; v += 256) {
    float a[16] = {0};
    for (int64_t k = 0; k < 256; k += 16)
      for (int j = 0; j < 16; ++j) a[j] += r[v + k + j];
    double b = 0.0;
    for (int j = 0; j < 16; ++j) b += a[j];
    s += b;
  }
  for (; v < hi; ++v) s += static_cast<double>(r[v]);
  return s;
}

// The current (unnormalised) distribution at a node: the target row itself until the first
// rejection with a full draft distribution (then a residual copy), minus tokens zeroed by
// rejected one-hot drafts. Copy-on-write keeps deterministic drafts at O(V) per visited node.
struct Residual {
  const float* row = nullptr;       // target row while not copied
  std::vector<double> buf;          // residual once copied
  bool copied = false;
  std::vector<int64_t> zeroed;      // tokens rejected by one-hot drafts while not copied
  double S = 0.0;
  int64_t V = 0;

  void reset(const float* p_row) {
    row = p_row; copied = false; zeroed.clear();
    S = range_sum(row, 0, V);
  }
  bool is_zeroed(int64_t x) const {
    for (int64_t z : zeroed) if (z == x) return true;
    return false;
  }
  double at(int64_t x) const {
    if (copied) return buf[x];
    return is_zeroed(x) ? 0.0 : static_cast<double>(row[x]);
  }
  void reject_onehot(int64_t x) {
    const double rx = at(x);
    if (copied) buf[x] = 0.0; else if (rx > 0.0) zeroed.push_back(x);
    S -= rx;
  }
  void reject_dist(const float* q) {  // r <- max(0, r - S q)
    if (!copied) {
      buf.resize(V);
      for (int64_t v = 0; v < V; ++v) buf[v] = row[v];
      for (int64_t z : zeroed) buf[z] = 0.0;
      copied = true;
    }
    double* r = buf.data();
    const double s0 = S;
    for (int64_t v = 0; v < V; ++v) {
      const double d = r[v] - s0 * q[v];
      r[v] = d > 0.0 ? d : 0.0;
    }
    S = range_sum(r, 0, V);
  }
  double chunk_sum(int64_t lo, int64_t hi) const {
    if (copied) return range_sum(buf.data(), lo, hi);
    double s = range_sum(row, lo, hi);
    for (int64_t z : zeroed) if (z >= lo && z < hi) s -= row[z];
    return s;
  }
  // First index whose running sum of positive entries exceeds `target`; the last positive entry
  // if rounding runs out. Chunk sums find the chunk, a serial walk finds the index.
  int64_t sample(double target) const {
    double acc = 0.0;
    for (int64_t lo = 0; lo < V; lo += kChunk) {
      const int64_t hi = std::min(V, lo + kChunk);
      const double cs = chunk_sum(lo, hi);
      if (acc + cs <= target) { acc += cs; continue; }
      for (int64_t v = lo; v < hi; ++v) {
        const double rv = at(v);
        if (rv > 0.0) { acc += rv; if (acc > target) return v; }
      }
    }
    for (int64_t v = V - 1; v >= 0; --v) if (at(v) > 0.0) return v;
    return 0;
  }
};

void verify_one(int64_t N, int64_t V, const int64_t* parents, const int64_t* tokens, const float* p,
                const float* q, const float* u, int64_t* path, int64_t* length, int64_t* next, Residual& r) {
  r.V = V;
  int64_t node = 0, len = 1;
  path[0] = 0;
  r.reset(p);
  while (true) {
    int64_t accepted = -1;
    for (int64_t c = node + 1; c < N; ++c) {
      if (parents[c] != node) continue;
      const int64_t x = tokens[c];
      const double qx = q ? static_cast<double>(q[c * V + x]) : 1.0;
      if (static_cast<double>(u[c * 2]) * qx * r.S < r.at(x)) { accepted = c; break; }
      if (q) r.reject_dist(q + c * V); else r.reject_onehot(x);
      if (!(r.S > 0.0)) r.reset(p + node * V);  // p == q exactly: unreachable in exact arithmetic
    }
    if (accepted < 0) break;
    path[len++] = accepted;
    node = accepted;
    r.reset(p + node * V);
  }
  *length = len;
  *next = r.sample(static_cast<double>(u[node * 2 + 1]) * r.S);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> tree_verify_cpu(
    const at::Tensor& parents, const at::Tensor& tokens, const at::Tensor& target_probs,
    const at::Tensor& draft_probs, const at::Tensor& uniforms) {
  check_inputs(parents, tokens, target_probs, draft_probs, uniforms);
  const int64_t B = parents.size(0), N = parents.size(1), V = target_probs.size(2);
  auto path = at::full({B, N}, -1, parents.options());
  auto length = at::zeros({B}, parents.options());
  auto next = at::zeros({B}, parents.options());
  if (N > 1) {  // checked here: an exception must not be thrown inside the parallel region
    const auto drafted = tokens.slice(1, 1);
    TORCH_CHECK(!((drafted < 0) | (drafted >= V)).any().item<bool>(), "a draft token is outside the vocabulary of ", V);
  }
  const bool has_q = draft_probs.numel() > 0;
  const int64_t* par = parents.data_ptr<int64_t>();
  const int64_t* tok = tokens.data_ptr<int64_t>();
  const float* p = target_probs.data_ptr<float>();
  const float* q = has_q ? draft_probs.data_ptr<float>() : nullptr;
  const float* u = uniforms.data_ptr<float>();
  int64_t* out_path = path.data_ptr<int64_t>();
  int64_t* out_len = length.data_ptr<int64_t>();
  int64_t* out_next = next.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    Residual r;
    for (int64_t b = begin; b < end; ++b) {
      verify_one(N, V, par + b * N, tok + b * N, p + b * N * V, has_q ? q + b * N * V : nullptr,
                 u + b * N * 2, out_path + b * N, out_len + b, out_next + b, r);
    }
  });
  return {path, length, next};
}

}  // namespace soaes

TORCH_LIBRARY(soaes, m) {
  m.def("tree_verify(Tensor parents, Tensor tokens, Tensor target_probs, Tensor draft_probs, Tensor uniforms)"
        " -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(soaes, CPU, m) { m.impl("tree_verify", &soaes::tree_verify_cpu); }

#ifdef SOAES_WITH_CUDA
TORCH_LIBRARY_IMPL(soaes, CUDA, m) { m.impl("tree_verify", &soaes::tree_verify_cuda); }
#endif

// Importing the module loads the library, which registers the ops above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.attr("with_cuda") = pybind11::bool_(
#ifdef SOAES_WITH_CUDA
    true
#else
    false
#endif
); }
