// keras_prune's CPU kernel for SparseDense: y = x @ W, W sparse.
//
// W (input_dim x units) arrives as CSR of its transpose, which SparseDense
// derives once from its nonzeros when they are set: unit u's nonzeros are
// `values[k]` at inputs `columns[k]` for k in [row_splits[u],
// row_splits[u + 1]), with int32 row splits and columns. A bias (one per
// unit, or none) is added as the outputs are written. (The op of
// keras_prune 0.2, which took sorted (unit, input) int64 COO pairs, is kept
// for the SavedModels it made: it converts them to CSR at every call.)
//
// - Batches of up to kGatherMaxBatch rows: each output is a dot product of
//   a unit's nonzeros with the input row (work split over units). With
//   AVX2, eight nonzeros at a time are multiplied in vector registers, and
//   the eight inputs they need are loaded either by the hardware gather
//   instruction or by eight scalar loads (`Loads`): which is faster depends
//   on the CPU (gathers are slow on AMD Zen cores), so Python measures both
//   once per machine (`keras_prune_time_loads`) and sets the faster
//   (`keras_prune_set_loads`).
// - Larger batches: x is transposed tile by tile into Tile (8 or 16)
//   contiguous floats per input, so each nonzero adds `value * x[:, input]`
//   to register accumulators of Tile lanes (vectorized), then the unit's
//   outputs are written once (work split over tiles and units, each thread
//   transposing the tiles it works on).
//
// Work is shared over TensorFlow's intra-op thread pool when there is
// enough of it. Row splits outside [0, nnz] or decreasing, and columns
// outside [0, input_dim), fail the op; nothing is read or written out of
// bounds whatever the operands.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <limits>
#include <memory>
#include <random>
#include <vector>

#ifdef __AVX__
#include <immintrin.h>
#endif
// The vector loops need AVX2's integer and gather instructions and FMA.
#if defined(__AVX2__) && defined(__FMA__)
#define KERAS_PRUNE_AVX2 1
#endif

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/resource_mgr.h"
#include "tensorflow/core/framework/resource_var.h"
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

// Shape function of the ops with a `units` attribute: y is (rows of x, units).
absl::Status RowsByUnits(shape_inference::InferenceContext* c) {
  shape_inference::ShapeHandle x;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &x));
  int64_t units;
  TF_RETURN_IF_ERROR(c->GetAttr("units", &units));
  c->set_output(0, c->Matrix(c->Dim(x, 0), units));
  return absl::OkStatus();
}

REGISTER_OP("KerasPruneCsrMatMul")
    .Input("x: float")
    .Input("values: float")
    .Input("row_splits: int32")
    .Input("columns: int32")
    .Input("bias: float")
    .Output("y: float")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      shape_inference::ShapeHandle x, row_splits;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &x));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 1, &row_splits));
      shape_inference::DimensionHandle units;
      TF_RETURN_IF_ERROR(c->Subtract(c->Dim(row_splits, 0), 1, &units));
      c->set_output(0, c->Matrix(c->Dim(x, 0), units));
      return absl::OkStatus();
    })
    .Doc(R"doc(
Computes x @ W + bias for a sparse W given as int32 CSR (row_splits, columns)
of W^T; bias has one entry per unit, or none.
)doc");

REGISTER_OP("KerasPruneCsrMatMulVariables")
    .Input("x: float")
    .Input("values: resource")
    .Input("row_splits: resource")
    .Input("columns: resource")
    .Input("bias: has_bias * resource")
    .Attr("has_bias: int >= 0")
    .Attr("units: int >= 0")
    .Output("y: float")
    .SetShapeFn(RowsByUnits)
    .Doc(R"doc(
KerasPruneCsrMatMul reading its operands straight from their variables
(float32 values and bias, int32 row_splits and columns; bias present when
has_bias is 1): no ReadVariableOp nodes, each of which costs a fraction of a
microsecond, as much as a small product.
)doc");

