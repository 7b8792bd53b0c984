// keras_prune's CPU kernel for SparseDense: y = x @ W, W sparse.
//
// W (input_dim x units) arrives as COO pairs of its transpose, exactly what
// SparseDense holds: `indices[k] = (unit, input)` sorted by unit (row-major),
// and `values[k]`. TensorFlow's own kernels either run on one core
// (SparseTensorDenseMatMul) or need a CSR conversion and two transposes per
// call (SparseMatrixMatMul); this one needs neither:
//
// - batches of up to kGatherMaxBatch rows: each output is a dot product of a
//   unit's nonzeros with the input row, gathered (work split over units);
// - larger batches: x is transposed tile by tile into Tile (8 or 16)
//   contiguous floats per input, so each nonzero adds `value * x[:, input]`
//   to register accumulators of Tile lanes (vectorized), then the unit's
//   outputs are written once (work split over tiles and units, each thread
//   transposing the tiles it works on).
//
// Work is shared over TensorFlow's intra-op thread pool when there is
// enough of it. An entry outside the kernel, or out of order where the walk
// over the entries meets it, fails the op; nothing is read or written out of
// bounds whatever the indices.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#ifdef __AVX__
#include <immintrin.h>
#endif

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"

namespace keras_prune {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::TensorShapeUtils;
namespace errors = ::tensorflow::errors;
namespace shape_inference = ::tensorflow::shape_inference;

REGISTER_OP("KerasPruneSparseMatMul")
    .Input("x: float")
    .Input("values: float")
    .Input("indices: int64")
    .Attr("units: int >= 0")
    .Output("y: float")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      shape_inference::ShapeHandle x;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &x));
      int64_t units;
      TF_RETURN_IF_ERROR(c->GetAttr("units", &units));
      c->set_output(0, c->Matrix(c->Dim(x, 0), units));
      return absl::OkStatus();
    })
    .Doc(R"doc(
Computes x @ W for a sparse W given as sorted (unit, input) COO pairs of W^T.
)doc");

