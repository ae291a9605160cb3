/*
 * rw_decode.c -- Prometheus remote write 1.0 (prometheus.WriteRequest) decoded straight into
 * lane records and metadata rows.
 *
 * Input: a snappy-decompressed `prometheus.WriteRequest` (proto/remote.proto, proto/types.proto;
 * docs/formats/remote-write.md). Output: a batch of m3_rec records (csrc/m3shm.h,
 * docs/formats/shm.md), the same bytes that go to the commit log and then into the lanes, and
 * the request's new metadata entries (m3_rw_meta, offsets into the input). No allocation, no
 * Python object per series or sample: a pre-pass over the top level counts the series (the
 * limits.max_series_per_request check), then one pass decodes, protobuf fields read in place.
 *
 * Per TimeSeries (field 1): pass 1 collects the labels (Label: name = 1, value = 2) as
 * (pointer, length) pairs into the input and checks the structure of everything else (samples
 * = 2, exemplars = 3, histograms = 4); rw_series.c then validates and canonicalises the labels
 * and writes the samples. A series with native histograms is rejected (value type 2 is
 * reserved for them); a series' exemplars are rejected while its samples are written.
 * Metadata (field 3: MetricMetadata type = 1, metric_family_name = 2, help = 4, unit = 5) is
 * validated and offered to rw_meta_offer (which skips what the caller already stored).
 *
 * Error model: malformed protobuf (bad varint, a length past the end, wire types 3/4/6/7, a
 * known field with the wrong wire type) fails the whole request with M3_ECORRUPT / M3_ETRUNC
 * and a message naming the byte offset. An invalid series is skipped and counted; the first
 * rejection is named in res->msg. Unknown fields are skipped, as protobuf requires.
 *
 * Invariants: every read is bounds-checked against the end of the enclosing message; output is
 * written only after checking room (M3_ENOSPC otherwise, and the caller retries bigger).
 */
#include <stdint.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "rw_int.h"

/* One TimeSeries message in [b, e). Returns 0, or -1 with top->err set for malformed input. */
static int timeseries(rw_ctx *c, rd *top, const uint8_t *b, const uint8_t *e, uint32_t idx)
{
    lref labels[RW_MAX_LABELS_HARD + 1];
    uint32_t nl = 0;
    uint32_t max_labels = c->lim->max_labels < RW_MAX_LABELS_HARD ? c->lim->max_labels
                                                                   : RW_MAX_LABELS_HARD;
    uint64_t nsamples = 0, nhist = 0, nex = 0;
    rd r = {b, e, 0, NULL};
    while (r.p < r.end) {
        uint32_t f = 0, wt = 0;
        if (rd_tag(&r, &f, &wt))
            break;
        if (f >= 1 && f <= 4) {
            if (wt != 2) {
                rd_wrong_type(&r);
                break;
            }
            const uint8_t *mb, *me;
            if (rd_len(&r, &mb, &me))
                break;
            rd m = {mb, me, 0, NULL};
            if (f == 1) {
                lref l = {(const uint8_t *)"", 0, (const uint8_t *)"", 0};
                while (m.p < m.end) {
                    uint32_t f2, wt2;
                    if (rd_tag(&m, &f2, &wt2))
                        break;
                    if (f2 == 1 || f2 == 2) {
                        const uint8_t *sb, *se;
                        if (wt2 != 2) {
                            rd_wrong_type(&m);
                            break;
                        }
                        if (rd_len(&m, &sb, &se))
                            break;
                        if (f2 == 1)
                            l.name = sb, l.nlen = (uint32_t)(se - sb);
                        else
                            l.val = sb, l.vlen = (uint32_t)(se - sb);
                    } else {
                        rd_skip(&m, wt2);
                    }
                    if (m.err)
                        break;
                }
                /* an empty value means an absent label; an empty name is reported later */
                if ((l.vlen || !l.nlen) && nl <= max_labels)
                    labels[nl++] = l;
            } else if (f == 2) {
                rw_check_sample(&m);
                nsamples++;
            } else {
                if (f == 3) /* exemplars and histograms are counted, not read */
                    nex++;
                else
                    nhist++;
            }
            if (m.err) {
                rd_adopt(&r, &m);
                break;
            }
        } else {
            rd_skip(&r, wt);
        }
        if (r.err)
            break;
    }
    if (r.err) {
        rd_adopt(top, &r);
        return -1;
    }
    m3_rw_result *res = c->res;
    if (nhist) {
        res->series_bad++;
        res->samples_bad += nsamples;
        res->histograms_bad += nhist;
        res->exemplars_bad += nex;
        rw_reject(c, idx, M3_RW_HISTOGRAM, labels, nl < max_labels ? nl : max_labels,
                  "native histograms are not supported yet");
        return 0;
    }
    if (!nsamples && !nex)
        return 0;
    rw_series s;
    if (rw_series_prepare(c, idx, labels, nl, nsamples, &s)) {
        res->exemplars_bad += nex;
        return 0;
    }
    if (nsamples)
        rw_series_samples(c, idx, &s, labels, nl, b, e, 2);
    if (nex) {
        res->exemplars_bad += nex;
        rw_reject(c, idx, M3_RW_EXEMPLARS, labels, nl,
                  "%llu exemplars not stored (exemplars are not supported yet; the series' "
                  "samples were written)", (unsigned long long)nex);
    }
    return 0;
}