REGISTER_OP("KerasPruneSparseMatMul")
    .Input("x: float")
    .Input("values: float")
    .Input("indices: int64")
    .Attr("units: int >= 0")
    .Output("y: float")
    .SetShapeFn(RowsByUnits)
    .Doc(R"doc(
Computes x @ W for a sparse W given as sorted (unit, input) COO pairs of W^T
(keras_prune 0.2's op, kept for its SavedModels).
)doc");

namespace {

constexpr int64_t kGatherMaxBatch = 4;
// Handing work to a second thread costs tens of microseconds (waking it,
// and its cache starting cold), so work estimated below this runs on the
// calling thread alone.
constexpr double kParallelMinNanos = 150e3;

// How the small-batch loop loads the inputs its nonzeros need.
enum Loads : int { kScalarLoads = 0, kGatherLoads = 1 };
std::atomic<int> loads{kScalarLoads};

struct Problem {
  const float* x;
  const float* values;
  const int32_t* row_splits;
  const int32_t* columns;
  const float* bias;  // one per unit, or null for none
  int64_t batch, input_dim, units, nnz;
  float* y;
  std::atomic<bool>* bad_entry;
};

// Units are walked in blocks of this many; each block's operands are checked
// once, before its products (and are then in the core's cache).
constexpr int64_t kUnitBlock = 64;

// Whether all `count` columns lie in [0, input_dim) (compared unsigned, so
// that negative ones do not). Four running maxima, so that the loads do not
// wait on one chain of comparisons.
bool ColumnsInRange(const int32_t* columns, int64_t count, int64_t input_dim) {
  uint32_t largest = 0;
  int64_t k = 0;
#ifdef KERAS_PRUNE_AVX2
  __m256i lanes[4];
  for (__m256i& lane : lanes) lane = _mm256_setzero_si256();
  for (; k + 32 <= count; k += 32) {
    for (int i = 0; i < 4; ++i) {
      lanes[i] = _mm256_max_epu32(
          lanes[i],
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(columns + k + 8 * i)));
    }
  }
  alignas(32) uint32_t lane[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lane),
                     _mm256_max_epu32(_mm256_max_epu32(lanes[0], lanes[1]),
                                      _mm256_max_epu32(lanes[2], lanes[3])));
  for (uint32_t value : lane) largest = std::max(largest, value);
#endif
  for (; k < count; ++k) largest = std::max(largest, static_cast<uint32_t>(columns[k]));
  return count == 0 || largest < static_cast<uint64_t>(input_dim);
}

// Whether the row splits of units [first, last) rise within [0, nnz] and
// their nonzeros' columns lie in [0, input_dim): then the loops over those
// nonzeros need no checks.
bool BlockInRange(const Problem& p, int64_t first, int64_t last) {
  const int32_t* splits = p.row_splits;
  if (splits[first] < 0 || splits[last] > p.nnz) return false;
  int64_t unit = first;
#ifdef KERAS_PRUNE_AVX2
  __m256i falls = _mm256_setzero_si256();  // lanes where a split decreases
  for (; unit + 8 <= last; unit += 8) {
    falls = _mm256_or_si256(
        falls, _mm256_cmpgt_epi32(
                   _mm256_loadu_si256(reinterpret_cast<const __m256i*>(splits + unit)),
                   _mm256_loadu_si256(
                       reinterpret_cast<const __m256i*>(splits + unit + 1))));
  }
  if (!_mm256_testz_si256(falls, falls)) return false;
#endif
  for (; unit < last; ++unit) {
    if (splits[unit] > splits[unit + 1]) return false;
  }
  return ColumnsInRange(p.columns + splits[first], splits[last] - splits[first],
                        p.input_dim);
}

#ifdef KERAS_PRUNE_AVX2
inline float HorizontalSum(__m256 a) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

