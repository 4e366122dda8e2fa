// CUDA tree verification: one thread block per sequence; the tree walk is uniform control flow
// (every thread takes the same decisions from block-wide values), the O(V) work -- loading a target
// row, residual updates, sums and the inverse-CDF sample -- is spread over the block.
#include "tree_verify.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

namespace soaes {
namespace {

constexpr int kBlock = 256;

__device__ double block_sum(double v, double* warp_sums) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffff, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kBlock / 32 ? warp_sums[lane] : 0.0;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffff, v, o);
    if (lane == 0) warp_sums[32] = v;
  }
  __syncthreads();
  const double s = warp_sums[32];
  __syncthreads();
  return s;
}

__global__ void tree_verify_kernel(int64_t N, int64_t V, const int64_t* __restrict__ parents_all,
                                   const int64_t* __restrict__ tokens_all, const float* __restrict__ p_all,
                                   const float* __restrict__ q_all, const float* __restrict__ u_all,
                                   int64_t* path_all, int64_t* length_all, int64_t* next_all, double* r_all) {
  __shared__ double warp_sums[33];
  __shared__ double chunk_sums[kBlock];
  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x;
  const int64_t* parents = parents_all + b * N;
  const int64_t* tokens = tokens_all + b * N;
  const float* p = p_all + b * N * V;
  const float* q = q_all ? q_all + b * N * V : nullptr;
  const float* u = u_all + b * N * 2;
  int64_t* path = path_all + b * N;
  double* r = r_all + b * V;

  auto load = [&](int64_t node) {
    double s = 0.0;
    for (int64_t v = tid; v < V; v += kBlock) { r[v] = p[node * V + v]; s += r[v]; }
    return block_sum(s, warp_sums);  // its __syncthreads also publishes r
  };

  int64_t node = 0, len = 1;
  if (tid == 0) path[0] = 0;
  double S = load(0);
  while (true) {
    int64_t accepted = -1;
    for (int64_t c = node + 1; c < N; ++c) {
      if (parents[c] != node) continue;
      const int64_t x = tokens[c];
      if (x < 0 || x >= V) { accepted = -2; break; }
      const double qx = q ? static_cast<double>(q[c * V + x]) : 1.0;
      if (static_cast<double>(u[c * 2]) * qx * S < r[x]) { accepted = c; break; }
      __syncthreads();  // everyone has read r[x] before it changes
      if (q) {
        double s = 0.0;
        for (int64_t v = tid; v < V; v += kBlock) {
          const double d = r[v] - S * q[c * V + v];
          r[v] = d > 0.0 ? d : 0.0;
          s += r[v];
        }
        S = block_sum(s, warp_sums);
      } else {
        const double rx = r[x];
        __syncthreads();
        if (tid == 0) r[x] = 0.0;
        S -= rx;
        __syncthreads();
      }
      if (!(S > 0.0)) S = load(node);
    }
    if (accepted == -2) {  // out-of-vocabulary token: report by length 0
      if (tid == 0) { length_all[b] = 0; next_all[b] = -1; }
      return;
    }
    if (accepted < 0) break;
    if (tid == 0) path[len] = accepted;
    ++len;
    node = accepted;
    __syncthreads();
    S = load(node);
  }

  // Inverse-CDF sample of r at target mass u*S: per-thread contiguous chunks, then a serial walk.
  const double target = static_cast<double>(u[node * 2 + 1]) * S;
  const int64_t chunk = (V + kBlock - 1) / kBlock;
  const int64_t lo = tid * chunk, hi = min(V, lo + chunk);
  double cs = 0.0;
  for (int64_t v = lo; v < hi; ++v) if (r[v] > 0.0) cs += r[v];
  chunk_sums[tid] = cs;
  __syncthreads();
  if (tid == 0) {
    double acc = 0.0;
    int64_t pick = -1, last = 0;
    for (int t = 0; t < kBlock && pick < 0; ++t) {
      if (acc + chunk_sums[t] > target) {
        const int64_t a = t * chunk, e = min(V, a + chunk);
        for (int64_t v = a; v < e; ++v) {
          if (r[v] > 0.0) { acc += r[v]; last = v; if (acc > target) { pick = v; break; } }
        }
      } else {
        acc += chunk_sums[t];
      }
    }
    if (pick < 0) {  // rounding ran out: the last positive entry, as on the CPU
      for (int64_t v = V - 1; v >= 0; --v) if (r[v] > 0.0) { last = v; break; }
      pick = last;
    }
    length_all[b] = len;
    next_all[b] = pick;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> tree_verify_cuda(
    const at::Tensor& parents, const at::Tensor& tokens, const at::Tensor& target_probs,
    const at::Tensor& draft_probs, const at::Tensor& uniforms) {
  check_inputs(parents, tokens, target_probs, draft_probs, uniforms);
  const c10::cuda::CUDAGuard guard(parents.device());
  const int64_t B = parents.size(0), N = parents.size(1), V = target_probs.size(2);
  auto path = at::full({B, N}, -1, parents.options());
  auto length = at::zeros({B}, parents.options());
  auto next = at::zeros({B}, parents.options());
  auto r = at::empty({B, V}, target_probs.options().dtype(at::kDouble));
  const bool has_q = draft_probs.numel() > 0;
  if (B > 0) {
    tree_verify_kernel<<<B, kBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
        N, V, parents.data_ptr<int64_t>(), tokens.data_ptr<int64_t>(), target_probs.data_ptr<float>(),
        has_q ? draft_probs.data_ptr<float>() : nullptr, uniforms.data_ptr<float>(), path.data_ptr<int64_t>(),
        length.data_ptr<int64_t>(), next.data_ptr<int64_t>(), r.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // An out-of-vocabulary draft token is reported by length 0 (no sync here; the Python wrapper checks).
  return {path, length, next};
}

}  // namespace soaes
