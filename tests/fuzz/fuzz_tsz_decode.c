/*
 * libFuzzer target for the block decoder (csrc/codec.c): arbitrary bytes go in; the decoder
 * must return samples or an error code, never crash or read out of bounds (ASan+UBSan watch).
 * When a block decodes, its samples are re-encoded and decoded again and must round-trip bit
 * for bit, and the encoder must be able to resume after them (tsz_enc_resume) and append.
 * Inputs are capped at 64 KiB (-max_len in tests/fuzz/run.sh).
 *
 * fuzz-sources: csrc/codec.c
 */
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "m3shm.h"

#define CAP 8192

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int64_t ts[CAP], ts2[CAP];
    static double v[CAP], v2[CAP];
    size_t n = 0;
    uint64_t err_bit = 0;
    int64_t got;

    /* an exact-size heap copy, so ASan sees every read past the input */
    uint8_t *in = malloc(size ? size : 1);
    memcpy(in, data, size);
    got = tsz_decode(in, size, ts, v, CAP);
    if (got > CAP)
        abort();
    if (got < 0) {
        /* the diagnostics must agree that it fails, and stay in bounds */
        if (tsz_decode_diag(in, size, &n, &err_bit) == M3_OK)
            abort();
        if (err_bit > (uint64_t)size * 8)
            abort();
    } else {
        n = (size_t)got;
        /* the batch decoder agrees with the single-block one */
        uint64_t offs[2] = {0, size}, sums[2];
        size_t bad;
        if (n < CAP) {
            if (tsz_count_many(in, offs, 1, sums, &bad) != M3_OK || sums[1] != n)
                abort();
            if (tsz_decode_many(in, offs, 1, sums, ts2, v2, &bad) != M3_OK)
                abort();
            if (memcmp(ts, ts2, n * sizeof ts[0]) || memcmp(v, v2, n * sizeof v[0]))
                abort();
        }
        size_t cap = tsz_bound(n), used = 0;
        uint8_t *out = malloc(cap);
        if (tsz_encode(ts, v, n, out, cap, &used) != M3_OK)
            abort(); /* decoded timestamps are increasing, so they must encode */
        got = tsz_decode(out, used, ts2, v2, CAP);
        if (got < 0 || (size_t)got != n)
            abort();
        if (memcmp(ts, ts2, n * sizeof ts[0]) || memcmp(v, v2, n * sizeof v[0]))
            abort();
        free(out);

        /* resume the input block with a blank state and append one more sample */
        size_t rcap = size + 64;
        uint8_t *buf = aligned_alloc(8, (rcap + 7) & ~(size_t)7);
        memcpy(buf, in, size);
        memset(buf + size, 0xA5, rcap - size); /* garbage past the input */
        tsz_enc e;
        memset(&e, 0, sizeof e);
        /* (only when every published sample was decoded, i.e. n < CAP) */
        if (n < CAP && tsz_enc_resume(&e, buf, rcap) == M3_OK &&
            !(n && ts[n - 1] == INT64_MAX)) { /* nothing can follow INT64_MAX */
            int64_t next = n ? ts[n - 1] + 1 : 0;
            if (tsz_enc_append(&e, buf, rcap, next, 1.5) == M3_OK) {
                got = tsz_decode(buf, rcap, ts2, v2, CAP);
                if (got < 0 || (size_t)got != n + 1)
                    abort();
                if (memcmp(ts, ts2, n * sizeof ts[0]) || memcmp(v, v2, n * sizeof v[0]))
                    abort();
                if (ts2[n] != next || v2[n] != 1.5)
                    abort();
            }
        }
        free(buf);
    }
    free(in);
    return 0;
}
