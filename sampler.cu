// Rejection sampling for speculative decoding: the contracts of sampler.py, as kernels.
//
// rejection_kernel (a chain): one block per batch row. Thread 0 runs the accept scan
// (u_i * q_i(x_i) < p_i(x_i)), which reads 2K numbers. Then the whole block draws the
// emitted token from r = max(0, p_n - q_n) (or p_{K+1} for the bonus) by the exponential
// race argmax_v r_v / e_v: each thread scans a strided slice with vectorised, coalesced
// loads, a warp reduces with shuffles, and warp 0 reduces the warps' winners. Ties go to
// the lower index, as torch.argmax does, so every implementation returns the same tokens.
// If r is zero everywhere (p == q up to rounding) the race over p decides instead.
//
// tree_kernel (a token tree, sampler.tree_sample): one block per node, SpecInfer's
// multi-round rejection over the node's candidates. The residual after j rejections is
// never stored: every element is recomputed from p_v, q_v and the j scalars (z, which
// candidate, whether the step was taken, whether it was a point mass or a draw from q:
// a node may mix both) in the order torch applies them, so the values
// are bit-identical; sums run in float64 so the block's order does not matter.
//
// Only torch/extension.h is needed: the stream comes from Python as an integer, so
// this file also compiles with nvcc on a machine without a GPU.
#include <torch/extension.h>

constexpr int THREADS = 256;
constexpr int WARPS = THREADS / 32;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(uint16_t bf16) { return __uint_as_float(uint32_t(bf16) << 16); }

// 16-byte loads: 4 floats or 8 bfloat16 at a time.
template <typename T> struct Vec;
template <> struct Vec<float> { static constexpr int N = 4; };
template <> struct Vec<uint16_t> { static constexpr int N = 8; };

struct Best {
  float r, p;      // best r/e and best p/e so far
  int ir, ip;      // their indices
  bool any;        // some r_v > 0
};

__device__ __forceinline__ void better(float& val, int& idx, float v, int i) {
  if (v > val || (v == val && i < idx)) { val = v; idx = i; }
}

__device__ __forceinline__ void visit(Best& b, float p, float q, float e, int v) {
  float r = fmaxf(p - q, 0.0f);
  b.any |= r > 0.0f;
  better(b.r, b.ir, r / e, v);
  better(b.p, b.ip, p / e, v);
}

__device__ __forceinline__ void warp_reduce(Best& b) {
  for (int offset = 16; offset > 0; offset /= 2) {
    float r = __shfl_down_sync(0xffffffff, b.r, offset);
    int ir = __shfl_down_sync(0xffffffff, b.ir, offset);
    float p = __shfl_down_sync(0xffffffff, b.p, offset);
    int ip = __shfl_down_sync(0xffffffff, b.ip, offset);
    b.any |= __shfl_down_sync(0xffffffff, b.any, offset);
    better(b.r, b.ir, r, ir);
    better(b.p, b.ip, p, ip);
  }
}

// The block's best of every thread's `best` (lowest index on ties); valid in thread 0.
__device__ Best block_best(Best best, Best* winners) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  warp_reduce(best);
  if (lane == 0) winners[warp] = best;
  __syncthreads();
  best = lane < WARPS ? winners[lane] : Best{-1.0f, -1.0f, 0, 0, false};
  if (warp == 0) warp_reduce(best);
  return best;
}

template <typename T>
__global__ void rejection_kernel(const T* __restrict__ p, const T* __restrict__ q,
                                 const int64_t* __restrict__ draft, const float* __restrict__ u,
                                 const float* __restrict__ e, int64_t* __restrict__ tokens,
                                 int64_t* __restrict__ accepted, int K, int V) {
  const int b = blockIdx.x, tid = threadIdx.x;
  const T* pb = p + int64_t(b) * (K + 1) * V;
  const T* qb = q + int64_t(b) * K * V;
  __shared__ int n_shared;
  __shared__ Best winners[WARPS];

  if (tid == 0) {
    int n = 0;
    for (; n < K; ++n) {
      int64_t x = draft[b * K + n];
      if (!(u[b * K + n] * to_float(qb[n * int64_t(V) + x]) < to_float(pb[n * int64_t(V) + x]))) break;
      tokens[b * (K + 1) + n] = x;
    }
    for (int i = n + 1; i <= K; ++i) tokens[b * (K + 1) + i] = -1;
    accepted[b] = n;
    n_shared = n;
  }
  __syncthreads();
  const int n = n_shared;
  const T* pn = pb + int64_t(n) * V;
  const T* qn = n < K ? qb + int64_t(n) * V : nullptr;   // the bonus draw has no q
  const float* eb = e + int64_t(b) * V;

  Best best{-1.0f, -1.0f, 0, 0, false};
  constexpr int N = Vec<T>::N;
  // rows start on 16-byte boundaries when V is a multiple of N and the tensors do (a view
  // with a storage offset may not)
  const bool aligned = V % N == 0 && (reinterpret_cast<uintptr_t>(p) | reinterpret_cast<uintptr_t>(q) |
                                      reinterpret_cast<uintptr_t>(e)) % 16 == 0;
  if (aligned) {
    for (int base = tid * N; base < V; base += THREADS * N) {
      T pv[N], qv[N];
      float ev[N];
      *reinterpret_cast<uint4*>(pv) = *reinterpret_cast<const uint4*>(pn + base);
      if (qn) *reinterpret_cast<uint4*>(qv) = *reinterpret_cast<const uint4*>(qn + base);
#pragma unroll
      for (int j = 0; j < N; j += 4) *reinterpret_cast<float4*>(ev + j) = *reinterpret_cast<const float4*>(eb + base + j);
#pragma unroll
      for (int j = 0; j < N; ++j) visit(best, to_float(pv[j]), qn ? to_float(qv[j]) : 0.0f, ev[j], base + j);
    }
  } else {
    for (int v = tid; v < V; v += THREADS) visit(best, to_float(pn[v]), qn ? to_float(qn[v]) : 0.0f, eb[v], v);
  }

  best = block_best(best, winners);
  if (tid == 0) tokens[b * (K + 1) + n] = best.any ? best.ir : best.ip;
}

