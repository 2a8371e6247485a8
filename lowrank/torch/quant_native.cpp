// The CPU 4-bit kernels of lowrank.torch.quant_cpu in C++, run on PyTorch's own OpenMP threads.
//
// Paper: Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs" (arXiv:2305.14314).
// The same float32 arithmetic, block for block, as quant_numba.py's loops (whose docstrings
// explain each step) and as lowrank/numpy/quant.py, the readable reference; only where the work
// runs changes. Built on first use by lowrank/torch/quant_native.py (torch.utils.cpp_extension,
// -O3 -march=native -ffp-contract=off: no fused multiply-add, so every product rounds as
// NumPy's does) and called through ctypes with raw pointers; every array is contiguous and
// sized by the caller, which also checks the inputs.
//
// Why C++ and not numba here: these loops run between matmuls, and after a matmul PyTorch's
// OpenMP threads keep spinning for a while. numba's loops ran on Python threads of their own,
// which then shared two cores with those spinning threads (a 2048 x 2048 decode on two threads:
// 5.8-6.5 ms right after a matmul, 3.6-4.9 ms on one thread). `#pragma omp parallel` here
// links libgomp.so.1, the soname of the runtime PyTorch has already loaded, so the blocks run
// on PyTorch's own pool (same decode: 2.1 ms after a matmul).
//
// Elements: `bits` are float32 bit patterns (uint32); bfloat16 is the top half of a float32 and
// float16 is widened exactly by the compiler's _Float16 (one instruction with F16C).

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr float kTiny = 1e-38f;                   // an all-zero block's stand-in absmax
constexpr float kLift = 18446744073709551616.0f;  // 2 ** 64: blocks below kTiny are lifted
constexpr uint32_t kSignCleared = 0x7FFFFFFFu;
constexpr float kFloat32Max = 3.4028234663852886e38f;
constexpr int64_t kParallelElements = 1 << 16;  // below this, one thread: the pool costs more

inline float as_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, 4);
  return value;
}

inline uint32_t as_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  return bits;
}

// Calls work(first, last) on one run of neighbouring blocks per thread of PyTorch's pool
// (`threads` = torch.get_num_threads(), as at::parallel_for splits its range).
template <class Work>
void for_blocks(int64_t n_blocks, int64_t blocksize, int threads, const Work& work) {
  if (threads <= 1 || n_blocks * blocksize < kParallelElements) {
    work(int64_t{0}, n_blocks);
    return;
  }
  if (omp_get_max_threads() != threads) omp_set_num_threads(threads);  // as torch does
#pragma omp parallel
  {
    const int64_t count = omp_get_num_threads(), id = omp_get_thread_num();
    const int64_t per_thread = (n_blocks + count - 1) / count;
    const int64_t first = id * per_thread, last = std::min(n_blocks, first + per_thread);
    if (first < last) work(first, last);
  }
}

// Element j of the source as float32 bits, for the three source dtypes.
struct Float32Source {
  const uint32_t* data;
  uint32_t operator()(int64_t j) const { return data[j]; }
};
struct BFloat16Source {
  const uint16_t* data;
  uint32_t operator()(int64_t j) const { return uint32_t{data[j]} << 16; }
};
struct Float16Source {
  const _Float16* data;
  uint32_t operator()(int64_t j) const { return as_bits(static_cast<float>(data[j])); }
};

// Reads `size` elements from `start` into v as float32 and returns their absmax: the largest
// sign-cleared bit pattern (the bits of non-negative floats order as their values, NaN above inf).
template <class Source>
inline float load_block(const Source& source, int64_t start, int64_t size, float* __restrict v) {
  uint32_t top = 0;
  for (int64_t j = 0; j < size; ++j) {
    const uint32_t word = source(start + j);
    v[j] = as_float(word);
    top = std::max(top, word & kSignCleared);
  }
  return as_float(top);
}

// Scales a whole block's values in place as lowrank.numpy.quant does: times 1 / absmax, a block
// below 1e-38 (no float32 reciprocal) first lifted by 2 ** 64, exactly.
inline void scale_block(float* __restrict v, int64_t size, float block_absmax) {
  const bool lift = block_absmax > 0 && block_absmax < kTiny;
  const float before = lift ? kLift : 1.0f;
  const float inverse =
      lift ? 1.0f / (block_absmax * kLift) : 1.0f / std::max(block_absmax, kTiny);
  for (int64_t j = 0; j < size; ++j) v[j] = (v[j] * before) * inverse;
}

