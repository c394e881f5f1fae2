// lst's native frame reader for the cache's shard files (pipeline/cache/native_read.py loads it).
//
// One call reads, checks and decodes a list of Blosc frames: for each, a pread of the frame and its
// crc32c from an open shard file into the slot's scratch, the checksum verified, and the frame decoded
// through the slot's c-blosc2 context straight into its destination (only the blocks holding the
// rows asked for, where a piece edge cuts the chunk), or, for a task with segments, decoded into the
// slot's chunk scratch and its rows copied out run by run to where the caller wants them (the
// reader lays a window out in batch order, so a batch is one run of it and needs no gather).
// Why: the stage-two reader did this in Python a frame at a time, holding the GIL between the calls
// (~27% of its CPU), on decode threads that competed for the two cores with the training thread's
// spinning OpenMP worker. Called from the training thread, the frames are shared out over torch's own
// OpenMP team (the worker decodes instead of spinning), with the GIL released throughout.
//
// c-blosc2 is not linked: the caller passes the addresses of blosc2_decompress_ctx and
// blosc2_getitem_ctx from the library its Python side loaded, and one context per slot.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#if defined(__SSE4_2__)
#include <nmmintrin.h>
#endif
#if defined(__SSE2__)
#include <immintrin.h>
#endif
#include <unistd.h>

#include <array>
#include <atomic>
#include <cerrno>
#include <cstring>

namespace {

constexpr uint32_t POLY = 0x82f63b78u;  // crc32c (Castagnoli), reflected

// --- crc32c ------------------------------------------------------------------------------------
// Three independent hardware chains over thirds of the buffer (the instruction's latency is three
// times its throughput), joined as zlib's crc32_combine does, with the Castagnoli polynomial.

uint32_t multmodp(uint32_t a, uint32_t b) {
  uint32_t m = 1u << 31, p = 0;
  for (;;) {
    if (a & m) {
      p ^= b;
      if ((a & (m - 1)) == 0) break;
    }
    m >>= 1;
    b = b & 1 ? (b >> 1) ^ POLY : b >> 1;
  }
  return p;
}

struct Tables {
  std::array<uint32_t, 32> x2n;   // x^(2^k) mod p
  std::array<uint32_t, 256> byte;  // one byte of the software crc
  Tables() {
    uint32_t p = 1u << 30;  // x^1
    x2n[0] = p;
    for (int k = 1; k < 32; ++k) x2n[k] = p = multmodp(p, p);
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int j = 0; j < 8; ++j) c = c & 1 ? (c >> 1) ^ POLY : c >> 1;
      byte[i] = c;
    }
  }
};
const Tables TABLES;

// x^(n * 2^k) mod p
uint32_t x2nmodp(uint64_t n, unsigned k) {
  uint32_t p = 1u << 31;  // x^0
  while (n) {
    if (n & 1) p = multmodp(TABLES.x2n[k & 31], p);
    n >>= 1;
    ++k;
  }
  return p;
}

// the crc of A || B from crc(A), crc(B) and B's length
uint32_t combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b) {
  return multmodp(x2nmodp(len_b, 3), crc_a) ^ crc_b;
}

// the raw register after the bytes (no inversions)
uint32_t extend_raw(uint32_t c, const uint8_t* p, size_t n) {
#if defined(__SSE4_2__)
  uint64_t c64 = c;
  for (; n >= 8; n -= 8, p += 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    c64 = _mm_crc32_u64(c64, w);
  }
  c = static_cast<uint32_t>(c64);
  for (; n; --n, ++p) c = _mm_crc32_u8(c, *p);
#else
  for (; n; --n, ++p) c = TABLES.byte[(c ^ *p) & 0xff] ^ (c >> 8);
#endif
  return c;
}