std::vector<torch::Tensor> rejection_sample(torch::Tensor p, torch::Tensor q, torch::Tensor draft,
                                            torch::Tensor u, torch::Tensor e, int64_t stream) {
  TORCH_CHECK(p.is_cuda() && p.is_contiguous() && q.is_contiguous(), "p and q must be contiguous CUDA tensors");
  TORCH_CHECK(p.scalar_type() == q.scalar_type(), "p and q must have the same dtype");
  const int B = p.size(0), K = q.size(1), V = p.size(2);
  auto tokens = torch::empty({B, K + 1}, draft.options());
  auto accepted = torch::empty({B}, draft.options());
  auto s = reinterpret_cast<cudaStream_t>(stream);
  if (p.scalar_type() == torch::kFloat) {
    rejection_kernel<float><<<B, THREADS, 0, s>>>(p.data_ptr<float>(), q.data_ptr<float>(), draft.data_ptr<int64_t>(),
        u.data_ptr<float>(), e.data_ptr<float>(), tokens.data_ptr<int64_t>(), accepted.data_ptr<int64_t>(), K, V);
  } else {
    TORCH_CHECK(p.scalar_type() == torch::kBFloat16, "probabilities must be float32 or bfloat16");
    rejection_kernel<uint16_t><<<B, THREADS, 0, s>>>(
        reinterpret_cast<const uint16_t*>(p.data_ptr()), reinterpret_cast<const uint16_t*>(q.data_ptr()),
        draft.data_ptr<int64_t>(), u.data_ptr<float>(), e.data_ptr<float>(), tokens.data_ptr<int64_t>(),
        accepted.data_ptr<int64_t>(), K, V);
  }
  return {tokens, accepted};
}

constexpr int MAX_CANDIDATES = 16;

struct Round {     // what one rejected candidate did to the residual
  float z;         // sum of r before the step
  int64_t x;       // the rejected candidate
  bool taken;      // false: the step would have left nothing, r was kept
  bool point;      // the candidate was a point mass (top-k pick, lookup token), not a draw from q
};

// r_v after `n` rounds: r = p, then per taken round max(0, r / z - q) (drawn children) or
// r with the candidate zeroed (point masses), exactly as sampler.tree_vectorised computes it.
__device__ __forceinline__ float residual(float p, float q, int64_t v, const Round* rounds, int n) {
  float r = p;
  for (int i = 0; i < n; ++i)
    if (rounds[i].taken) r = rounds[i].point ? (v == rounds[i].x ? 0.0f : r) : fmaxf(r / rounds[i].z - q, 0.0f);
  return r;
}

// Block-wide float64 sum and "any positive" of (s, any); every thread gets the result.
__device__ void block_sum(double& s, bool& any, double* sums, bool* anys) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int offset = 16; offset > 0; offset /= 2) {
    s += __shfl_down_sync(0xffffffff, s, offset);
    any |= __shfl_down_sync(0xffffffff, any, offset);
  }
  if (lane == 0) sums[warp] = s, anys[warp] = any;
  __syncthreads();
  s = 0.0, any = false;
  for (int w = 0; w < WARPS; ++w) s += sums[w], any |= anys[w];
  __syncthreads();
}