// row[column[0..7]], by one gather instruction or by eight scalar loads.
template <Loads How>
inline __m256 Load8(const float* row, const int32_t* column) {
  if (How == kGatherLoads) {
    return _mm256_i32gather_ps(
        row, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(column)), 4);
  }
  return _mm256_setr_ps(row[column[0]], row[column[1]], row[column[2]],
                        row[column[3]], row[column[4]], row[column[5]],
                        row[column[6]], row[column[7]]);
}
#endif

// Outputs of units [unit_begin, unit_end) for the Rows rows of x, as dot
// products of each unit's nonzeros with the rows: eight nonzeros at a time
// in vector registers (with AVX2, for units that have eight or more), the
// rest one by one. Units are independent, so the processor overlaps the
// sums of consecutive units.
template <int Rows, Loads How>
void GatherUnits(const Problem& p, int64_t unit_begin, int64_t unit_end) {
  for (int64_t first = unit_begin; first < unit_end; first += kUnitBlock) {
    const int64_t last = std::min(first + kUnitBlock, unit_end);
    if (!BlockInRange(p, first, last)) {
      *p.bad_entry = true;
      return;
    }
    for (int64_t unit = first; unit < last; ++unit) {
      int64_t k = p.row_splits[unit];
      const int64_t end = p.row_splits[unit + 1];
      float sums[Rows] = {};
#ifdef KERAS_PRUNE_AVX2
      if (end - k >= 8) {
        __m256 vector_sums[Rows];
        for (int b = 0; b < Rows; ++b) vector_sums[b] = _mm256_setzero_ps();
        for (; k + 8 <= end; k += 8) {
          const __m256 values = _mm256_loadu_ps(p.values + k);
          for (int b = 0; b < Rows; ++b) {
            vector_sums[b] = _mm256_fmadd_ps(
                values, Load8<How>(p.x + b * p.input_dim, p.columns + k),
                vector_sums[b]);
          }
        }
        for (int b = 0; b < Rows; ++b) sums[b] = HorizontalSum(vector_sums[b]);
      }
#endif
      for (; k < end; ++k) {
        const int32_t column = p.columns[k];
        const float value = p.values[k];
        for (int b = 0; b < Rows; ++b) sums[b] += value * p.x[b * p.input_dim + column];
      }
      const float bias = p.bias == nullptr ? 0.0f : p.bias[unit];
      for (int b = 0; b < Rows; ++b) p.y[b * p.units + unit] = sums[b] + bias;
    }
  }
}

using GatherFunction = void (*)(const Problem&, int64_t, int64_t);

template <Loads How>
GatherFunction GatherFor(int64_t rows) {
  return rows == 1   ? GatherUnits<1, How>
         : rows == 2 ? GatherUnits<2, How>
         : rows == 3 ? GatherUnits<3, How>
                     : GatherUnits<4, How>;
}

