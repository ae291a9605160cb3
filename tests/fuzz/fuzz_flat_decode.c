/*
 * libFuzzer target for the query's flat decoder (csrc/flat_decode.c): blocks that may come
 * from disk or a remote node, with arbitrary offsets, series numbers, range and output size.
 * It must return samples or an error code, never crash or write past its output (ASan+UBSan
 * watch); on success every series must be sorted with one sample per timestamp, inside the
 * range, and the series offsets must add up. Inputs are capped at 64 KiB.
 *
 * Input: nblocks <u8 % 17>, cap <u16>, mint <i16>, span <u16>, then per block
 * series <u8 % 8> len <u16> clip_lo <i16> clip_span <u16>; the rest is block data (lengths
 * clipped to what remains, or taken as is when the first flag bit says so, to exercise bad
 * offsets). Flag bit 4 decodes with the per-block bounds (m3_decode_flat_clip).
 *
 * fuzz-sources: csrc/flat_decode.c csrc/codec.c
 */
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "m3shm.h"

#define MAXB 16
#define NSER 8

static uint32_t rd(const uint8_t **p, size_t *n, int bytes)
{
    uint32_t x = 0;
    for (int i = 0; i < bytes; i++) {
        x |= (uint32_t)(*n ? **p : 0) << (8 * i);
        if (*n) {
            (*p)++;
            (*n)--;
        }
    }
    return x;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const uint8_t *p = data;
    size_t n = size;
    uint32_t flags = rd(&p, &n, 1);
    size_t nb = rd(&p, &n, 1) % (MAXB + 1);
    size_t cap = rd(&p, &n, 2);
    int64_t mint = (int16_t)rd(&p, &n, 2);
    int64_t maxt = mint + (int64_t)rd(&p, &n, 2);
    int64_t bser[MAXB];
    uint64_t offs[MAXB + 1];
    uint32_t lens[MAXB];
    int64_t bmin[MAXB], bmax[MAXB];
    for (size_t b = 0; b < nb; b++) {
        bser[b] = rd(&p, &n, 1) % NSER;
        lens[b] = rd(&p, &n, 2);
        bmin[b] = (int16_t)rd(&p, &n, 2);
        bmax[b] = bmin[b] + (int64_t)rd(&p, &n, 2);
    }
    uint8_t *buf = malloc(n ? n : 1);   /* exact size: ASan sees reads past it */
    memcpy(buf, p, n);
    offs[0] = 0;
    for (size_t b = 0; b < nb; b++) {
        uint64_t l = lens[b];
        if (!(flags & 1) && offs[b] + l > n)
            l = n - offs[b];
        offs[b + 1] = offs[b] + l;
    }
    if (!(flags & 2)) {   /* mostly well-formed series numbers: sort them */
        for (size_t a = 1; a < nb; a++)
            for (size_t b = a; b > 0 && bser[b] < bser[b - 1]; b--) {
                int64_t t = bser[b];
                bser[b] = bser[b - 1];
                bser[b - 1] = t;
            }
    }
    int64_t *ts = malloc((cap ? cap : 1) * sizeof *ts);
    double *v = malloc((cap ? cap : 1) * sizeof *v);
    int64_t soffs[NSER + 1];
    size_t bad = 0;
    int clip = (flags & 4) != 0;
    int64_t got = clip ? m3_decode_flat_clip(buf, n, offs, bser, bmin, bmax, nb, NSER, mint,
                                             maxt, ts, v, cap, soffs, &bad)
                       : m3_decode_flat(buf, n, offs, bser, nb, NSER, mint, maxt, ts, v, cap,
                                        soffs, &bad);
    if (got >= 0) {
        if ((size_t)got > cap || soffs[0] != 0 || soffs[NSER] != got)
            abort();
        for (int s = 0; s < NSER; s++) {
            if (soffs[s] > soffs[s + 1])
                abort();
            for (int64_t i = soffs[s]; i < soffs[s + 1]; i++) {
                if (ts[i] < mint || ts[i] > maxt)
                    abort();
                if (i > soffs[s] && ts[i - 1] >= ts[i])
                    abort();
            }
        }
    } else if (nb && bad >= nb) {
        abort();
    }
    free(ts);
    free(v);
    free(buf);
    return 0;
}
