/*
 * rw2_decode.c -- Prometheus remote write 2.0 (io.prometheus.write.v2.Request) decoded straight
 * into lane records and metadata rows: a second front end to what rw_series.c does for 1.0.
 *
 * Input: a snappy-decompressed Request (proto/write_v2.proto; docs/formats/remote-write.md):
 *   Request    { repeated string symbols = 4; repeated TimeSeries timeseries = 5; }
 *   TimeSeries { repeated uint32 labels_refs = 1; repeated Sample samples = 2;
 *                repeated Histogram histograms = 3; repeated Exemplar exemplars = 4;
 *                Metadata metadata = 5; int64 created_timestamp = 6; }
 *   Metadata   { MetricType type = 1; uint32 help_ref = 3; uint32 unit_ref = 4; }
 * Strings are interned: labels_refs holds (name, value) pairs of indices into symbols.
 *
 * Algorithm: a pre-pass over the top level records every symbol's (offset, length) in the
 * caller's scratch (out->symbols; M3_ENOSPC with res->nsymbols when it is too small: symbols
 * may come after the series on the wire, so they must all be known first) and counts the series
 * (limits.max_series_per_request). Then each TimeSeries: pass 1 resolves labels_refs (packed
 * or not, as protobuf allows) into (pointer, length) pairs, checks the structure of samples,
 * histograms, exemplars and metadata; then rw_series.c validates, canonicalises and writes the
 * samples exactly as for 1.0, so a series written by either version is the same series.
 * Metadata is keyed by the series' __name__ and offered to rw_meta_offer; all-default metadata
 * (type 0, empty help and unit) counts as absent. created_timestamp is ignored.
 *
 * Error model: as rw_decode.c. In addition a reference past the symbol table or an odd number
 * of labels_refs rejects the series (M3_RW_BAD_REF); a series with histograms is rejected; a
 * series' exemplars are rejected while its samples are written.
 *
 * Invariants: every read is bounds-checked; references are checked against nsymbols before
 * use; output is written only after checking room.
 */
#include <stdint.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "rw_int.h"

typedef struct syms {
    const uint8_t *in;
    const uint64_t *tab; /* offset, length per symbol */
    uint64_t n;
} syms;

static inline const uint8_t *sym(const syms *s, uint64_t ref, uint32_t *len)
{
    *len = (uint32_t)s->tab[2 * ref + 1];
    return s->in + s->tab[2 * ref];
}

