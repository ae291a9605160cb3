/*
 * rw_decode.c -- Prometheus remote write wire format, decoded straight into lane records.
 *
 * Input: a snappy-decompressed remote write 1.0 `prometheus.WriteRequest` (proto/remote.proto,
 * proto/types.proto; docs/formats/remote-write.md). Output: a batch of m3_rec records
 * (csrc/m3shm.h, docs/formats/shm.md), the same bytes that go to the commit log and then into
 * the lanes. No allocation, no Python object per series or sample: one pass over the message,
 * protobuf fields read in place.
 *
 * Per TimeSeries: labels are collected as (pointer, length) pairs into the input, validated
 * (name syntax, duplicates, counts, lengths, __name__ present, UTF-8), labels with an empty
 * value are dropped (Prometheus treats them as absent), the rest sorted by name and written in
 * canonical form: repeated { u16 name_len, name, u16 value_len, value } (little-endian). The
 * canonical bytes are hashed (m3_labels_hash) and the shard is hash mod num_shards. Samples
 * outside [min_ts, max_ts] are dropped and counted; the valid ones are written in records of
 * at most M3_REC_MAX_SAMPLES (timestamps, then values, in arrival order).
 *
 * Error model: malformed protobuf (bad varint, a length past the end, wire types 3/4/6/7, a
 * field with the wrong wire type) fails the whole request with M3_ECORRUPT / M3_ETRUNC and a
 * message naming the byte offset. An invalid series is skipped and counted; the first one is
 * named in res->msg with its index and why. Unknown fields are skipped, as protobuf requires.
 *
 * Remote write 2.0 (io.prometheus.write.v2.Request: a symbol table and label references)
 * slots in as a second front end (m3_rw2_decode) that resolves references into the same
 * label (pointer, length) pairs and shares everything from validation on.
 *
 * Invariants: every read is bounds-checked against the end of the enclosing message; output is
 * written only after checking room (M3_ENOSPC otherwise, and the caller retries bigger).
 */
#include <stdint.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "seg_int.h"

#define MAX_LABELS_HARD 256
#define MAX_LABELS_BYTES 16384 /* canonical label bytes per series */

typedef struct lref {
    const uint8_t *name;
    uint32_t nlen;
    const uint8_t *val;
    uint32_t vlen;
} lref;

typedef struct rd {
    const uint8_t *p, *end, *start;
    int err;          /* M3_ECORRUPT / M3_ETRUNC once something is wrong */
    const char *what;
} rd;

static inline uint64_t varint(rd *r)
{
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        if (r->p >= r->end) {
            r->err = M3_ETRUNC;
            r->what = "varint runs past the end";
            return 0;
        }
        uint8_t b = *r->p++;
        v |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80))
            return v;
    }
    r->err = M3_ECORRUPT;
    r->what = "varint longer than 10 bytes";
    return 0;
}

/* Read a length-delimited field's bounds. */
static inline int take_len(rd *r, const uint8_t **b, const uint8_t **e)
{
    uint64_t n = varint(r);
    if (r->err)
        return -1;
    if (n > (uint64_t)(r->end - r->p)) {
        r->err = M3_ETRUNC;
        r->what = "length-delimited field runs past the end of its message";
        return -1;
    }
    *b = r->p;
    *e = r->p + n;
    r->p += n;
    return 0;
}

static inline void skip_field(rd *r, uint32_t wt)
{
    const uint8_t *b, *e;
    switch (wt) {
    case 0:
        varint(r);
        break;
    case 1:
        if (r->end - r->p < 8) {
            r->err = M3_ETRUNC;
            r->what = "fixed64 field runs past the end";
        } else
            r->p += 8;
        break;
    case 2:
        take_len(r, &b, &e);
        break;
    case 5:
        if (r->end - r->p < 4) {
            r->err = M3_ETRUNC;
            r->what = "fixed32 field runs past the end";
        } else
            r->p += 4;
        break;
    default:
        r->err = M3_ECORRUPT;
        r->what = "unsupported wire type (groups or 6/7)";
    }
}