// quant_numba._quantize_4bit: blocks [first, last) of whole blocks to packed codes.
template <class Source>
void quantize_blocks(const Source& source, int64_t first, int64_t last, int64_t blocksize,
                     const float* midpoints_in, const uint8_t* order, float* absmax,
                     uint8_t* packed) {
  float midpoints[15];
  std::copy(midpoints_in, midpoints_in + 15, midpoints);
  bool identity = true;
  for (int k = 0; k < 16; ++k) identity = identity && order[k] == k;
  uint8_t pair_code[256];  // a byte of two sorted positions -> the byte of their two codes
  for (int b = 0; b < 256; ++b)
    pair_code[b] = static_cast<uint8_t>((order[b >> 4] << 4) | order[b & 15]);
  std::vector<float> values(blocksize);
  std::vector<int32_t> codes(blocksize);  // int32: the 15 comparisons vectorize
  float* __restrict v = values.data();
  int32_t* __restrict c = codes.data();
  for (int64_t block = first; block < last; ++block) {
    const int64_t start = block * blocksize;
    absmax[block] = load_block(source, start, blocksize, v);
    scale_block(v, blocksize, absmax[block]);
    for (int64_t j = 0; j < blocksize; ++j) {
      int32_t count = 0;  // midpoints strictly below: torch.bucketize's position
      for (int k = 0; k < 15; ++k) count += v[j] > midpoints[k];
      c[j] = count;
    }
    uint8_t* out = packed + start / 2;
    for (int64_t p = 0; p < blocksize / 2; ++p)
      out[p] = static_cast<uint8_t>((c[2 * p] << 4) | c[2 * p + 1]);
    if (!identity)  // FP4: sorted positions -> codes, a byte (two of them) at a time
      for (int64_t p = 0; p < blocksize / 2; ++p) out[p] = pair_code[out[p]];
  }
}

// quant_numba._quantize_codes: blocks [first, last) of n elements to one code per element by
// the 16-bit cell lookup (below[cell] + (scaled > threshold[cell])); the last block may be
// short, and a short block is divided by its absmax, as bitsandbytes does.
template <class Source>
void quantize_code_blocks(const Source& source, int64_t n, int64_t first, int64_t last,
                          int64_t blocksize, const uint8_t* below, const float* threshold,
                          const uint8_t* order, float* absmax, uint8_t* codes) {
  std::vector<float> values(blocksize);
  float* __restrict v = values.data();
  for (int64_t block = first; block < last; ++block) {
    const int64_t start = block * blocksize, size = std::min(blocksize, n - start);
    const float block_absmax = load_block(source, start, size, v);
    absmax[block] = block_absmax;
    if (size < blocksize) {
      const float divisor = block_absmax > 0 ? block_absmax : kTiny;
      for (int64_t j = 0; j < size; ++j) v[j] = v[j] / divisor;
    } else {
      scale_block(v, size, block_absmax);
    }
    for (int64_t j = 0; j < size; ++j) {
      const uint32_t cell = as_bits(v[j]) >> 16;
      codes[start + j] = order[below[cell] + (v[j] > threshold[cell] ? 1 : 0)];
    }
  }
}

// Calls work(source) with the source functor of source_kind: 0 float32, 1 bfloat16, 2 float16.
template <class Work>
void with_source(const void* source, int source_kind, const Work& work) {
  if (source_kind == 0)
    work(Float32Source{static_cast<const uint32_t*>(source)});
  else if (source_kind == 1)
    work(BFloat16Source{static_cast<const uint16_t*>(source)});
  else
    work(Float16Source{static_cast<const _Float16*>(source)});
}

// quant_numba._float16_bits: float32 bits -> float16 bits, nearest even, subnormals included.
inline uint16_t float16_bits(uint32_t bits) {
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const int64_t magnitude = bits & kSignCleared;
  if (magnitude >= 0x38800000) {  // 2 ** -14 and up: a normal float16
    const int64_t odd = (magnitude >> 13) & 1;
    const int64_t rebiased = magnitude - (int64_t{112} << 23) + 0xFFF + odd;
    return static_cast<uint16_t>(sign | (rebiased >> 13));
  }
  const int64_t exponent = magnitude >> 23;
  if (exponent < 102) return static_cast<uint16_t>(sign);  // below 2 ** -25: zero
  const int64_t mantissa = (magnitude & 0x7FFFFF) | 0x800000;
  const int64_t shift = 126 - exponent;  // 14..24
  int64_t units = mantissa >> shift;
  const int64_t rest = mantissa & ((int64_t{1} << shift) - 1);
  const int64_t half = int64_t{1} << (shift - 1);
  units += (rest > half || (rest == half && (units & 1) == 1)) ? 1 : 0;
  return static_cast<uint16_t>(sign | units);
}