/* One MetricMetadata message in [b, e). */
static int metadata(rw_ctx *c, rd *top, const uint8_t *b, const uint8_t *e, uint32_t idx)
{
    rd m = {b, e, 0, NULL};
    uint64_t type = 0;
    const uint8_t *name = b, *help = b, *unit = b;
    uint32_t nlen = 0, hlen = 0, ulen = 0;
    while (m.p < m.end) {
        uint32_t f, wt;
        if (rd_tag(&m, &f, &wt))
            break;
        if (f == 1) {
            if (wt != 0) {
                rd_wrong_type(&m);
                break;
            }
            type = rd_varint(&m);
        } else if (f == 2 || f == 4 || f == 5) {
            const uint8_t *sb, *se;
            if (wt != 2) {
                rd_wrong_type(&m);
                break;
            }
            if (rd_len(&m, &sb, &se))
                break;
            uint32_t n = (uint32_t)(se - sb);
            if (f == 2)
                name = sb, nlen = n;
            else if (f == 4)
                help = sb, hlen = n;
            else
                unit = sb, ulen = n;
        } else {
            rd_skip(&m, wt);
        }
        if (m.err)
            break;
    }
    if (m.err) {
        rd_adopt(top, &m);
        return -1;
    }
    if (rw_meta_check(c, "metadata #", idx, name, nlen, type, help, hlen, unit, ulen) == 0)
        rw_meta_offer(c, name, nlen, (uint32_t)type, help, hlen, unit, ulen);
    return 0;
}

int m3_rw1_decode(const uint8_t *in, size_t len, const m3_rw_limits *lim, m3_rw_out *out,
                  m3_rw_result *res)
{
    rw_ctx c;
    int rc = rw_ctx_init(&c, in, len, lim, out, res);
    if (rc)
        return rc;
    /* pre-pass: the top-level structure and the series count */
    rd r = {in, in + len, 0, NULL};
    uint64_t nseries = 0;
    while (r.p < r.end && !r.err) {
        uint32_t f, wt;
        if (rd_tag(&r, &f, &wt))
            break;
        if ((f == 1 || f == 3) && wt != 2)
            rd_wrong_type(&r);
        else
            rd_skip(&r, wt);
        nseries += f == 1;
    }
    res->nseries = nseries;
    if (r.err)
        return rw_ctx_finish(&c, &r, (uint32_t)nseries);
    if (nseries > lim->max_series) {
        res->series_bad = nseries;
        rw_reject(&c, 0, M3_RW_TOO_MANY_SERIES, NULL, 0,
                  "request has %llu series, more than limits.max_series_per_request=%llu; "
                  "nothing was written (send smaller requests)", (unsigned long long)nseries,
                  (unsigned long long)lim->max_series);
        return rw_ctx_finish(&c, &r, 0);
    }
    uint32_t idx = 0, midx = 0;
    r.p = in;
    while (r.p < r.end && !r.err) {
        uint32_t f, wt;
        if (rd_tag(&r, &f, &wt))
            break;
        if (f == 1 || f == 3) {
            const uint8_t *b, *e;
            if (rd_len(&r, &b, &e))
                break;
            if (f == 1) {
                if (timeseries(&c, &r, b, e, idx))
                    break;
                idx++;
            } else if (metadata(&c, &r, b, e, midx++)) {
                break;
            }
        } else {
            rd_skip(&r, wt);
        }
    }
    return rw_ctx_finish(&c, &r, idx);
}