/* One TimeSeries message in [b, e). Returns 0, or -1 with top->err set for malformed input. */
static int timeseries(rw_ctx *c, const syms *sy, rd *top, const uint8_t *b, const uint8_t *e,
                      uint32_t idx)
{
    lref labels[RW_MAX_LABELS_HARD + 1];
    uint32_t nl = 0;
    uint32_t max_labels = c->lim->max_labels < RW_MAX_LABELS_HARD ? c->lim->max_labels
                                                                   : RW_MAX_LABELS_HARD;
    uint64_t nsamples = 0, nhist = 0, nex = 0, nrefs = 0, bad_ref = UINT64_MAX;
    uint64_t pending = 0; /* the name ref of a pair whose value ref has not come yet */
    int has_meta = 0;
    uint64_t mtype = 0, help_ref = 0, unit_ref = 0;
    rd r = {b, e, 0, NULL};
    while (r.p < r.end) {
        uint32_t f = 0, wt = 0;
        if (rd_tag(&r, &f, &wt))
            break;
        if (f == 1 && (wt == 0 || wt == 2)) {
            rd m = r; /* wt 0: one varint here; wt 2: a packed run of them (maybe empty) */
            if (wt == 2) {
                const uint8_t *pb, *pe;
                if (rd_len(&r, &pb, &pe))
                    break;
                m.p = pb, m.end = pe;
            }
            for (int one = wt == 0; one || (wt == 2 && m.p < m.end); one = 0) {
                uint64_t ref = rd_varint(&m);
                if (m.err)
                    break;
                if (ref >= sy->n && bad_ref == UINT64_MAX)
                    bad_ref = ref;
                if (nrefs++ & 1) {
                    if (bad_ref == UINT64_MAX) {
                        lref l;
                        l.name = sym(sy, pending, &l.nlen);
                        l.val = sym(sy, ref, &l.vlen);
                        /* an empty value means an absent label; an empty name is reported */
                        if ((l.vlen || !l.nlen) && nl <= max_labels)
                            labels[nl++] = l;
                    }
                } else {
                    pending = ref;
                }
            }
            if (m.err) {
                rd_adopt(&r, &m);
                break;
            }
            if (wt == 0)
                r.p = m.p;
        } else if (f >= 2 && f <= 5) {
            if (wt != 2) {
                rd_wrong_type(&r);
                break;
            }
            const uint8_t *mb, *me;
            if (rd_len(&r, &mb, &me))
                break;
            rd m = {mb, me, 0, NULL};
            if (f == 2) {
                rw_check_sample(&m);
                nsamples++;
            } else if (f == 3) {
                nhist++;
            } else if (f == 4) {
                nex++;
            } else {
                has_meta = 1;
                while (m.p < m.end && !m.err) {
                    uint32_t f2, wt2;
                    if (rd_tag(&m, &f2, &wt2))
                        break;
                    if (f2 == 1 || f2 == 3 || f2 == 4) {
                        if (wt2 != 0) {
                            rd_wrong_type(&m);
                            break;
                        }
                        uint64_t v = rd_varint(&m);
                        if (f2 == 1)
                            mtype = v;
                        else if (f2 == 3)
                            help_ref = v;
                        else
                            unit_ref = v;
                    } else {
                        rd_skip(&m, wt2);
                    }
                }
            }
            if (m.err) {
                rd_adopt(&r, &m);
                break;
            }
        } else if (f == 1 || (f == 6 && wt != 0)) {
            rd_wrong_type(&r);
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
    uint32_t shown = nl < max_labels ? nl : max_labels;
    if (has_meta && bad_ref == UINT64_MAX) {
        if (help_ref >= sy->n)
            bad_ref = help_ref;
        else if (unit_ref >= sy->n)
            bad_ref = unit_ref;
    }
    if (bad_ref != UINT64_MAX || (nrefs & 1)) {
        res->series_bad++;
        res->samples_bad += nsamples;
        res->histograms_bad += nhist;
        res->exemplars_bad += nex;
        if (bad_ref != UINT64_MAX)
            rw_reject(c, idx, M3_RW_BAD_REF, labels, shown,
                      "symbol reference %llu is out of range (the request has %llu symbols)",
                      (unsigned long long)bad_ref, (unsigned long long)sy->n);
        else
            rw_reject(c, idx, M3_RW_BAD_REF, labels, shown,
                      "labels_refs has an odd number (%llu) of references",
                      (unsigned long long)nrefs);
        return 0;
    }
    if (nhist) {
        res->series_bad++;
        res->samples_bad += nsamples;
        res->histograms_bad += nhist;
        res->exemplars_bad += nex;
        rw_reject(c, idx, M3_RW_HISTOGRAM, labels, shown,
                  "native histograms are not supported yet");
        return 0;
    }
    uint32_t hlen = 0, ulen = 0;
    const uint8_t *help = has_meta ? sym(sy, help_ref, &hlen) : NULL;
    const uint8_t *unit = has_meta ? sym(sy, unit_ref, &ulen) : NULL;
    has_meta = has_meta && (mtype || hlen || ulen);
    if (!nsamples && !nex && !has_meta)
        return 0;
    rw_series s;
    if (rw_series_prepare(c, idx, labels, nl, nsamples, &s)) {
        res->exemplars_bad += nex;
        return 0;
    }
    if (nsamples)
        rw_series_samples(c, idx, &s, labels, nl, b, e, 2);
    if (has_meta) {
        const lref *name = NULL;
        for (uint32_t i = 0; i < nl && !name; i++)
            if (labels[i].nlen == 8 && memcmp(labels[i].name, "__name__", 8) == 0)
                name = &labels[i];
        M3_ASSERT(name); /* rw_series_prepare requires __name__ */
        if (rw_meta_check(c, "metadata of series #", idx, name->val, name->vlen, mtype, help,
                          hlen, unit, ulen) == 0)
            rw_meta_offer(c, name->val, name->vlen, (uint32_t)mtype, help, hlen, unit, ulen);
    }
    if (nex) {
        res->exemplars_bad += nex;
        rw_reject(c, idx, M3_RW_EXEMPLARS, labels, nl,
                  "%llu exemplars not stored (exemplars are not supported yet; the series' "
                  "samples were written)", (unsigned long long)nex);
    }
    return 0;
}

int m3_rw2_decode(const uint8_t *in, size_t len, const m3_rw_limits *lim, m3_rw_out *out,
                  m3_rw_result *res)
{
    rw_ctx c;
    int rc = rw_ctx_init(&c, in, len, lim, out, res);
    if (rc)
        return rc;
    /* pre-pass: the symbol table, the top-level structure and the series count */
    rd r = {in, in + len, 0, NULL};
    uint64_t nseries = 0, nsym = 0;
    while (r.p < r.end && !r.err) {
        uint32_t f, wt;
        if (rd_tag(&r, &f, &wt))
            break;
        if ((f == 4 || f == 5) && wt != 2) {
            rd_wrong_type(&r);
        } else if (f == 4) {
            const uint8_t *sb, *se;
            if (rd_len(&r, &sb, &se))
                break;
            if (nsym < out->symbols_cap) {
                out->symbols[2 * nsym] = (uint64_t)(sb - in);
                out->symbols[2 * nsym + 1] = (uint64_t)(se - sb);
            }
            nsym++;
        } else {
            rd_skip(&r, wt);
            nseries += f == 5;
        }
    }
    res->nseries = nseries;
    res->nsymbols = nsym;
    if (r.err)
        return rw_ctx_finish(&c, &r, (uint32_t)nseries);
    if (nsym > out->symbols_cap) {
        c.full = 1;
        return rw_ctx_finish(&c, &r, 0);
    }
    if (nseries > lim->max_series) {
        res->series_bad = nseries;
        rw_reject(&c, 0, M3_RW_TOO_MANY_SERIES, NULL, 0,
                  "request has %llu series, more than limits.max_series_per_request=%llu; "
                  "nothing was written (send smaller requests)", (unsigned long long)nseries,
                  (unsigned long long)lim->max_series);
        return rw_ctx_finish(&c, &r, 0);
    }
    syms sy = {in, out->symbols, nsym};
    uint32_t idx = 0;
    r.p = in;
    while (r.p < r.end && !r.err) {
        uint32_t f, wt;
        if (rd_tag(&r, &f, &wt))
            break;
        if (f == 5) {
            const uint8_t *b, *e;
            if (rd_len(&r, &b, &e))
                break;
            if (timeseries(&c, &sy, &r, b, e, idx))
                break;
            idx++;
        } else {
            rd_skip(&r, wt);
        }
    }
    return rw_ctx_finish(&c, &r, idx);
}