static inline int tag(rd *r, uint32_t *field, uint32_t *wt)
{
    uint64_t t = varint(r);
    if (r->err)
        return -1;
    *field = (uint32_t)(t >> 3);
    *wt = (uint32_t)(t & 7);
    if (*field == 0 || t >> 32) {
        r->err = M3_ECORRUPT;
        r->what = "field number 0 or out of range";
        return -1;
    }
    return 0;
}

static inline void wrong_type(rd *r)
{
    r->err = M3_ECORRUPT;
    r->what = "a known field has the wrong wire type";
}

static int name_ok(const uint8_t *s, uint32_t n)
{
    if (!n)
        return 0;
    for (uint32_t i = 0; i < n; i++) {
        uint8_t c = s[i];
        int alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
        if (!(alpha || (i && c >= '0' && c <= '9')))
            return 0;
    }
    return 1;
}

static int utf8_ok(const uint8_t *s, uint32_t n)
{
    uint32_t i = 0;
    while (i < n) {
        uint8_t c = s[i];
        uint32_t k;
        uint32_t cp;
        if (c < 0x80) {
            i++;
            continue;
        } else if ((c & 0xe0) == 0xc0) {
            k = 1, cp = c & 0x1f;
        } else if ((c & 0xf0) == 0xe0) {
            k = 2, cp = c & 0x0f;
        } else if ((c & 0xf8) == 0xf0) {
            k = 3, cp = c & 0x07;
        } else {
            return 0;
        }
        for (uint32_t j = 1; j <= k; j++) {
            if (i + j >= n || (s[i + j] & 0xc0) != 0x80)
                return 0;
            cp = cp << 6 | (s[i + j] & 0x3f);
        }
        if ((k == 1 && cp < 0x80) || (k == 2 && cp < 0x800) || (k == 3 && cp < 0x10000) ||
            cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
            return 0;
        i += k + 1;
    }
    return 1;
}

static int lref_cmp(const lref *a, const lref *b)
{
    uint32_t n = a->nlen < b->nlen ? a->nlen : b->nlen;
    int c = memcmp(a->name, b->name, n);
    if (c)
        return c;
    return a->nlen < b->nlen ? -1 : a->nlen > b->nlen;
}

/* Format labels for an error message: {a="b", ...}, truncated. */
static void fmt_lrefs(const lref *l, uint32_t n, char *out, size_t cap)
{
    size_t o = 0;
#define PUT(c)                                                                               \
    do {                                                                                     \
        if (o + 1 < cap)                                                                     \
            out[o++] = (char)(c);                                                            \
    } while (0)
    PUT('{');
    for (uint32_t i = 0; i < n; i++) {
        if (i) {
            PUT(',');
            PUT(' ');
        }
        for (uint32_t k = 0; k < l[i].nlen && k < 64; k++)
            PUT(l[i].name[k] >= 0x20 && l[i].name[k] < 0x7f ? l[i].name[k] : '?');
        PUT('=');
        PUT('"');
        for (uint32_t k = 0; k < l[i].vlen && k < 64; k++) {
            if (l[i].val[k] == '"' || l[i].val[k] == '\\')
                PUT('\\');
            PUT(l[i].val[k] >= 0x20 ? l[i].val[k] : '?');
        }
        for (int k = 0; l[i].vlen > 64 && k < 3; k++)
            PUT('.');
        PUT('"');
    }
    PUT('}');
#undef PUT
    if (cap > 4 && o + 1 >= cap)
        memcpy(out + cap - 4, "...", 3), o = cap - 1;
    out[o] = 0;
}

typedef struct out_t {
    uint8_t *p;
    size_t cap, len;
    int full;
} out_t;

static void reject(m3_rw_result *res, uint32_t idx, int reason, const lref *l, uint32_t nl,
                   const char *fmt, const char *a, long long b, long long c)
{
    if (res->first_reason)
        return;
    char lab[320];
    char why[160];
    fmt_lrefs(l, nl, lab, sizeof lab);
    snprintf(why, sizeof why, fmt, a, b, c);
    res->first_reason = reason;
    res->first_series = idx;
    snprintf(res->msg, sizeof res->msg, "series #%u %s: %s", idx, lab, why);
}

static void emit(out_t *o, const uint8_t *canon, uint32_t clen, uint32_t nlabels, uint64_t hash,
                 uint32_t shard, const int64_t *ts, const double *v, uint32_t n)
{
    uint64_t need = rec_bytes(clen, n);
    if (o->len + need > o->cap) {
        o->full = 1;
        return;
    }
    m3_rec *r = (m3_rec *)(o->p + o->len);
    memset(r, 0, sizeof *r);
    r->len = (uint32_t)need;
    r->type = M3_REC_SAMPLES;
    r->vtype = M3_VT_FLOAT;
    r->shard = shard;
    r->tenant = 0;
    r->hash = hash;
    r->nsamples = n;
    r->labels_len = clen;
    r->nlabels = nlabels;
    uint8_t *q = (uint8_t *)(r + 1);
    memcpy(q, canon, clen);
    memset(q + clen, 0, round8(clen) - clen);
    q += round8(clen);
    memcpy(q, ts, (size_t)n * 8);
    memcpy(q + (size_t)n * 8, v, (size_t)n * 8);
    o->len += need;
}

/* One TimeSeries message in [b, e). Returns 0, or -1 with r->err set for malformed input. */
static int timeseries(rd *top, const uint8_t *b, const uint8_t *e, uint32_t idx,
                      const m3_rw_limits *lim, out_t *o, m3_rw_result *res)
{
    lref labels[MAX_LABELS_HARD + 1];
    uint32_t nl = 0, nraw = 0;
    uint32_t max_labels = lim->max_labels < MAX_LABELS_HARD ? lim->max_labels : MAX_LABELS_HARD;
    int histogram = 0;
    uint64_t nsamples = 0;
    rd r = {b, e, top->start, 0, NULL};
    uint32_t f = 0, wt = 0;
    /* pass 1: labels, and check the structure of everything else */
    while (r.p < r.end) {
        if (tag(&r, &f, &wt))
            break;
        if (f == 1 || f == 2) {
            if (wt != 2) {
                wrong_type(&r);
                break;
            }
            const uint8_t *mb, *me;
            if (take_len(&r, &mb, &me))
                break;
            rd m = {mb, me, r.start, 0, NULL};
            lref l = {(const uint8_t *)"", 0, (const uint8_t *)"", 0};
            while (m.p < m.end) {
                uint32_t f2, wt2;
                if (tag(&m, &f2, &wt2))
                    break;
                if (f == 1 && (f2 == 1 || f2 == 2)) {
                    const uint8_t *sb, *se;
                    if (wt2 != 2) {
                        wrong_type(&m);
                        break;
                    }
                    if (take_len(&m, &sb, &se))
                        break;
                    if (f2 == 1)
                        l.name = sb, l.nlen = (uint32_t)(se - sb);
                    else
                        l.val = sb, l.vlen = (uint32_t)(se - sb);
                } else if (f == 2 && f2 == 1) {
                    if (wt2 != 1) {
                        wrong_type(&m);
                        break;
                    }
                    skip_field(&m, 1);
                } else if (f == 2 && f2 == 2) {
                    if (wt2 != 0) {
                        wrong_type(&m);
                        break;
                    }
                    varint(&m);
                } else {
                    skip_field(&m, wt2);
                }
                if (m.err)
                    break;
            }
            if (m.err) {
                r.err = m.err, r.what = m.what, r.p = m.p;
                break;
            }
            if (f == 2) {
                nsamples++;
            } else {
                nraw++;
                if (l.vlen && nl <= max_labels)
                    labels[nl++] = l;
                else if (!l.vlen && !l.nlen && nl <= max_labels)
                    labels[nl++] = l; /* an empty name is reported below */
            }
        } else if (f == 4) {
            histogram = 1;
            skip_field(&r, wt);
        } else {
            skip_field(&r, wt);
        }
        if (r.err)
            break;
    }
    if (r.err) {
        top->err = r.err;
        top->what = r.what;
        top->p = r.p;
        return -1;
    }
    (void)nraw;
    if (histogram) {
        res->series_bad++;
        res->samples_bad += nsamples;
        reject(res, idx, M3_RW_HISTOGRAM, labels, nl < max_labels ? nl : max_labels,
               "native histograms are not supported yet%s", "", 0, 0);
        return 0;
    }
    if (!nsamples)
        return 0;
    int reason = 0;
    /* validate: counts and lengths first, then names, then sort and look for duplicates */
    if (nl > max_labels) {
        reason = M3_RW_TOO_MANY_LABELS;
        reject(res, idx, reason, labels, max_labels, "more than %s%lld labels (max_labels)", "",
               (long long)max_labels, 0);
    } else if (nl == 0) {
        reason = M3_RW_NO_LABELS;
        reject(res, idx, reason, labels, 0, "empty label set%s", "", 0, 0);
    }
    uint64_t clen = 0;
    for (uint32_t i = 0; !reason && i < nl; i++) {
        const lref *l = &labels[i];
        clen += 4 + (uint64_t)l->nlen + l->vlen;
        if (!name_ok(l->name, l->nlen)) {
            reason = M3_RW_BAD_LABEL_NAME;
            char nm[80];
            snprintf(nm, sizeof nm, "%.*s", (int)(l->nlen < 64 ? l->nlen : 64), l->name);
            reject(res, idx, reason, labels, nl,
                   "invalid label name \"%s\" (want [a-zA-Z_][a-zA-Z0-9_]*)%.0lld%.0lld", nm,
                   0, 0);
        } else if (l->nlen > lim->max_name_bytes || l->vlen > lim->max_value_bytes) {
            reason = M3_RW_LABEL_TOO_LONG;
            char nm[80];
            snprintf(nm, sizeof nm, "%.*s", (int)(l->nlen < 64 ? l->nlen : 64), l->name);
            reject(res, idx, reason, labels, nl,
                   "label \"%s\" is too long (max_name_bytes=%lld, max_value_bytes=%lld)", nm,
                   (long long)lim->max_name_bytes, (long long)lim->max_value_bytes);
        } else if (!utf8_ok(l->val, l->vlen)) {
            reason = M3_RW_BAD_UTF8;
            char nm[80];
            snprintf(nm, sizeof nm, "%.*s", (int)(l->nlen < 64 ? l->nlen : 64), l->name);
            reject(res, idx, reason, labels, nl, "value of label \"%s\" is not UTF-8%.0lld%.0lld",
                   nm, 0, 0);
        }
    }
    if (!reason && clen > MAX_LABELS_BYTES) {
        reason = M3_RW_LABEL_TOO_LONG;
        reject(res, idx, reason, labels, nl, "label set is %s%lld bytes, more than %lld", "",
               (long long)clen, MAX_LABELS_BYTES);
    }
    if (!reason) {
        for (uint32_t i = 1; i < nl; i++) { /* insertion sort: label sets are small */
            lref t = labels[i];
            uint32_t j = i;
            while (j && lref_cmp(&labels[j - 1], &t) > 0) {
                labels[j] = labels[j - 1];
                j--;
            }
            labels[j] = t;
        }
        for (uint32_t i = 1; i < nl && !reason; i++) {
            if (lref_cmp(&labels[i - 1], &labels[i]) == 0) {
                reason = M3_RW_DUP_LABEL;
                char nm[80];
                snprintf(nm, sizeof nm, "%.*s", (int)(labels[i].nlen < 64 ? labels[i].nlen : 64),
                         labels[i].name);
                reject(res, idx, reason, labels, nl,
                       "duplicate label name \"%s\"%.0lld%.0lld", nm, 0, 0);
            }
        }
        int has_name = 0;
        for (uint32_t i = 0; i < nl; i++)
            if (labels[i].nlen == 8 && memcmp(labels[i].name, "__name__", 8) == 0)
                has_name = 1;
        if (!reason && !has_name) {
            reason = M3_RW_NO_NAME;
            reject(res, idx, reason, labels, nl, "no __name__ label%s%.0lld%.0lld", "", 0, 0);
        }
    }
    if (reason) {
        res->series_bad++;
        res->samples_bad += nsamples;
        return 0;
    }
    uint8_t canon[MAX_LABELS_BYTES];
    uint32_t cl = 0;
    for (uint32_t i = 0; i < nl; i++) {
        canon[cl] = (uint8_t)labels[i].nlen;
        canon[cl + 1] = (uint8_t)(labels[i].nlen >> 8);
        memcpy(canon + cl + 2, labels[i].name, labels[i].nlen);
        cl += 2 + labels[i].nlen;
        canon[cl] = (uint8_t)labels[i].vlen;
        canon[cl + 1] = (uint8_t)(labels[i].vlen >> 8);
        memcpy(canon + cl + 2, labels[i].val, labels[i].vlen);
        cl += 2 + labels[i].vlen;
    }
    uint64_t hash = m3_labels_hash(canon, cl);
    uint32_t shard = (uint32_t)(hash % lim->num_shards);

    /* pass 2: samples (the structure was checked in pass 1) */
    int64_t tsb[M3_REC_MAX_SAMPLES];
    double vb[M3_REC_MAX_SAMPLES];
    uint32_t nb = 0;
    uint64_t ok = 0, bad = 0;
    r.p = b;
    while (r.p < r.end && !r.err) {
        if (tag(&r, &f, &wt))
            break;
        if (f != 2) {
            skip_field(&r, wt);
            continue;
        }
        const uint8_t *mb = NULL, *me = NULL;
        if (take_len(&r, &mb, &me))
            break;
        rd m = {mb, me, r.start, 0, NULL};
        uint64_t vbits = 0;
        int64_t ts = 0;
        while (m.p < m.end && !m.err) {
            uint32_t f2 = 0, wt2 = 0;
            if (tag(&m, &f2, &wt2))
                break;
            if (f2 == 1) {
                memcpy(&vbits, m.p, 8);
                m.p += 8;
            } else if (f2 == 2) {
                ts = (int64_t)varint(&m);
            } else {
                skip_field(&m, wt2);
            }
        }
        if (ts < lim->min_ts || ts > lim->max_ts) {
            bad++;
            if (!res->first_reason) {
                int rr = ts < lim->min_ts ? M3_RW_TOO_OLD : M3_RW_TOO_NEW;
                reject(res, idx, rr, labels, nl,
                       rr == M3_RW_TOO_OLD
                           ? "sample timestamp %s%lld ms is too old (accepted from %lld ms)"
                           : "sample timestamp %s%lld ms is too far in the future (accepted "
                             "until %lld ms)",
                       "", (long long)ts,
                       (long long)(rr == M3_RW_TOO_OLD ? lim->min_ts : lim->max_ts));
            }
            continue;
        }
        tsb[nb] = ts;
        memcpy(&vb[nb], &vbits, 8);
        nb++;
        ok++;
        if (nb == M3_REC_MAX_SAMPLES) {
            emit(o, canon, cl, nl, hash, shard, tsb, vb, nb);
            res->records++;
            nb = 0;
        }
    }
    if (nb) {
        emit(o, canon, cl, nl, hash, shard, tsb, vb, nb);
        res->records++;
    }
    if (ok) {
        res->series_ok++;
        res->samples_ok += ok;
    }
    if (bad) {
        res->series_bad++;
        res->samples_bad += bad;
    }
    return 0;
}

int m3_rw1_decode(const uint8_t *in, size_t len, const m3_rw_limits *lim, uint8_t *out,
                  size_t cap, m3_rw_result *res)
{
    if (!res || !lim || (!in && len) || (!out && cap) || lim->num_shards == 0)
        return M3_EINVAL;
    memset(res, 0, sizeof *res);
    out_t o = {out, cap, 0, 0};
    rd r = {in, in + len, in, 0, NULL};
    uint32_t idx = 0;
    while (r.p < r.end) {
        uint32_t f, wt;
        if (tag(&r, &f, &wt))
            break;
        if (f == 1) {
            if (wt != 2) {
                wrong_type(&r);
                break;
            }
            const uint8_t *b, *e;
            if (take_len(&r, &b, &e))
                break;
            if (timeseries(&r, b, e, idx, lim, &o, res))
                break;
            idx++;
        } else {
            skip_field(&r, wt);
        }
        if (r.err)
            break;
    }
    if (r.err) {
        snprintf(res->msg, sizeof res->msg, "malformed protobuf at byte %zu (timeseries #%u): %s",
                 (size_t)(r.p - in), idx, r.what ? r.what : "invalid");
        res->first_reason = M3_RW_MALFORMED;
        return r.err;
    }
    res->out_len = o.len;
    return o.full ? M3_ENOSPC : M3_OK;
}
