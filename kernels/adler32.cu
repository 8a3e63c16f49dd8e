// Adler-32 of each image's inflated IDAT data, compared with the checksum stored in the file.
//
// Adler-32 (RFC 1950) of bytes d_0..d_{n-1}, M = 65521:
//   A = 1 + sum d_i                      (mod M)
//   B = n + sum (n - i) * d_i            (mod M)      checksum = B << 16 | A
// (B is the running sum of A after every byte.) So the data can be cut into chunks that are
// summed independently. A chunk of L bytes starting at offset s has the local sums
//   a = sum d_k,  b = sum (L - k) * d_k          (k = 0..L-1, i.e. zlib's recurrence from a = b = 0)
// and contributes a to A and b + (n - s - L) * a to B: the combine rule, since
//   b + (n - s - L) * a = sum (L - k + n - s - L) * d_k = sum (n - (s + k)) * d_k.
// Contributions are added in any order, so chunks need no ordered scan: each thread folds its
// 16-byte chunks (one coalesced uint4 load each) into 64-bit sums, the block adds the threads' sums
// and thread 0 reduces mod M once. (tests/test_gpu_loader.py checks this formula against zlib.)
//
// Bounds: per chunk a <= 16*255 and b + (n-s-L) mod M * a < 2^28, so a 64-bit sum holds 2^36
// chunks (1 TiB) before it could overflow.
//
// One thread block per image; status |= ADLER_MISMATCH when the checksum differs.

typedef unsigned char u8;
typedef unsigned int u32;
typedef unsigned long long u64;

#define ADLER_MOD 65521u
#define ADLER_CHUNK 16u
#define ADLER_MAX_THREADS 1024
// Status bit shared with engine/loaders/gpu.py (STATUS_ADLER_MISMATCH).
#define ADLER_MISMATCH 1u

struct AdlerJob {
    u64 offset;    // first inflated byte of the image in `data`
    u64 length;    // inflated bytes (the image's raw_size)
    u32 expected;  // the Adler-32 stored after the deflate stream
    u32 reserved;
};
static_assert(sizeof(AdlerJob) == 24, "AdlerJob layout is mirrored by ADLER_JOB in engine/loaders/gpu.py");

// Local sums of one chunk, then its contribution to (A, B) given its distance to the end.
__device__ __forceinline__ void add_chunk(const u8* bytes, u32 length, u64 bytes_after, u64& sum_a, u64& sum_b) {
    u32 a = 0, b = 0;
    for (u32 k = 0; k < length; ++k) {
        a += bytes[k];
        b += a;  // after the loop: b = sum (length - k) * d_k
    }
    sum_a += a;
    sum_b += b + (bytes_after % ADLER_MOD) * a;
}

__device__ __forceinline__ void add_chunk16(uint4 words, u64 bytes_after, u64& sum_a, u64& sum_b) {
    const u32 w[4] = {words.x, words.y, words.z, words.w};
    u32 a = 0, b = 0;
#pragma unroll
    for (int k = 0; k < 16; ++k) {  // little-endian: byte k of the chunk is bits 8*(k%4) of word k/4
        a += (w[k >> 2] >> (8 * (k & 3))) & 0xffu;
        b += a;
    }
    sum_a += a;
    sum_b += b + (bytes_after % ADLER_MOD) * a;
}

__device__ __forceinline__ u64 block_sum(u64 value, u64* scratch) {
    for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_down_sync(0xffffffffu, value, offset);
    const u32 lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    if (lane == 0) scratch[warp] = value;
    __syncthreads();
    const u32 warps = (blockDim.x + 31u) >> 5;
    value = 0;
    if (threadIdx.x < 32u) {
        if (lane < warps) value = scratch[lane];
        for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_down_sync(0xffffffffu, value, offset);
    }
    __syncthreads();  // scratch is reused by the next call
    return value;     // valid in thread 0
}

extern "C" __global__ void __launch_bounds__(ADLER_MAX_THREADS)
adler32_verify(const AdlerJob* __restrict__ jobs, const u8* __restrict__ data, u32* __restrict__ status,
               u32* __restrict__ computed, u32 n_jobs) {
    __shared__ u64 scratch[ADLER_MAX_THREADS / 32];
    const u32 i = blockIdx.x;
    if (i >= n_jobs) return;
    const AdlerJob job = jobs[i];
    const u8* bytes = data + job.offset;
    const u64 n = job.length;
    u64 sum_a = 0, sum_b = 0;

    // Whole 16-byte chunks with vector loads when the image starts 16-byte aligned (the loader's
    // layout), byte chunks otherwise; then the tail.
    const u64 whole = ((u64)bytes & 15u) == 0 ? n / ADLER_CHUNK : 0;
    const uint4* words = (const uint4*)bytes;
    for (u64 chunk = threadIdx.x; chunk < whole; chunk += blockDim.x) {
        const u64 start = chunk * ADLER_CHUNK;
        add_chunk16(words[chunk], n - start - ADLER_CHUNK, sum_a, sum_b);
    }
    for (u64 start = whole * ADLER_CHUNK + (u64)threadIdx.x * ADLER_CHUNK; start < n;
         start += (u64)blockDim.x * ADLER_CHUNK) {
        const u32 length = (u32)min((u64)ADLER_CHUNK, n - start);
        add_chunk(bytes + start, length, n - start - length, sum_a, sum_b);
    }

    sum_a = block_sum(sum_a, scratch);
    sum_b = block_sum(sum_b, scratch);
    if (threadIdx.x == 0) {
        const u32 a = (u32)((1u + sum_a % ADLER_MOD) % ADLER_MOD);
        const u32 b = (u32)((n % ADLER_MOD + sum_b % ADLER_MOD) % ADLER_MOD);
        const u32 adler = (b << 16) | a;
        computed[i] = adler;
        if (adler != job.expected) atomicOr(&status[i], ADLER_MISMATCH);
    }
}