GatherFunction GatherFor(int64_t rows, int how) {
#ifdef KERAS_PRUNE_AVX2
  if (how == kGatherLoads) return GatherFor<kGatherLoads>(rows);
#endif
  return GatherFor<kScalarLoads>(rows);
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

// block[0..Tile) = bias + the sum over nonzeros k in [k, end) of
// `values[k] * tile[columns[k]]` (a column of Tile floats). Two sums take
// alternate nonzeros, so that consecutive multiply-adds do not wait on each
// other; with AVX2 they are vector registers (written out explicitly: left
// to itself, the compiler keeps them on the stack).
template <int Tile>
inline void AccumulateTile(const Problem& p, const float* tile, int64_t k,
                           int64_t end, float bias, float* block) {
#ifdef KERAS_PRUNE_AVX2
  constexpr int kVectors = Tile / 8;
  __m256 even[kVectors], odd[kVectors];
  for (int v = 0; v < kVectors; ++v) {
    even[v] = _mm256_setzero_ps();
    odd[v] = _mm256_setzero_ps();
  }
  for (; k + 1 < end; k += 2) {
    const __m256 value_a = _mm256_set1_ps(p.values[k]);
    const __m256 value_b = _mm256_set1_ps(p.values[k + 1]);
    const float* column_a = tile + static_cast<int64_t>(p.columns[k]) * Tile;
    const float* column_b = tile + static_cast<int64_t>(p.columns[k + 1]) * Tile;
    for (int v = 0; v < kVectors; ++v) {
      even[v] = _mm256_fmadd_ps(value_a, _mm256_loadu_ps(column_a + 8 * v), even[v]);
      odd[v] = _mm256_fmadd_ps(value_b, _mm256_loadu_ps(column_b + 8 * v), odd[v]);
    }
  }
  if (k < end) {
    const __m256 value_a = _mm256_set1_ps(p.values[k]);
    const float* column_a = tile + static_cast<int64_t>(p.columns[k]) * Tile;
    for (int v = 0; v < kVectors; ++v) {
      even[v] = _mm256_fmadd_ps(value_a, _mm256_loadu_ps(column_a + 8 * v), even[v]);
    }
  }
  const __m256 offset = _mm256_set1_ps(bias);
  for (int v = 0; v < kVectors; ++v) {
    _mm256_storeu_ps(block + 8 * v,
                     _mm256_add_ps(_mm256_add_ps(even[v], odd[v]), offset));
  }
#else
  float even[Tile] = {0}, odd[Tile] = {0};
  for (; k + 1 < end; k += 2) {
    const float va = p.values[k], vb = p.values[k + 1];
    const float* column_a = tile + static_cast<int64_t>(p.columns[k]) * Tile;
    const float* column_b = tile + static_cast<int64_t>(p.columns[k + 1]) * Tile;
    for (int t = 0; t < Tile; ++t) even[t] += va * column_a[t];
    for (int t = 0; t < Tile; ++t) odd[t] += vb * column_b[t];
  }
  if (k < end) {
    const float va = p.values[k];
    const float* column_a = tile + static_cast<int64_t>(p.columns[k]) * Tile;
    for (int t = 0; t < Tile; ++t) even[t] += va * column_a[t];
  }
  for (int t = 0; t < Tile; ++t) block[t] = even[t] + odd[t] + bias;
#endif
}

// Outputs of units [unit_begin, unit_end) for the rows of one transposed
// tile. Units are done kUnitBlock at a time into a buffer written out row by
// row: with a power-of-two `units`, writing a unit's column directly would
// map all its rows to one cache set.
template <int Tile>
void MultiplyTile(const Problem& p, const float* tile, int64_t row_begin,
                  int64_t unit_begin, int64_t unit_end) {
  const int rows = static_cast<int>(std::min<int64_t>(Tile, p.batch - row_begin));
  alignas(64) float block[kUnitBlock * Tile];
  for (int64_t first = unit_begin; first < unit_end; first += kUnitBlock) {
    const int64_t count = std::min(kUnitBlock, unit_end - first);
    if (!BlockInRange(p, first, first + count)) {
      *p.bad_entry = true;
      return;
    }
    for (int64_t j = 0; j < count; ++j) {
      const float bias = p.bias == nullptr ? 0.0f : p.bias[first + j];
      AccumulateTile<Tile>(p, tile, p.row_splits[first + j],
                           p.row_splits[first + j + 1], bias, block + j * Tile);
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

// y = x @ W for every batch size, on the context's thread pool.
void Multiply(OpKernelContext* context, const Problem& problem) {
  if (problem.batch == 0 || problem.units == 0) return;
  const auto* worker_threads = context->device()->tensorflow_cpu_worker_threads();
  tensorflow::thread::ThreadPool* workers = worker_threads->workers;
  const int threads = worker_threads->num_threads;
  if (problem.batch <= kGatherMaxBatch) {
    const GatherFunction gather = GatherFor(problem.batch, loads.load());
    const int64_t per_unit = 1 + problem.nnz / problem.units;
    const double nanos = 0.4 * problem.nnz * problem.batch;  // measured
    tensorflow::Shard(
        nanos < kParallelMinNanos ? 1 : threads, workers, problem.units,
        4 * per_unit * problem.batch,
        [&](int64_t begin, int64_t end) { gather(problem, begin, end); });
  } else if (problem.batch <= 8) {
    MultiplyTiled<8>(problem, workers, threads);
  } else {
    MultiplyTiled<16>(problem, workers, threads);
  }
}

// Checks x and values and allocates y.
absl::Status Prepare(OpKernelContext* context, const Tensor& x,
                     const Tensor& values, int64_t units, Tensor** y) {
  if (!TensorShapeUtils::IsMatrix(x.shape())) {
    return errors::InvalidArgument("x must be 2-D, got shape ",
                                   x.shape().DebugString());
  }
  if (!TensorShapeUtils::IsVector(values.shape())) {
    return errors::InvalidArgument("values must be 1-D, got shape ",
                                   values.shape().DebugString());
  }
  constexpr int64_t kMaxInt32 = std::numeric_limits<int32_t>::max();
  if (x.dim_size(1) > kMaxInt32 || values.dim_size(0) > kMaxInt32) {
    return errors::InvalidArgument("input_dim and nnz must fit in int32, got ",
                                   x.dim_size(1), " and ", values.dim_size(0));
  }
  return context->allocate_output(0, TensorShape({x.dim_size(0), units}), y);
}

// y = x @ W + bias for W as CSR (bias null for none): checks every operand,
// then multiplies.
absl::Status MultiplyCsr(OpKernelContext* context, const Tensor& x,
                         const Tensor& values, const Tensor& row_splits,
                         const Tensor& columns, const Tensor* bias) {
  if (!TensorShapeUtils::IsVector(row_splits.shape()) ||
      row_splits.dim_size(0) < 1) {
    return errors::InvalidArgument(
        "row_splits must be 1-D with units + 1 entries, got shape ",
        row_splits.shape().DebugString());
  }
  const int64_t nnz = values.NumElements();
  if (!TensorShapeUtils::IsVector(columns.shape()) || columns.dim_size(0) != nnz) {
    return errors::InvalidArgument("columns must have shape [nnz] with nnz = ", nnz,
                                   ", got ", columns.shape().DebugString());
  }
  const int64_t units = row_splits.dim_size(0) - 1;
  if (bias != nullptr) {
    if (!TensorShapeUtils::IsVector(bias->shape()) ||
        (bias->dim_size(0) != units && bias->dim_size(0) != 0)) {
      return errors::InvalidArgument("bias must have shape [units] with units = ",
                                     units, ", or [0], got ",
                                     bias->shape().DebugString());
    }
    if (bias->dim_size(0) == 0) bias = nullptr;
  }
  Tensor* y = nullptr;
  TF_RETURN_IF_ERROR(Prepare(context, x, values, units, &y));
  std::atomic<bool> bad_entry(false);
  Multiply(context, {x.flat<float>().data(), values.flat<float>().data(),
                     row_splits.flat<int32_t>().data(), columns.flat<int32_t>().data(),
                     bias == nullptr ? nullptr : bias->flat<float>().data(),
                     x.dim_size(0), x.dim_size(1), units, nnz,
                     y->flat<float>().data(), &bad_entry});
  if (bad_entry) {
    return errors::InvalidArgument("row_splits must rise from 0 to at most nnz = ",
                                   nnz, ", and columns must lie in [0, ",
                                   x.dim_size(1), ")");
  }
  return absl::OkStatus();
}

}  // namespace

class CsrMatMulOp : public OpKernel {
 public:
  explicit CsrMatMulOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    OP_REQUIRES_OK(context, MultiplyCsr(context, context->input(0), context->input(1),
                                        context->input(2), context->input(3),
                                        &context->input(4)));
  }
};

// The same, reading the operands from their variables under shared locks
// (so that an assignment cannot change them halfway through a product).
class CsrMatMulVariablesOp : public OpKernel {
 public:
  explicit CsrMatMulVariablesOp(OpKernelConstruction* context)
      : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    const int count = context->num_inputs() - 1;  // 3, or 4 with a bias
    tensorflow::core::RefCountPtr<tensorflow::Var> variables[4];
    for (int i = 0; i < count; ++i) {
      OP_REQUIRES_OK(context, tensorflow::LookupResource(
                                  context, tensorflow::HandleFromInput(context, i + 1),
                                  &variables[i]));
    }
    const tensorflow::DataType expected[4] = {
        tensorflow::DT_FLOAT, tensorflow::DT_INT32, tensorflow::DT_INT32,
        tensorflow::DT_FLOAT};
    const char* names[4] = {"values", "row_splits", "columns", "bias"};
    for (int i = 0; i < count; ++i) {
      OP_REQUIRES(context, variables[i]->is_initialized,
                  errors::FailedPrecondition(names[i], " is not initialized"));
      OP_REQUIRES(context, variables[i]->tensor()->dtype() == expected[i],
                  errors::InvalidArgument(
                      names[i], " must be a ", tensorflow::DataTypeString(expected[i]),
                      " variable, got ",
                      tensorflow::DataTypeString(variables[i]->tensor()->dtype())));
    }
    // Locks taken in input order; readers only, so they cannot deadlock
    // with each other (a writer takes one variable's lock at a time).
    tensorflow::tf_shared_lock values_lock(*variables[0]->mu());
    tensorflow::tf_shared_lock row_splits_lock(*variables[1]->mu());
    tensorflow::tf_shared_lock columns_lock(*variables[2]->mu());
    const Tensor* bias = nullptr;
    std::unique_ptr<tensorflow::tf_shared_lock> bias_lock;
    if (count == 4) {
      bias_lock = std::make_unique<tensorflow::tf_shared_lock>(*variables[3]->mu());
      bias = variables[3]->tensor();
    }
    OP_REQUIRES_OK(context,
                   MultiplyCsr(context, context->input(0), *variables[0]->tensor(),
                               *variables[1]->tensor(), *variables[2]->tensor(), bias));
  }
};

// keras_prune 0.2's op: COO pairs, converted to CSR at every call (each
// thread keeps its buffers across calls).
class SparseMatMulOp : public OpKernel {
 public:
  explicit SparseMatMulOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("units", &units_));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& indices = context->input(2);
    const int64_t nnz = context->input(1).NumElements();
    OP_REQUIRES(
        context,
        TensorShapeUtils::IsMatrix(indices.shape()) &&
            indices.dim_size(0) == nnz && indices.dim_size(1) == 2,
        errors::InvalidArgument("indices must have shape [nnz, 2] with nnz = ",
                                nnz, ", got ", indices.shape().DebugString()));
    const Tensor& x = context->input(0);
    Tensor* y = nullptr;
    OP_REQUIRES_OK(context, Prepare(context, x, context->input(1), units_, &y));
    const int64_t input_dim = x.dim_size(1);
    const int64_t* pairs = indices.flat<int64_t>().data();
    thread_local std::vector<int32_t> row_splits, columns;
    row_splits.assign(units_ + 1, 0);
    columns.resize(nnz);
    int64_t previous = 0;
    for (int64_t k = 0; k < nnz; ++k) {
      const int64_t unit = pairs[2 * k], input = pairs[2 * k + 1];
      OP_REQUIRES(context, unit >= 0 && unit < units_,
                  errors::InvalidArgument("indices must have units in [0, ",
                                          units_, ")"));
      OP_REQUIRES(context, unit >= previous && input >= 0 && input < input_dim,
                  errors::InvalidArgument(
                      "indices must be (unit, input) pairs sorted by unit, with "
                      "unit < ", units_, " and input < ", input_dim));
      previous = unit;
      ++row_splits[unit + 1];
      columns[k] = static_cast<int32_t>(input);
    }
    for (int64_t unit = 0; unit < units_; ++unit) {
      row_splits[unit + 1] += row_splits[unit];
    }
    std::atomic<bool> bad_entry(false);
    Multiply(context, {x.flat<float>().data(), context->input(1).flat<float>().data(),
                       row_splits.data(), columns.data(), nullptr, x.dim_size(0), input_dim,
                       units_, nnz, y->flat<float>().data(), &bad_entry});
  }

 private:
  int64_t units_;
};

