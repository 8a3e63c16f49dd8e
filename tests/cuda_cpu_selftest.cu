// Kernels that test kernels/cuda_cpu_emulation.h itself (tests/test_kernels_cpu.py): what the real kernels rely on
// (per-block __shared__ storage, __syncthreads, warp shuffles, atomics, 3-D indices) gives CUDA's results, and
// what is wrong in a kernel (a divergent barrier, a shared-memory race, an out-of-bounds read) is reported.

typedef unsigned int u32;

// Each block sums its threads' inputs through shared memory (a tree reduction: a barrier per level).
extern "C" __global__ void block_sum(const u32* in, u32* out) {
    __shared__ u32 partial[512];
    const u32 t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const u32 n = blockDim.x * blockDim.y * blockDim.z;
    const u32 block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    partial[t] = in[block * n + t];
    __syncthreads();
    for (u32 s = n / 2; s > 0; s >>= 1) {
        if (t < s) partial[t] += partial[t + s];
        __syncthreads();
    }
    if (t == 0) out[block] = partial[0];
}

extern "C" __global__ void warp_shuffles(const int* in, int* out) {
    const u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    const int v = in[i];
    out[4 * i + 0] = __shfl_down_sync(0xffffffffu, v, 1);
    out[4 * i + 1] = __shfl_up_sync(0xffffffffu, v, 2);
    out[4 * i + 2] = __shfl_xor_sync(0xffffffffu, v, 5);
    out[4 * i + 3] = __shfl_sync(0xffffffffu, v, 3);
}

extern "C" __global__ void atomic_histogram(const u32* in, u32 n, u32* bins) {
    const u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) atomicAdd(&bins[in[i] % 16u], 1u);
}

extern "C" __global__ void divergent_barrier(u32* out) {
    if (threadIdx.x == 3) return;  // thread 3 never reaches the barrier the others wait at
    __syncthreads();
    out[threadIdx.x] = 1;
}

extern "C" __global__ void racy_neighbour(u32* out) {
    __shared__ u32 slots[64];
    slots[threadIdx.x] = threadIdx.x;
    out[threadIdx.x] = slots[(threadIdx.x + 1) % blockDim.x];  // no __syncthreads() between write and read
}

extern "C" __global__ void read_past(const u32* in, u32* out, u32 n) {
    out[threadIdx.x] = in[threadIdx.x + n];
}
