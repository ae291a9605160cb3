/*
 * rw_int.h -- private to the remote write decoders (rw_decode.c for 1.0, rw2_decode.c for 2.0,
 * rw_series.c for what they share). Not cffi-visible.
 *
 * A protobuf wire reader over a bounded byte range (every read checked against `end`; the
 * first problem sets `err` and `what` and every later read returns 0), the label reference the
 * front ends collect (pointers into the request), and the decode context: limits, the output
 * record buffer, the metadata list, the result counters.
 */
#ifndef M3_RW_INT_H
#define M3_RW_INT_H

#include <stdint.h>
#include <stddef.h>

#include "seg_int.h"

#define RW_MAX_LABELS_HARD 256
#define RW_MAX_LABELS_BYTES 16384 /* canonical label bytes per series (fixed) */
#define RW_MAX_HELP_BYTES 16384   /* metadata help text (fixed) */
#define RW_MAX_UNIT_BYTES 256     /* metadata unit (fixed) */
#define RW_META_SEEN 512          /* per-request dedup table of metadata hashes */
#define RW_META_PTRS 256          /* per-request cache of metadata already offered, by pointers */

typedef struct lref {
    const uint8_t *name;
    uint32_t nlen;
    const uint8_t *val;
    uint32_t vlen;
} lref;

typedef struct rd {
    const uint8_t *p, *end;
    int err;          /* M3_ECORRUPT / M3_ETRUNC once something is wrong */
    const char *what;
} rd;

static inline uint64_t rd_varint(rd *r)
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

/* Read a length-delimited field's bounds [*b, *e) and step past it. */
static inline int rd_len(rd *r, const uint8_t **b, const uint8_t **e)
{
    uint64_t n = rd_varint(r);
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

static inline void rd_skip(rd *r, uint32_t wt)
{
    const uint8_t *b, *e;
    switch (wt) {
    case 0:
        rd_varint(r);
        break;
    case 1:
        if (r->end - r->p < 8) {
            r->err = M3_ETRUNC;
            r->what = "fixed64 field runs past the end";
        } else
            r->p += 8;
        break;
    case 2:
        rd_len(r, &b, &e);
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

static inline int rd_tag(rd *r, uint32_t *field, uint32_t *wt)
{
    uint64_t t = rd_varint(r);
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

static inline void rd_wrong_type(rd *r)
{
    r->err = M3_ECORRUPT;
    r->what = "a known field has the wrong wire type";
}

/* A nested reader's failure becomes its parent's (the offset is the nested one's). */
static inline void rd_adopt(rd *parent, const rd *child)
{
    parent->err = child->err;
    parent->what = child->what;
    parent->p = child->p;
}

/* Check one Sample message's structure (value I64, timestamp VARINT, others skipped). */
static inline void rw_check_sample(rd *m)
{
    while (m->p < m->end && !m->err) {
        uint32_t f, wt;
        if (rd_tag(m, &f, &wt))
            return;
        if ((f == 1 && wt != 1) || (f == 2 && wt != 0)) {
            rd_wrong_type(m);
            return;
        }
        rd_skip(m, wt);
    }
}

typedef struct rw_ctx {
    const uint8_t *in;       /* the whole request: metadata offsets are relative to it */
    const m3_rw_limits *lim;
    m3_rw_out *o;
    m3_rw_result *res;
    uint64_t out_len;
    int full;                /* records or metadata did not fit: the caller retries bigger */
    uint32_t nseen;
    /* 2.0 interns strings, so the same entry in another series has the same pointers: an
       entry whose pointers, lengths and type match a slot here was offered already */
    struct {
        const uint8_t *name, *help, *unit;
        uint32_t nlen, hlen, ulen, type;
    } offered[RW_META_PTRS];
    uint64_t seen[RW_META_SEEN]; /* metadata hashes emitted by this request (0 = empty) */
} rw_ctx;

/* A valid series' canonical form, ready for its samples. */
typedef struct rw_series {
    uint8_t canon[RW_MAX_LABELS_BYTES];
    uint32_t clen;
    uint32_t nlabels;
    uint64_t hash;
    uint32_t shard;
} rw_series;

/* rw_series.c */
int rw_name_ok(const uint8_t *s, uint32_t n);
int rw_utf8_ok(const uint8_t *s, uint32_t n);
/* Record the first rejection (naming series idx and its labels) in res->msg. */
void rw_reject(rw_ctx *c, uint32_t idx, int reason, const lref *l, uint32_t nl,
               const char *fmt, ...) __attribute__((format(printf, 6, 7)));
/* Validate, sort and canonicalise nl labels (nl may exceed limits.max_labels by one, meaning
   "too many"). Returns 0 and fills s, or the M3_RW_* reason after rejecting the series (its
   nsamples samples are counted as rejected). */
int rw_series_prepare(rw_ctx *c, uint32_t idx, lref *labels, uint32_t nl, uint64_t nsamples,
                      rw_series *s);
/* Emit the samples of the valid series s found in field `field` of the TimeSeries message
   [b, e) (its structure already checked) as records; samples outside the window are counted
   and named. Returns the samples written. */
uint64_t rw_series_samples(rw_ctx *c, uint32_t idx, const rw_series *s, const lref *labels,
                           uint32_t nl, const uint8_t *b, const uint8_t *e, uint32_t field);
/* Offer one metadata entry (pointers into c->in); emitted unless already known or already
   emitted by this request. */
void rw_meta_offer(rw_ctx *c, const uint8_t *name, uint32_t nlen, uint32_t type,
                   const uint8_t *help, uint32_t hlen, const uint8_t *unit, uint32_t ulen);
/* Validate a metadata entry; 0 if fine, else rejects it (named "<what><idx>") and returns -1. */
int rw_meta_check(rw_ctx *c, const char *what, uint32_t idx, const uint8_t *name, uint32_t nlen,
                  uint64_t type, const uint8_t *help, uint32_t hlen, const uint8_t *unit,
                  uint32_t ulen);
/* Start a decode: checks arguments, zeroes the result. */
int rw_ctx_init(rw_ctx *c, const uint8_t *in, size_t len, const m3_rw_limits *lim,
                m3_rw_out *o, m3_rw_result *res);
/* Finish a decode: the return code for the reader's state (the message names the offset). */
int rw_ctx_finish(rw_ctx *c, rd *r, uint32_t idx);

#endif