REGISTER_KERNEL_BUILDER(
    Name("KerasPruneCsrMatMul").Device(::tensorflow::DEVICE_CPU), CsrMatMulOp);
REGISTER_KERNEL_BUILDER(
    Name("KerasPruneCsrMatMulVariables").Device(::tensorflow::DEVICE_CPU),
    CsrMatMulVariablesOp);
REGISTER_KERNEL_BUILDER(
    Name("KerasPruneSparseMatMul").Device(::tensorflow::DEVICE_CPU),
    SparseMatMulOp);

}  // namespace keras_prune

// The choice of loads, for Python (ctypes): which were built, which is
// used, and how fast each is on this CPU.
extern "C" {

// Whether the gather loads were built (the library was compiled with AVX2).
int keras_prune_gather_loads_built() {
#ifdef KERAS_PRUNE_AVX2
  return 1;
#else
  return 0;
#endif
}

// Sets the loads of the small-batch loop: 0 scalar, 1 gather (ignored when
// the gather loads were not built). Calls that already started keep theirs.
void keras_prune_set_loads(int how) {
  keras_prune::loads = how == keras_prune::kGatherLoads &&
                               keras_prune_gather_loads_built()
                           ? keras_prune::kGatherLoads
                           : keras_prune::kScalarLoads;
}

// The fastest of `repeats` matrix-vector products, in nanoseconds, of a
// random (input_dim x units) matrix with each weight kept with probability
// `density` (fixed seed), on the calling thread with the given loads; -1
// for bad arguments.
double keras_prune_time_loads(int how, int64_t input_dim, int64_t units,
                              double density, int repeats) {
  using namespace keras_prune;
  if (input_dim <= 0 || input_dim > std::numeric_limits<int32_t>::max() ||
      units <= 0 || !(density > 0 && density <= 1) || repeats <= 0) {
    return -1;
  }
  std::mt19937 random(0);
  std::uniform_real_distribution<float> uniform(-1, 1);
  std::geometric_distribution<int64_t> gap(density);
  std::vector<int32_t> row_splits(units + 1, 0), columns;
  std::vector<float> values;
  for (int64_t unit = 0; unit < units; ++unit) {
    for (int64_t input = gap(random); input < input_dim; input += 1 + gap(random)) {
      columns.push_back(static_cast<int32_t>(input));
      values.push_back(uniform(random));
    }
    row_splits[unit + 1] = static_cast<int32_t>(columns.size());
  }
  std::vector<float> x(input_dim), y(units);
  for (float& element : x) element = uniform(random);
  std::atomic<bool> bad_entry(false);
  const Problem problem{x.data(), values.data(), row_splits.data(), columns.data(),
                        nullptr, 1, input_dim, units, static_cast<int64_t>(values.size()),
                        y.data(), &bad_entry};
  const GatherFunction gather = GatherFor(1, how);
  double best = std::numeric_limits<double>::infinity();
  for (int repeat = -2; repeat < repeats; ++repeat) {  // two to warm up
    const auto start = std::chrono::steady_clock::now();
    gather(problem, 0, units);
    const std::chrono::duration<double, std::nano> took =
        std::chrono::steady_clock::now() - start;
    if (repeat >= 0) best = std::min(best, took.count());
  }
  return best;
}

}  // extern "C"