// The scale of every block: absmax as float32, or with double quantization rebuilt from its
// 8-bit code as quant_cpu._scales does (dynamic_map[code] * absmax2[block / 256] + offset, two
// roundings, clamped to +-float32 max); then to +-limit where that is smaller (NaN stays NaN).
struct Scales {
  const void* absmax;     // float32 [n_blocks], or uint8 codes [n_blocks]
  const float* absmax2;   // float32 [ceil(n_blocks / 256)], or null: no double quantization
  const float* dynamic;   // float32 [256], the dynamic map
  float offset;
  float limit;
  float operator()(int64_t block) const {
    float scale;
    if (absmax2 == nullptr) {
      scale = static_cast<const float*>(absmax)[block];
    } else {
      const uint8_t code = static_cast<const uint8_t*>(absmax)[block];
      scale = dynamic[code] * absmax2[block / 256] + offset;
      if (scale > kFloat32Max) scale = kFloat32Max;
      if (scale < -kFloat32Max) scale = -kFloat32Max;
    }
    if (limit < kFloat32Max) {  // float16, bfloat16 (a float32 absmax of inf stays inf)
      if (scale > limit) scale = limit;
      if (scale < -limit) scale = -limit;
    }
    return scale;
  }
};

// quant_numba._dequantize_float32 / _dequantize_16bit: each block makes its 16 values once,
// then each byte of codes picks two (high nibble first). Out is float32, or the bits of
// bfloat16 / float16 rounded from the float32 product as torch's cast rounds.
template <class Out, class Round>
void dequantize_blocks(const uint8_t* packed, const Scales& scales, int64_t first, int64_t last,
                       int64_t blocksize, const float* levels, Out* out, const Round& round) {
  Out table[16];
  const int64_t half = blocksize / 2;
  for (int64_t block = first; block < last; ++block) {
    const float scale = scales(block);
    for (int k = 0; k < 16; ++k) table[k] = round(levels[k] * scale);
    const uint8_t* __restrict bytes = packed + block * half;
    Out* __restrict values = out + block * blocksize;
    for (int64_t j = 0; j < half; ++j) {
      const uint8_t byte = bytes[j];
      values[2 * j] = table[byte >> 4];
      values[2 * j + 1] = table[byte & 15];
    }
  }
}

}  // namespace

extern "C" {

// source_kind: 0 float32, 1 bfloat16, 2 float16. n_blocks whole blocks, blocksize even.
void lowrank_quantize_4bit(const void* source, int source_kind, int64_t n_blocks,
                           int64_t blocksize, const float* midpoints, const uint8_t* order,
                           float* absmax, uint8_t* packed, int threads) {
  with_source(source, source_kind, [&](const auto& elements) {
    for_blocks(n_blocks, blocksize, threads, [&](int64_t first, int64_t last) {
      quantize_blocks(elements, first, last, blocksize, midpoints, order, absmax, packed);
    });
  });
}

// n elements in ceil(n / blocksize) blocks, one uint8 code each (below, threshold: [65536]).
void lowrank_quantize_codes(const void* source, int source_kind, int64_t n, int64_t blocksize,
                            const uint8_t* below, const float* threshold, const uint8_t* order,
                            float* absmax, uint8_t* codes, int threads) {
  with_source(source, source_kind, [&](const auto& elements) {
    for_blocks((n + blocksize - 1) / blocksize, blocksize, threads,
               [&](int64_t first, int64_t last) {
                 quantize_code_blocks(elements, n, first, last, blocksize, below, threshold,
                                      order, absmax, codes);
               });
  });
}

// absmax: float32 scales, or with absmax2 (not null) uint8 codes of the dynamic map; limit: the
// out dtype's largest value (or float32's); out_kind: 0 float32, 1 bfloat16 bits, 2 float16
// bits (16-bit kinds: finite scales only; the caller decodes others to float32 and casts).
void lowrank_dequantize_4bit(const uint8_t* packed, const void* absmax, const float* absmax2,
                             const float* dynamic, float offset, float limit, int64_t n_blocks,
                             int64_t blocksize, const float* levels, int out_kind, void* out,
                             int threads) {
  const Scales scales{absmax, absmax2, dynamic, offset, limit};
  for_blocks(n_blocks, blocksize, threads, [&](int64_t first, int64_t last) {
    if (out_kind == 0) {
      dequantize_blocks(packed, scales, first, last, blocksize, levels,
                        static_cast<float*>(out), [](float x) { return x; });
    } else if (out_kind == 1) {  // round on the float32 bits: add 0x7FFF plus the lowest kept bit
      dequantize_blocks(packed, scales, first, last, blocksize, levels,
                        static_cast<uint16_t*>(out), [](float x) {
                          const uint64_t word = as_bits(x);
                          return static_cast<uint16_t>((word + 0x7FFF + ((word >> 16) & 1)) >> 16);
                        });
    } else {
      dequantize_blocks(packed, scales, first, last, blocksize, levels,
                        static_cast<uint16_t*>(out),
                        [](float x) { return float16_bits(as_bits(x)); });
    }
  });
}

}  // extern "C"