uint32_t crc32c(const uint8_t* p, size_t n) {
#if defined(__SSE4_2__)
  const size_t third = (n / 3) & ~size_t(7);
  if (third >= 4096) {
    uint64_t a = 0xffffffffu, b = 0xffffffffu, c = 0xffffffffu;
    const uint8_t *pa = p, *pb = p + third, *pc = p + 2 * third;
    for (size_t i = 0; i < third; i += 8) {
      uint64_t wa, wb, wc;
      std::memcpy(&wa, pa + i, 8);
      std::memcpy(&wb, pb + i, 8);
      std::memcpy(&wc, pc + i, 8);
      a = _mm_crc32_u64(a, wa);
      b = _mm_crc32_u64(b, wb);
      c = _mm_crc32_u64(c, wc);
    }
    const uint32_t tail = ~extend_raw(static_cast<uint32_t>(c), pc + third, n - 3 * third);
    uint32_t crc = combine(~static_cast<uint32_t>(a), ~static_cast<uint32_t>(b), third);
    return combine(crc, tail, n - 2 * third);
  }
#endif
  return ~extend_raw(0xffffffffu, p, n);
}

// --- frames ------------------------------------------------------------------------------------
typedef int (*decompress_fn)(void* ctx, const void* src, int32_t srcsize, void* dest, int32_t destsize);
typedef int (*getitem_fn)(void* ctx, const void* src, int32_t srcsize, int start, int nitems, void* dest,
                          int32_t destsize);

// columns of a task row: the frame's file, place and size (with its crc32c); where it decodes to and how
// many bytes (DEST: 0 for a task with segments); the decoded byte its first wanted byte is (-1: the
// whole frame); its segments (rows [SEG_BEGIN, SEG_END) of the segment table: source byte offset from
// the first wanted byte, bytes, destination address)
enum Col { FD, OFFSET, FRAME_BYTES, DEST, DEST_BYTES, PART_OFFSET, SEG_BEGIN, SEG_END, COLS };
enum SegCol { SRC, NBYTES, TO, SEG_COLS };
// a task's status
enum Status : int64_t { OK = 0, SHORT_READ = 1, CHECKSUM = 2, DECODE = 3, TOO_BIG = 4 };

// --- copies out ---------------------------------------------------------------------------------
// A run of rows into the window with streaming stores where it is whole 64-byte lines (rows of 384
// bf16 are 12 of them, and window buffers start on a page): the window is read by steps later, not
// now, and a normal store first reads each line it writes. A MiniLM SST-2 epoch's decode took 0.71-0.76
// against 0.79-0.81 s of CPU on one thread, and `lst train`'s stall 5.5-5.7% against 5.8-6.1% (session
// 32), its steps no slower (those of a window come from memory either way: 64 MB of it).
void copy_out(uint8_t* d, const uint8_t* s, int64_t n) {
#if defined(__AVX512F__) || defined(__AVX__) || defined(__SSE2__)
  if ((reinterpret_cast<uintptr_t>(d) & 63) == 0 && (n & 63) == 0) {
    for (int64_t k = 0; k < n; k += 64) {
#if defined(__AVX512F__)
      _mm512_stream_si512(reinterpret_cast<__m512i*>(d + k), _mm512_loadu_si512(s + k));
#elif defined(__AVX__)
      _mm256_stream_si256(reinterpret_cast<__m256i*>(d + k),
                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + k)));
      _mm256_stream_si256(reinterpret_cast<__m256i*>(d + k + 32),
                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + k + 32)));
#else
      for (int q = 0; q < 64; q += 16)
        _mm_stream_si128(reinterpret_cast<__m128i*>(d + k + q),
                         _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + k + q)));
#endif
    }
    return;
  }
#endif
  std::memcpy(d, s, n);
}

// the streaming stores of this thread, ordered before what it does next (the end of its part)
void fence_copies() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// a task's segments copied out of `from`, its `want` wanted bytes
int64_t copy_segments(const int64_t* t, const uint8_t* from, int64_t want, const int64_t* segs) {
  for (int64_t j = t[SEG_BEGIN]; j < t[SEG_END]; ++j) {
    const int64_t* g = segs + j * SEG_COLS;
    if (g[SRC] < 0 || g[SRC] + g[NBYTES] > want) return DECODE;
    copy_out(reinterpret_cast<uint8_t*>(g[TO]), from + g[SRC], g[NBYTES]);
  }
  return OK;
}

