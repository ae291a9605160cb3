/*
 * rec_build.c -- lane records from rows: how m3shm writes samples it computed itself
 * (finalised aggregation windows, rollup forwarding) into a namespace's pipeline.
 *
 * Input:
 *   - a label-blob table: `nseries` canonical label sets back to back in `labels`, set i at
 *     labels[offs[i], offs[i+1]) (so `offs` has nseries + 1 entries, non-decreasing). Each set
 *     is in canonical form (docs/formats/shm.md "Record"): repeated { u16 name_len, name,
 *     u16 value_len, value }, sorted by name bytes, no duplicate names, no empty name or value,
 *     1 .. 65535 bytes in all;
 *   - `nrows` rows (series[i], ts[i], v[i]): series[i] < nseries indexes the table.
 *
 * Output: records exactly as the remote-write decoders make them (rw_series.c): type `type`
 * (M3_REC_SAMPLES, or a later record type with the same body), vtype float64, hash =
 * m3_labels_hash(labels), shard = hash mod num_shards, tenant 0, seq 0 (stamped when the
 * batch is reserved in lanes), samples in row order. A run of consecutive rows of one series
 * becomes one record, split every M3_REC_MAX_SAMPLES samples; rows of a series that are not
 * consecutive make several records (harmless: the owner merges them).
 *
 * Sizing: the whole output is computed first. If it does not fit in `cap`, nothing is written,
 * *used receives the bytes needed and the call returns M3_ENOSPC (one retry is enough).
 * Errors: M3_EINVAL for a NULL pointer, num_shards 0, a record type that is not a data record
 * (M3_REC_PAD), a series index out of range, a label set that is not canonical, or offsets
 * that decrease or run past `labels_len`. Nothing is written on an error.
 *
 * Invariants: every byte of every record (padding included) is written, so a batch built here
 * is byte-identical for identical input; nothing is read outside the ranges given.
 */
#include <stdint.h>
#include <stddef.h>
#include <string.h>

#include "m3shm.h"

static uint64_t round8(uint64_t n)
{
    return (n + 7) & ~(uint64_t)7;
}

/* Check one canonical label set; *nlabels receives its label count. */
static int check_labels(const uint8_t *p, uint64_t n, uint32_t *nlabels)
{
    if (n == 0 || n > 65535)
        return M3_EINVAL;
    uint64_t i = 0;
    uint32_t count = 0;
    const uint8_t *prev = NULL;
    uint32_t prev_len = 0;
    while (i < n) {
        if (n - i < 2)
            return M3_EINVAL;
        uint32_t nl = (uint32_t)p[i] | (uint32_t)p[i + 1] << 8;
        if (nl == 0 || n - i - 2 < nl)
            return M3_EINVAL;
        const uint8_t *name = p + i + 2;
        i += 2 + nl;
        if (n - i < 2)
            return M3_EINVAL;
        uint32_t vl = (uint32_t)p[i] | (uint32_t)p[i + 1] << 8;
        if (vl == 0 || n - i - 2 < vl)
            return M3_EINVAL;
        i += 2 + vl;
        if (prev) { /* strictly increasing names: sorted, no duplicates */
            uint32_t m = prev_len < nl ? prev_len : nl;
            int c = memcmp(prev, name, m);
            if (c > 0 || (c == 0 && prev_len >= nl))
                return M3_EINVAL;
        }
        prev = name, prev_len = nl;
        count++;
    }
    *nlabels = count;
    return M3_OK;
}

int m3_rec_build(uint16_t type, uint32_t num_shards, const uint8_t *labels, uint64_t labels_len,
                 const uint64_t *offs, uint32_t nseries, const uint32_t *series,
                 const int64_t *ts, const double *v, size_t nrows, uint8_t *out, size_t cap,
                 size_t *used, uint32_t *nrecords)
{
    if (!used || !nrecords || num_shards == 0 || type == M3_REC_PAD || type == 0 ||
        (nrows && (!series || !ts || !v)) || (nseries && (!labels || !offs)))
        return M3_EINVAL;
    *used = 0;
    *nrecords = 0;
    /* pass 1: validate and size */
    uint64_t need = 0, nrec = 0;
    for (size_t i = 0; i < nrows;) {
        uint32_t s = series[i];
        if (s >= nseries || offs[s] > offs[s + 1] || offs[s + 1] > labels_len)
            return M3_EINVAL;
        uint32_t nl;
        if (check_labels(labels + offs[s], offs[s + 1] - offs[s], &nl))
            return M3_EINVAL;
        size_t j = i + 1;
        while (j < nrows && series[j] == s)
            j++;
        uint64_t run = j - i;
        uint64_t parts = (run + M3_REC_MAX_SAMPLES - 1) / M3_REC_MAX_SAMPLES;
        need += parts * (sizeof(m3_rec) + round8(offs[s + 1] - offs[s])) + run * 16;
        nrec += parts;
        i = j;
    }
    if (need > cap || !out) {
        *used = (size_t)need;
        return need ? M3_ENOSPC : M3_OK;
    }
    /* pass 2: write (everything was checked above) */
    uint8_t *q = out;
    for (size_t i = 0; i < nrows;) {
        uint32_t s = series[i];
        const uint8_t *lab = labels + offs[s];
        uint32_t clen = (uint32_t)(offs[s + 1] - offs[s]);
        uint32_t nl = 0;
        check_labels(lab, clen, &nl);
        uint64_t h = m3_labels_hash(lab, clen);
        size_t j = i + 1;
        while (j < nrows && series[j] == s)
            j++;
        for (size_t k = i; k < j; k += M3_REC_MAX_SAMPLES) {
            uint32_t n = (uint32_t)(j - k < M3_REC_MAX_SAMPLES ? j - k : M3_REC_MAX_SAMPLES);
            m3_rec *r = (m3_rec *)q;
            memset(r, 0, sizeof *r);
            r->len = (uint32_t)(sizeof(m3_rec) + round8(clen) + (uint64_t)n * 16);
            r->type = type;
            r->vtype = M3_VT_FLOAT;
            r->shard = (uint32_t)(h % num_shards);
            r->hash = h;
            r->nsamples = n;
            r->labels_len = clen;
            r->nlabels = nl;
            uint8_t *b = (uint8_t *)(r + 1);
            memcpy(b, lab, clen);
            memset(b + clen, 0, round8(clen) - clen);
            b += round8(clen);
            memcpy(b, ts + k, (size_t)n * 8);
            memcpy(b + (size_t)n * 8, v + k, (size_t)n * 8);
            q += r->len;
        }
        i = j;
    }
    *used = (size_t)need;
    *nrecords = (uint32_t)nrec;
    return M3_OK;
}