template <typename T>
__global__ void tree_kernel(const T* __restrict__ p, const T* __restrict__ q, const int64_t* __restrict__ candidates,
                            const float* __restrict__ u, const float* __restrict__ e,
                            const uint8_t* __restrict__ point, int64_t* __restrict__ choice,
                            int64_t* __restrict__ token, int m, int V) {
  const int row = blockIdx.x, tid = threadIdx.x;
  const bool drawn = q != nullptr;
  const T* pr = p + int64_t(row) * V;
  const T* qr = drawn ? q + int64_t(row) * V : nullptr;
  __shared__ Round rounds[MAX_CANDIDATES];
  __shared__ double sums[WARPS];
  __shared__ bool anys[WARPS];
  __shared__ int accepted;
  __shared__ Best winners[WARPS];
  auto qv = [&](int64_t v) { return drawn ? to_float(qr[v]) : 0.0f; };

  // z of the current residual (r = p before any round)
  if (tid == 0) accepted = -1;
  double s = 0.0;
  bool any = false;
  for (int v = tid; v < V; v += THREADS) s += to_float(pr[v]);
  block_sum(s, any, sums, anys);               // (its barriers also publish `accepted`)
  float z = float(s);
  int n = 0;                                   // rounds so far
  for (; n < m; ++n) {
    const int64_t x = candidates[int64_t(row) * m + n];
    if (x < 0) break;
    const bool pt = !drawn || point[int64_t(row) * m + n];
    if (tid == 0) {
      float rx = residual(to_float(pr[x]), qv(x), x, rounds, n);
      float qx = pt ? 1.0f : to_float(qr[x]);
      if (u[int64_t(row) * m + n] * qx * z < rx) accepted = n;
    }
    __syncthreads();
    if (accepted >= 0) break;
    // the step r <- next(r): its sum, and whether anything is left
    s = 0.0, any = false;
    for (int v = tid; v < V; v += THREADS) {
      float r = residual(to_float(pr[v]), qv(v), v, rounds, n);
      float next = pt ? (v == x ? 0.0f : r) : fmaxf(r / z - qv(v), 0.0f);
      s += next;
      any |= next > 0.0f;
    }
    block_sum(s, any, sums, anys);
    if (tid == 0) rounds[n] = Round{z, x, any, pt};
    if (any) z = float(s);
    __syncthreads();
  }
  if (accepted >= 0) {
    if (tid == 0) choice[row] = accepted, token[row] = candidates[int64_t(row) * m + accepted];
    return;
  }
  // all rejected: the exponential race over the residual
  Best best{-1.0f, -1.0f, 0, 0, false};
  for (int v = tid; v < V; v += THREADS) better(best.r, best.ir, residual(to_float(pr[v]), qv(v), v, rounds, n) / e[v], v);
  best = block_best(best, winners);
  if (tid == 0) choice[row] = -1, token[row] = best.ir;
}

std::vector<torch::Tensor> tree_sample(torch::Tensor p, torch::Tensor q, torch::Tensor candidates, torch::Tensor u,
                                       torch::Tensor e, torch::Tensor point, int64_t stream) {
  TORCH_CHECK(p.is_cuda() && p.is_contiguous() && q.is_contiguous(), "p and q must be contiguous CUDA tensors");
  TORCH_CHECK(p.scalar_type() == q.scalar_type(), "p and q must have the same dtype");
  const int R = p.size(0), V = p.size(1), m = candidates.size(1);
  TORCH_CHECK(m <= MAX_CANDIDATES, "at most 16 candidates per node");
  TORCH_CHECK(point.scalar_type() == torch::kUInt8 && point.is_contiguous() && point.numel() == int64_t(R) * m,
              "point must be a contiguous uint8 [R, m]");
  const bool drawn = q.numel() > 0;
  auto choice = torch::empty({R}, candidates.options());
  auto token = torch::empty({R}, candidates.options());
  auto s = reinterpret_cast<cudaStream_t>(stream);
  if (p.scalar_type() == torch::kFloat) {
    tree_kernel<float><<<R, THREADS, 0, s>>>(p.data_ptr<float>(), drawn ? q.data_ptr<float>() : nullptr,
        candidates.data_ptr<int64_t>(), u.data_ptr<float>(), e.data_ptr<float>(), point.data_ptr<uint8_t>(),
        choice.data_ptr<int64_t>(), token.data_ptr<int64_t>(), m, V);
  } else {
    TORCH_CHECK(p.scalar_type() == torch::kBFloat16, "probabilities must be float32 or bfloat16");
    tree_kernel<uint16_t><<<R, THREADS, 0, s>>>(reinterpret_cast<const uint16_t*>(p.data_ptr()),
        drawn ? reinterpret_cast<const uint16_t*>(q.data_ptr()) : nullptr, candidates.data_ptr<int64_t>(),
        u.data_ptr<float>(), e.data_ptr<float>(), point.data_ptr<uint8_t>(), choice.data_ptr<int64_t>(),
        token.data_ptr<int64_t>(), m, V);
  }
  return {choice, token};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rejection_sample", &rejection_sample, "speculative rejection sampling (see sampler.py)");
  m.def("tree_sample", &tree_sample, "multi-candidate rejection sampling at every tree node (see sampler.py)");
}