// A frame Blosc stored as it was (level 0: `lst extract --compression none`) holds its bytes right
// after a 16-byte Blosc1 header: a task with segments copies its runs out from there, with no decode
// into the chunk scratch in between. The flag and both sizes must agree; anything else (Blosc2's longer
// headers included) decodes as any frame does.
constexpr uint8_t BLOSC_MEMCPYED = 0x02;
constexpr int64_t BLOSC1_HEADER = 16;
const uint8_t* stored_as_is(const uint8_t* frame, int64_t n) {
  if (n < BLOSC1_HEADER || !(frame[2] & BLOSC_MEMCPYED)) return nullptr;
  uint32_t nbytes, cbytes;
  std::memcpy(&nbytes, frame + 4, 4);
  std::memcpy(&cbytes, frame + 12, 4);
  if (cbytes != n || static_cast<int64_t>(nbytes) + BLOSC1_HEADER != n) return nullptr;
  return frame + BLOSC1_HEADER;
}

// (Reading frames through a mapping of each shard file, instead of a pread's copy into scratch,
// measured no faster: 0.38-0.41 s of a MiniLM epoch's decode against 0.36-0.38 s, its page faults and
// unmapping costing what the copy did. A mapping of each frame alone, populated at once
// (MAP_POPULATE), was as fast on one thread and slower on two: 0.52-0.56 against 0.40-0.43 s, session 32.)
// A task whose FD is -1 has its frame in memory already, at address OFFSET (read ahead by the reader
// while the steps ran: ``pipeline.train.prefetch``); it is checked and decoded from there.
int64_t read_frame(const int64_t* t, uint8_t* buf, int64_t cap, uint8_t* chunk, int64_t chunk_cap,
                   const int64_t* segs, void* ctx, decompress_fn dec, getitem_fn get) {
  const int64_t n = t[FRAME_BYTES];
  if (t[FD] < 0) {
    if (n < 4 + 16) return SHORT_READ;
    buf = reinterpret_cast<uint8_t*>(t[OFFSET]);
  } else {
    if (n < 4 + 16 || n > cap) return n > cap ? TOO_BIG : SHORT_READ;
    int64_t got = 0;
    while (got < n) {
      const ssize_t r = pread(static_cast<int>(t[FD]), buf + got, n - got, t[OFFSET] + got);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) return SHORT_READ;
      got += r;
    }
  }
  uint32_t stored;
  std::memcpy(&stored, buf + n - 4, 4);
  if (crc32c(buf, n - 4) != stored) return CHECKSUM;
  const bool scatter = t[SEG_END] > t[SEG_BEGIN];
  const int64_t want = t[DEST_BYTES];
  const int32_t frame = static_cast<int32_t>(n - 4);
  const uint8_t* raw = scatter ? stored_as_is(buf, frame) : nullptr;
  if (raw != nullptr) {
    const int64_t first = t[PART_OFFSET] < 0 ? 0 : t[PART_OFFSET];
    if (first + want > frame - BLOSC1_HEADER) return DECODE;
    return copy_segments(t, raw + first, want, segs);
  }
  if (scatter && want > chunk_cap) return TOO_BIG;
  void* dest = scatter ? static_cast<void*>(chunk) : reinterpret_cast<void*>(t[DEST]);
  int rc;
  if (t[PART_OFFSET] < 0) {
    rc = dec(ctx, buf, frame, dest, static_cast<int32_t>(want));
  } else {
    const int typesize = buf[3];
    if (typesize <= 0 || t[PART_OFFSET] % typesize || want % typesize) return DECODE;
    rc = get(ctx, buf, frame, static_cast<int>(t[PART_OFFSET] / typesize), static_cast<int>(want / typesize),
             dest, static_cast<int32_t>(want));
  }
  if (rc != want) return DECODE;
  return copy_segments(t, chunk, want, segs);
}

