// Lossless token-tree verification (speculative decoding), shared by the CPU and CUDA ops.
//
// Node 0 is the root (the last emitted token); parents[i] < i for every other node, and siblings
// are tried in index order. Each non-root node i carries the distribution q_i its token was drawn
// from (conditioned on the siblings before it); an empty draft_probs means every q_i is one-hot on
// its token (greedy / top-k drafts). Recursive rejection over siblings keeps an unnormalised
// residual r (sum S): accept child x with probability min(1, p(x)/q(x)) == [u*q(x)*S < r(x)];
// on rejection r <- max(0, r - S*q). The token emitted after the accepted path is sampled from r
// at the last accepted node (the target distribution there, or its residual), always.
#pragma once
#include <torch/library.h>
#include <ATen/ATen.h>

namespace soaes {
std::tuple<at::Tensor, at::Tensor, at::Tensor> tree_verify_cpu(
    const at::Tensor& parents, const at::Tensor& tokens, const at::Tensor& target_probs,
    const at::Tensor& draft_probs, const at::Tensor& uniforms);
#ifdef SOAES_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor> tree_verify_cuda(
    const at::Tensor& parents, const at::Tensor& tokens, const at::Tensor& target_probs,
    const at::Tensor& draft_probs, const at::Tensor& uniforms);
#endif

inline void check_inputs(const at::Tensor& parents, const at::Tensor& tokens, const at::Tensor& target_probs,
                         const at::Tensor& draft_probs, const at::Tensor& uniforms) {
  TORCH_CHECK(parents.dim() == 2 && parents.scalar_type() == at::kLong, "parents must be int64 [B, N]");
  TORCH_CHECK(tokens.sizes() == parents.sizes() && tokens.scalar_type() == at::kLong, "tokens must be int64 [B, N]");
  TORCH_CHECK(target_probs.dim() == 3 && target_probs.size(0) == parents.size(0) &&
              target_probs.size(1) == parents.size(1) && target_probs.scalar_type() == at::kFloat,
              "target_probs must be float32 [B, N, V]");
  TORCH_CHECK(draft_probs.numel() == 0 || (draft_probs.sizes() == target_probs.sizes() &&
              draft_probs.scalar_type() == at::kFloat), "draft_probs must be empty or float32 [B, N, V]");
  TORCH_CHECK(uniforms.dim() == 3 && uniforms.size(0) == parents.size(0) && uniforms.size(1) == parents.size(1) &&
              uniforms.size(2) == 2 && uniforms.scalar_type() == at::kFloat, "uniforms must be float32 [B, N, 2]");
  TORCH_CHECK(parents.size(1) >= 1, "a tree has at least the root node");
  TORCH_CHECK(target_probs.is_contiguous() && tokens.is_contiguous() && parents.is_contiguous() &&
              uniforms.is_contiguous() && (draft_probs.numel() == 0 || draft_probs.is_contiguous()),
              "inputs must be contiguous");
}
}  // namespace soaes
