/* Which inflate library for the native decode core: libdeflate, zlib or ISA-L, each inflating one vignette's raw
 * deflate stream and computing its Adler-32 (what kernels/cpu_decode.cpp does), minimum thread CPU time of 30.
 *
 *   .venv/bin/python -c "from iws_engine.loaders.png import parse_png; import sys; i = parse_png(open(sys.argv[1], 'rb').read()); \
 *       open('idat.bin', 'wb').write(bytes(i.deflate)); print(i.raw_size)" VIGNETTE.png      # prints RAW_SIZE
 *   gcc -O2 bench/inflate_libraries.c -o /tmp/inflate_libraries -lz -ldeflate -lisal   # libdeflate-dev, libisal-dev
 *   /tmp/inflate_libraries idat.bin RAW_SIZE
 *
 * Measured 2026-12-05 on the 2-core AMD EPYC CI machine (busy), one RGBA16 539x528 synthetic vignette (1.92 MB of
 * deflate -> 2.28 MB): libdeflate 4.78 ms, zlib 7.67 ms, ISA-L 5.15 ms; the core uses libdeflate. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zlib.h>
#include <libdeflate.h>
#include <isa-l/igzip_lib.h>
static double now(void) { struct timespec ts; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts); return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6; }
int main(int argc, char** argv) {
    if (argc != 3) { fprintf(stderr, "usage: %s DEFLATE_FILE RAW_SIZE\n", argv[0]); return 2; }
    size_t need = strtoul(argv[2], 0, 10);
    FILE* f = fopen(argv[1], "rb");
    if (!f) { perror(argv[1]); return 1; } fseek(f, 0, SEEK_END); size_t n = ftell(f); fseek(f, 0, SEEK_SET);
    unsigned char* in = malloc(n); fread(in, 1, n, f); unsigned char* out = malloc(need);
    struct libdeflate_decompressor* d = libdeflate_alloc_decompressor();
    double best[3] = {1e9, 1e9, 1e9};
    unsigned long sums[3];
    for (int rep = 0; rep < 30; ++rep) {
        double t0 = now(); size_t got = 0;
        libdeflate_deflate_decompress(d, in, n, out, need, &got); sums[0] = libdeflate_adler32(1, out, need);
        double t1 = now();
        z_stream z; memset(&z, 0, sizeof z); inflateInit2(&z, -15); z.next_in = in; z.avail_in = n; z.next_out = out; z.avail_out = need;
        inflate(&z, Z_FINISH); inflateEnd(&z); sums[1] = adler32(1, out, need);
        double t2 = now();
        struct inflate_state s; isal_inflate_init(&s); s.next_in = in; s.avail_in = n; s.next_out = out; s.avail_out = need; s.crc_flag = ISAL_DEFLATE;
        isal_inflate(&s); sums[2] = isal_adler32(1, out, need);
        double t3 = now();
        const double t[3] = {t1 - t0, t2 - t1, t3 - t2};
        for (int k = 0; k < 3; ++k)
            if (t[k] < best[k]) best[k] = t[k];
    }
    printf("inflate+adler32 of %zu -> %zu bytes (min of 30, thread CPU ms): libdeflate %.2f, zlib %.2f, isa-l %.2f (adlers equal: %d)\n", n, need, best[0], best[1], best[2], sums[0] == sums[1] && sums[1] == sums[2]);
}