namespace {

constexpr int64_t kGatherMaxBatch = 4;
// Handing work to a second thread costs tens of microseconds (waking it,
// and its cache starting cold), so work estimated below this runs on the
// calling thread alone.
constexpr double kParallelMinNanos = 150e3;

// First entry k in [0, nnz) whose unit is >= unit (entries sorted by unit).
int64_t FirstEntryOf(const int64_t* indices, int64_t nnz, int64_t unit) {
  int64_t low = 0, high = nnz;
  while (low < high) {
    const int64_t middle = low + (high - low) / 2;
    if (indices[2 * middle] < unit) {
      low = middle + 1;
    } else {
      high = middle;
    }
  }
  return low;
}

struct Problem {
  const float* x;
  const float* values;
  const int64_t* indices;
  int64_t batch, input_dim, units, nnz;
  float* y;
  std::atomic<bool>* bad_entry;
};

// Outputs of units [unit_begin, unit_end) for the Rows rows of x, as
// gathered dot products. Chains independent sums take turns over the
// nonzeros, so that consecutive multiply-adds do not wait on each other.
template <int Rows>
void GatherUnits(const Problem& p, int64_t unit_begin, int64_t unit_end) {
  constexpr int Chains = Rows == 1 ? 4 : 2;
  int64_t k = FirstEntryOf(p.indices, p.nnz, unit_begin);
  for (int64_t unit = unit_begin; unit < unit_end; ++unit) {
    float sums[Chains][Rows] = {};
    int chain = 0;
    for (; k < p.nnz && p.indices[2 * k] == unit; ++k) {
      const int64_t input = p.indices[2 * k + 1];
      if (input < 0 || input >= p.input_dim) {
        *p.bad_entry = true;
        return;
      }
      const float value = p.values[k];
      for (int b = 0; b < Rows; ++b) {
        sums[chain][b] += value * p.x[b * p.input_dim + input];
      }
      chain = chain + 1 == Chains ? 0 : chain + 1;
    }
    if (k < p.nnz && p.indices[2 * k] < unit) {  // out of order
      *p.bad_entry = true;
      return;
    }
    for (int b = 0; b < Rows; ++b) {
      float sum = 0;
      for (int c = 0; c < Chains; ++c) sum += sums[c][b];
      p.y[b * p.units + unit] = sum;
    }
  }
}

#ifdef __AVX__
// Transposes the 8x8 block at `source` (rows `stride` floats apart) into
// `target` (rows `Tile` floats apart).
template <int Tile>
inline void Transpose8x8(const float* source, int64_t stride, float* target) {
  __m256 r[8], s[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(source + i * stride);
  for (int i = 0; i < 8; i += 2) {
    s[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    s[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(s[i], s[i + 2], 0x44);
    r[i + 1] = _mm256_shuffle_ps(s[i], s[i + 2], 0xEE);
    r[i + 2] = _mm256_shuffle_ps(s[i + 1], s[i + 3], 0x44);
    r[i + 3] = _mm256_shuffle_ps(s[i + 1], s[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(target + i * Tile,
                     _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(target + (i + 4) * Tile,
                     _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}
#endif

// Copies rows [row_begin, row_begin + Tile) of x into `tile` as Tile
// contiguous floats per input (zero past the last row).
template <int Tile>
void TransposeTile(const Problem& p, int64_t row_begin, float* tile) {
  const int rows = static_cast<int>(std::min<int64_t>(Tile, p.batch - row_begin));
  int64_t done = 0;
#ifdef __AVX__
  if (rows == Tile) {  // whole 8x8 blocks with vector shuffles
    for (; done + 8 <= p.input_dim; done += 8) {
      for (int t = 0; t < Tile; t += 8) {
        Transpose8x8<Tile>(p.x + (row_begin + t) * p.input_dim + done,
                           p.input_dim, tile + done * Tile + t);
      }
    }
  }
#endif
  for (int t = 0; t < Tile; ++t) {
    const float* source = p.x + (row_begin + t) * p.input_dim;
    float* target = tile + t;
    if (t < rows) {
      for (int64_t i = done; i < p.input_dim; ++i) target[i * Tile] = source[i];
    } else {
      for (int64_t i = done; i < p.input_dim; ++i) target[i * Tile] = 0;
    }
  }
}

// Outputs of units [unit_begin, unit_end) for the rows of one transposed
// tile. Two accumulators take alternate nonzeros, so that consecutive
// multiply-adds do not wait on each other. Units are done kUnitBlock at a
// time into a buffer written out row by row: with a power-of-two `units`,
// writing a unit's column directly would map all its rows to one cache set.
template <int Tile>
void MultiplyTile(const Problem& p, const float* tile, int64_t row_begin,
                  int64_t unit_begin, int64_t unit_end) {
  constexpr int64_t kUnitBlock = 64;
  const int rows = static_cast<int>(std::min<int64_t>(Tile, p.batch - row_begin));
  alignas(64) float block[kUnitBlock * Tile];
  int64_t k = FirstEntryOf(p.indices, p.nnz, unit_begin);
  for (int64_t first = unit_begin; first < unit_end; first += kUnitBlock) {
    const int64_t count = std::min(kUnitBlock, unit_end - first);
    for (int64_t j = 0; j < count; ++j) {
      const int64_t unit = first + j;
      int64_t end = k;
      while (end < p.nnz && p.indices[2 * end] == unit) ++end;
      if (end < p.nnz && p.indices[2 * end] < unit) {  // out of order
        *p.bad_entry = true;
        return;
      }
      // Local arrays, so that they stay in registers.
      float even[Tile] = {0}, odd[Tile] = {0};
      for (; k + 1 < end; k += 2) {
        const int64_t a = p.indices[2 * k + 1], b = p.indices[2 * k + 3];
        if (a < 0 || a >= p.input_dim || b < 0 || b >= p.input_dim) {
          *p.bad_entry = true;
          return;
        }
        const float va = p.values[k], vb = p.values[k + 1];
        const float* column_a = tile + a * Tile;
        const float* column_b = tile + b * Tile;
        for (int t = 0; t < Tile; ++t) even[t] += va * column_a[t];
        for (int t = 0; t < Tile; ++t) odd[t] += vb * column_b[t];
      }
      if (k < end) {
        const int64_t a = p.indices[2 * k + 1];
        if (a < 0 || a >= p.input_dim) {
          *p.bad_entry = true;
          return;
        }
        const float va = p.values[k];
        const float* column_a = tile + a * Tile;
        for (int t = 0; t < Tile; ++t) even[t] += va * column_a[t];
        ++k;
      }
      for (int t = 0; t < Tile; ++t) block[j * Tile + t] = even[t] + odd[t];
    }
    for (int t = 0; t < rows; ++t) {
      float* out = p.y + (row_begin + t) * p.units + first;
      for (int64_t j = 0; j < count; ++j) out[j] = block[j * Tile + t];
    }
  }
}

// All rows in tiles of Tile rows. Work items are (tile, unit) pairs; each
// thread transposes the tiles it works on into its own buffer, which then
// stays in its core's cache (a tile shared between threads is transposed by
// each of them: cheaper than reading another core's cache).
template <int Tile>
void MultiplyTiled(const Problem& p, tensorflow::thread::ThreadPool* workers,
                   int threads) {
  const int64_t num_tiles = (p.batch + Tile - 1) / Tile;
  const int64_t per_unit = 1 + p.nnz / p.units;
  // Measured on one core: ~2 ns a nonzero and tile of 16 rows, ~0.3 ns an
  // input element transposed.
  const double nanos = 2.0 * p.nnz * num_tiles * Tile / 16 +
                       0.3 * p.batch * p.input_dim;
  tensorflow::Shard(
      nanos < kParallelMinNanos ? 1 : threads, workers, num_tiles * p.units, 2 * Tile * per_unit,
      [&](int64_t begin, int64_t end) {
        // Kept per thread across calls: no allocation (and no page faults)
        // per call.
        thread_local std::vector<float> tile;
        tile.resize(p.input_dim * Tile);
        while (begin < end) {
          const int64_t row_begin = begin / p.units * Tile;
          const int64_t unit = begin % p.units;
          const int64_t stop = std::min(end - begin, p.units - unit) + unit;
          TransposeTile<Tile>(p, row_begin, tile.data());
          MultiplyTile<Tile>(p, tile.data(), row_begin, unit, stop);
          begin += stop - unit;
        }
      });
}

}  // namespace

class SparseMatMulOp : public OpKernel {
 public:
  explicit SparseMatMulOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("units", &units_));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& x = context->input(0);
    const Tensor& values = context->input(1);
    const Tensor& indices = context->input(2);
    OP_REQUIRES(context, TensorShapeUtils::IsMatrix(x.shape()),
                errors::InvalidArgument("x must be 2-D, got shape ",
                                        x.shape().DebugString()));
    OP_REQUIRES(context, TensorShapeUtils::IsVector(values.shape()),
                errors::InvalidArgument("values must be 1-D, got shape ",
                                        values.shape().DebugString()));
    OP_REQUIRES(
        context,
        TensorShapeUtils::IsMatrix(indices.shape()) &&
            indices.dim_size(0) == values.dim_size(0) &&
            indices.dim_size(1) == 2,
        errors::InvalidArgument("indices must have shape [nnz, 2] with nnz = ",
                                values.dim_size(0), ", got ",
                                indices.shape().DebugString()));
    Tensor* y = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(
                                0, TensorShape({x.dim_size(0), units_}), &y));
    std::atomic<bool> bad_entry(false);
    const Problem problem{x.flat<float>().data(),
                          values.flat<float>().data(),
                          indices.flat<int64_t>().data(),
                          x.dim_size(0),
                          x.dim_size(1),
                          units_,
                          values.dim_size(0),
                          y->flat<float>().data(),
                          &bad_entry};
    // Sorted entries lie in [0, units) if the first and the last do; order
    // itself is checked as the kernel walks the entries (a disorder that the
    // walk skips can go unnoticed, but no read or write leaves its array).
    OP_REQUIRES(context,
                problem.nnz == 0 || (problem.indices[0] >= 0 &&
                                     problem.indices[2 * problem.nnz - 2] <
                                         problem.units),
                errors::InvalidArgument("indices must have units in [0, ",
                                        units_, ")"));
    if (problem.batch == 0 || problem.units == 0) return;
    const auto* worker_threads =
        context->device()->tensorflow_cpu_worker_threads();
    tensorflow::thread::ThreadPool* workers = worker_threads->workers;
    const int threads = worker_threads->num_threads;
    const int64_t per_unit = 1 + problem.nnz / problem.units;
    if (problem.batch <= kGatherMaxBatch) {
      auto gather = problem.batch == 1   ? GatherUnits<1>
                    : problem.batch == 2 ? GatherUnits<2>
                    : problem.batch == 3 ? GatherUnits<3>
                                         : GatherUnits<4>;
      const double nanos = 0.5 * problem.nnz * problem.batch;  // measured
      tensorflow::Shard(nanos < kParallelMinNanos ? 1 : threads, workers,
                        problem.units,
                        4 * per_unit * problem.batch,
                        [&](int64_t begin, int64_t end) {
                          gather(problem, begin, end);
                        });
    } else if (problem.batch <= 8) {
      MultiplyTiled<8>(problem, workers, threads);
    } else {
      MultiplyTiled<16>(problem, workers, threads);
    }
    OP_REQUIRES(context, !bad_entry,
                errors::InvalidArgument(
                    "indices must be (unit, input) pairs sorted by unit, with "
                    "unit < ", units_, " and input < ", problem.input_dim));
  }

 private:
  int64_t units_;
};

REGISTER_KERNEL_BUILDER(
    Name("KerasPruneSparseMatMul").Device(::tensorflow::DEVICE_CPU),
    SparseMatMulOp);

}  // namespace keras_prune
