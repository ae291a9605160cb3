/*
 * flat_decode.c -- the blocks a query selected, decoded into its flat form in one call.
 *
 * Input: TSZ blocks (docs/formats/tsz.md) back to back, block i = data[offs[i], offs[i+1]),
 * belonging to series bser[i]; every series' blocks are adjacent (bser never decreases) and in
 * write order: of two samples with one timestamp, the one in the later block was written
 * later. Output: the engine's FlatSeries -- all samples of all series end to end in ts/v,
 * series s at [soffs[s], soffs[s+1]), each sorted by time with one sample per timestamp (the
 * last write wins), only those in [mint, maxt].
 *
 * Clipping (m3_decode_flat_clip): each block may carry its own bounds [bmin[i], bmax[i]]
 * (either array NULL: no bound on that side); a sample outside them is dropped like one outside [mint, maxt].
 * A query that stitches namespaces of different resolutions (m3shm/query/resolution.py) uses
 * them to take each series' samples from one namespace per time span.
 *
 * Algorithm, per series: decode its blocks one after the other straight into the output,
 * keeping (compacting in place) only samples inside the range, and note whether the result is
 * already strictly increasing (the common case: one in-order stream per block). If it is not
 * (out-of-order streams, blocks from two sources overlapping), sort that series' samples by
 * (timestamp, arrival position) and keep the last of each timestamp.
 *
 * The blocks may come from disk or another node, so they are untrusted: every block is
 * bounds-checked against the caller's sizes before decoding (a block claiming more samples
 * than the output has room for is M3_ENOSPC, never an overrun), a decode error names the
 * block through *bad, and nothing is written past cap. Fuzzed by tests/fuzz/fuzz_flat_decode.c.
 */
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "m3shm.h"

typedef struct fd_sample {
    int64_t ts;
    uint64_t pos;   /* arrival order within the series: later wins */
    double v;
} fd_sample;

static int fd_cmp(const void *a, const void *b)
{
    const fd_sample *x = a, *y = b;
    if (x->ts != y->ts)
        return x->ts < y->ts ? -1 : 1;
    return x->pos < y->pos ? -1 : x->pos > y->pos;
}

/* Sort ts/v[0..n) by (ts, position) and keep the last of equal timestamps; returns the new n,
   or -1 when no memory. */
static int64_t fd_merge(int64_t *ts, double *v, size_t n)
{
    fd_sample *tmp = malloc(n * sizeof *tmp);
    if (!tmp)
        return -1;
    for (size_t i = 0; i < n; i++)
        tmp[i] = (fd_sample){ts[i], i, v[i]};
    qsort(tmp, n, sizeof *tmp, fd_cmp);
    size_t w = 0;
    for (size_t i = 0; i < n; i++) {
        if (i + 1 < n && tmp[i + 1].ts == tmp[i].ts)
            continue;   /* a later write of this timestamp follows */
        ts[w] = tmp[i].ts;
        v[w] = tmp[i].v;
        w++;
    }
    free(tmp);
    return (int64_t)w;
}

int64_t m3_decode_flat(const uint8_t *data, size_t data_len, const uint64_t *offs,
                       const int64_t *bser, size_t nblocks, size_t nseries, int64_t mint,
                       int64_t maxt, int64_t *ts, double *v, size_t cap, int64_t *soffs,
                       size_t *bad)
{
    return m3_decode_flat_clip(data, data_len, offs, bser, NULL, NULL, nblocks, nseries, mint,
                               maxt, ts, v, cap, soffs, bad);
}

int64_t m3_decode_flat_clip(const uint8_t *data, size_t data_len, const uint64_t *offs,
                            const int64_t *bser, const int64_t *bmin, const int64_t *bmax,
                            size_t nblocks, size_t nseries, int64_t mint, int64_t maxt,
                            int64_t *ts, double *v, size_t cap, int64_t *soffs, size_t *bad)
{
    if (!offs || !soffs || !bad || (nblocks && (!data || !bser)) || (cap && (!ts || !v)))
        return M3_EINVAL;
    *bad = 0;
    size_t o = 0;     /* samples written */
    size_t b = 0;     /* next block */
    for (size_t s = 0; s < nseries; s++) {
        soffs[s] = (int64_t)o;
        size_t first = o;
        int sorted = 1;
        for (; b < nblocks && bser[b] == (int64_t)s; b++) {
            uint64_t lo = offs[b], hi = offs[b + 1];
            if (lo > hi || hi > data_len) {
                *bad = b;
                return M3_EINVAL;
            }
            int64_t cnt = tsz_samples(data + lo, hi - lo);
            if (cnt < 0) {
                *bad = b;
                return cnt;
            }
            if ((size_t)cnt > cap - o) {
                *bad = b;
                return M3_ENOSPC;
            }
            int64_t got = tsz_decode(data + lo, hi - lo, ts + o, v + o, (size_t)cnt);
            if (got < 0) {
                *bad = b;
                return got;
            }
            /* keep the samples inside [mint, maxt] and the block's own bounds, noting
               whether order holds */
            int64_t lo_t = bmin && bmin[b] > mint ? bmin[b] : mint;
            int64_t hi_t = bmax && bmax[b] < maxt ? bmax[b] : maxt;
            size_t w = o;
            for (size_t i = o; i < o + (size_t)got; i++) {
                int64_t t = ts[i];
                if (t < lo_t || t > hi_t)
                    continue;
                if (w > first && ts[w - 1] >= t)
                    sorted = 0;
                ts[w] = t;
                v[w] = v[i];
                w++;
            }
            o = w;
        }
        if (b < nblocks && bser[b] < (int64_t)s) {
            *bad = b;   /* series numbers went down: blocks of a series are not adjacent */
            return M3_EINVAL;
        }
        if (!sorted) {
            int64_t n = fd_merge(ts + first, v + first, o - first);
            if (n < 0)
                return M3_ENOSPC;
            o = first + (size_t)n;
        }
    }
    soffs[nseries] = (int64_t)o;
    if (b < nblocks) {
        *bad = b;   /* a series number beyond nseries, or out of order */
        return M3_EINVAL;
    }
    return (int64_t)o;
}
