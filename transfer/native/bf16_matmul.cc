// bf16 x bf16 -> float32 batched matmul for XLA's CPU backend, on MKL's cblas_gemm_bf16bf16f32 (AMX tiles where
// the CPU has them). Called through jax.ffi by transfer/native/__init__.py; built by `python -m transfer.native`.
//
// C[b] = op(A[b]) @ op(B[b]) with op(X) = X or X^T (attributes transpose_a, transpose_b), so a layer's forward and
// both backward matmuls read their operands where they lie, without transposed copies. MKL runs sequentially;
// the work is split into blocks of C's rows (or columns, when C is wide) spread over XLA's own intra-op thread
// pool, so the library and XLA never run two pools on the same cores.
#include <mkl.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Problem {
  const MKL_BF16* a;
  const MKL_BF16* b;
  float* c;
  int64_t m, n, k;
  bool transpose_a, transpose_b;
  bool split_rows;       // blocks of C's rows, else of its columns
  int64_t block;         // rows or columns per block
  int64_t blocks;        // per batch entry
  int64_t tasks;         // batch * blocks
};

// One block of one batch entry: C[b][rows or columns of the block].
void RunBlock(const Problem& p, int64_t task) {
  const int64_t batch = task / p.blocks, index = task % p.blocks;
  const MKL_BF16* a = p.a + batch * p.m * p.k;
  const MKL_BF16* b = p.b + batch * p.k * p.n;
  float* c = p.c + batch * p.m * p.n;
  const int64_t lda = p.transpose_a ? p.m : p.k, ldb = p.transpose_b ? p.k : p.n;
  int64_t m = p.m, n = p.n;
  const int64_t start = index * p.block;
  if (p.split_rows) {
    m = std::min(p.block, p.m - start);
    a += p.transpose_a ? start : start * lda;       // rows of op(A)
    c += start * p.n;
  } else {
    n = std::min(p.block, p.n - start);
    b += p.transpose_b ? start * ldb : start;       // columns of op(B)
    c += start;
  }
  cblas_gemm_bf16bf16f32(CblasRowMajor, p.transpose_a ? CblasTrans : CblasNoTrans,
                         p.transpose_b ? CblasTrans : CblasNoTrans, m, n, p.k, 1.0f, a, lda, b, ldb, 0.0f, c,
                         p.n);
}

// Tasks taken from a shared counter by the caller and by the pool's threads alike: the caller never waits for a
// task no thread has started, so a busy (or one-thread) pool cannot deadlock it.
struct Work {
  Problem problem;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mutex;
  std::condition_variable finished;

  void Drain() {
    for (int64_t task = next++; task < problem.tasks; task = next++) {
      RunBlock(problem, task);
      if (++done == problem.tasks) {
        std::lock_guard<std::mutex> lock(mutex);
        finished.notify_all();
      }
    }
  }
};

ffi::Error Bf16Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> a, ffi::Buffer<ffi::BF16> b,
                      ffi::ResultBuffer<ffi::F32> c, bool transpose_a, bool transpose_b) {
  const auto a_dims = a.dimensions(), b_dims = b.dimensions(), c_dims = c->dimensions();
  if (a_dims.size() != 3 || b_dims.size() != 3 || c_dims.size() != 3) {
    return ffi::Error::InvalidArgument("transfer_bf16_matmul: operands must be (batch, rows, columns)");
  }
  const int64_t batch = a_dims[0], m = c_dims[1], n = c_dims[2];
  const int64_t k = transpose_a ? a_dims[1] : a_dims[2];
  const int64_t a_m = transpose_a ? a_dims[2] : a_dims[1];
  const int64_t b_k = transpose_b ? b_dims[2] : b_dims[1], b_n = transpose_b ? b_dims[1] : b_dims[2];
  if (b_dims[0] != batch || c_dims[0] != batch || a_m != m || b_k != k || b_n != n) {
    return ffi::Error::InvalidArgument("transfer_bf16_matmul: operand shapes do not match the result's");
  }
  if (batch == 0 || m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {
    std::fill(c->typed_data(), c->typed_data() + batch * m * n, 0.0f);
    return ffi::Error::Success();
  }

  auto work = std::make_shared<Work>();
  Problem& p = work->problem;
  p = Problem{reinterpret_cast<const MKL_BF16*>(a.untyped_data()),
              reinterpret_cast<const MKL_BF16*>(b.untyped_data()), c->typed_data(), m, n, k, transpose_a,
              transpose_b, m >= n, 0, 0, 0};
  // Blocks of at least 64 rows (columns) and at least ~8 MFLOP each; about two per thread for balance.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads() + 1);
  const int64_t extent = p.split_rows ? m : n, other = p.split_rows ? n : m;
  const int64_t min_block = std::max<int64_t>(64, (int64_t{1} << 22) / std::max<int64_t>(1, other * k));
  const int64_t wanted = std::max<int64_t>(1, (2 * threads + batch - 1) / batch);
  p.blocks = std::max<int64_t>(1, std::min(wanted, extent / min_block));
  p.block = (extent + p.blocks - 1) / p.blocks;
  p.blocks = (extent + p.block - 1) / p.block;
  p.tasks = batch * p.blocks;

  const int64_t helpers = std::min(threads - 1, p.tasks - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->Drain(); });
  work->Drain();
  std::unique_lock<std::mutex> lock(work->mutex);
  work->finished.wait(lock, [&] { return work->done.load() == p.tasks; });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TransferBf16Matmul, Bf16Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b"));