// Reads and decodes every task ([F, COLS] int64), each slot with its own scratch row (uint8 [slots,
// frame_cap + chunk scratch]) and context: over at most `slots` threads of torch's team where
// `parallel`, else on the calling thread with slot 0. A task row's status comes back in the returned
// [F] tensor. Tasks are taken in order from a shared counter, so threads finish together.
torch::Tensor decode_frames(torch::Tensor tasks, torch::Tensor segments, torch::Tensor scratch, int64_t frame_cap,
                            std::vector<int64_t> contexts, int64_t decompress_addr, int64_t getitem_addr,
                            bool parallel) {
  TORCH_CHECK(tasks.scalar_type() == torch::kInt64 && tasks.dim() == 2 && tasks.size(1) == COLS &&
              tasks.is_contiguous(), "tasks must be a contiguous int64 [F, ", int(COLS), "] tensor");
  TORCH_CHECK(segments.scalar_type() == torch::kInt64 && segments.dim() == 2 && segments.size(1) == SEG_COLS &&
              segments.is_contiguous(), "segments must be a contiguous int64 [S, ", int(SEG_COLS), "] tensor");
  TORCH_CHECK(scratch.scalar_type() == torch::kUInt8 && scratch.dim() == 2 && scratch.is_contiguous(),
              "scratch must be a contiguous uint8 [slots, bytes] tensor");
  const int64_t slots = std::min<int64_t>(scratch.size(0), static_cast<int64_t>(contexts.size()));
  TORCH_CHECK(slots > 0, "at least one slot (scratch row and context) is needed");
  const int64_t F = tasks.size(0), row = scratch.size(1), cap = frame_cap;
  TORCH_CHECK(0 < cap && cap <= row, "frame_cap must be within a scratch row");
  const int64_t S = segments.size(0);
  const int64_t* t0 = tasks.data_ptr<int64_t>();
  for (int64_t i = 0; i < F; ++i)
    TORCH_CHECK(0 <= t0[i * COLS + SEG_BEGIN] && t0[i * COLS + SEG_BEGIN] <= t0[i * COLS + SEG_END] &&
                t0[i * COLS + SEG_END] <= S, "task ", i, "'s segments are out of the table's range");
  auto status = torch::zeros({F}, torch::kInt64);
  const int64_t* t = tasks.data_ptr<int64_t>();
  int64_t* st = status.data_ptr<int64_t>();
  uint8_t* sc = scratch.data_ptr<uint8_t>();
  const int64_t* segs = segments.data_ptr<int64_t>();
  const auto dec = reinterpret_cast<decompress_fn>(decompress_addr);
  const auto get = reinterpret_cast<getitem_fn>(getitem_addr);
  std::atomic<int64_t> next{0};
  {
    pybind11::gil_scoped_release no_gil;
    auto drain = [&](int64_t s) {
      void* ctx = reinterpret_cast<void*>(contexts[s]);
      for (int64_t i = next.fetch_add(1); i < F; i = next.fetch_add(1))
        st[i] = read_frame(t + i * COLS, sc + s * row, cap, sc + s * row + cap, row - cap, segs, ctx, dec, get);
      fence_copies();
    };
    const int64_t used = std::min<int64_t>({slots, F, static_cast<int64_t>(at::get_num_threads())});
    if (!parallel || used <= 1) {
      drain(0);
    } else {
      at::parallel_for(0, used, 1, [&](int64_t s0, int64_t s1) {
        for (int64_t s = s0; s < s1; ++s) drain(s);
      });
    }
  }
  return status;
}

int64_t crc32c_of(torch::Tensor bytes) {
  TORCH_CHECK(bytes.scalar_type() == torch::kUInt8 && bytes.is_contiguous(), "a contiguous uint8 tensor");
  return crc32c(bytes.data_ptr<uint8_t>(), bytes.numel());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_frames", &decode_frames, "read, check and decode Blosc frames from shard files");
  m.def("crc32c", &crc32c_of, "crc32c of a uint8 tensor (tests)");
  m.attr("COLS") = static_cast<int64_t>(COLS);
  m.attr("SEG_COLS") = static_cast<int64_t>(SEG_COLS);
}
