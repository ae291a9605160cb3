/*
 * rw_series.c -- what the remote write 1.0 and 2.0 decoders share: a series' labels, once a
 * front end has collected them as (pointer, length) pairs into the request, become lane records;
 * metadata entries become m3_rw_meta rows.
 *
 * Series: labels are validated (count, name syntax, lengths, UTF-8 values, duplicates,
 * __name__ present); labels with an empty value are dropped by the front ends (Prometheus
 * treats them as absent); the rest are sorted by name and written in canonical form:
 * repeated { u16 name_len, name, u16 value_len, value } (little-endian). The canonical bytes
 * are hashed (m3_labels_hash) and the shard is hash mod num_shards. Samples (the same Sample
 * message in 1.0 and 2.0: value = 1 fixed64, timestamp = 2 varint) outside [min_ts, max_ts]
 * are dropped and counted; the rest are written in records of at most M3_REC_MAX_SAMPLES
 * (timestamps, then values, in arrival order). The record layout is docs/formats/shm.md.
 *
 * Rejections: an invalid series is skipped and counted; the first rejection of the request is
 * named in res->msg ("series #i {labels}: why"), with the limit's config key when a limit
 * enforced it (limits.max_labels=64).
 *
 * Metadata: an entry (name, type, help, unit) is hashed (m3_rw_meta_hash); it is emitted to
 * out->meta unless the caller's `known` set holds the hash (already stored) or this request
 * already emitted it. So in the steady state no metadata reaches Python at all. Before hashing,
 * a small cache keyed by the entry's pointers skips entries this request offered already
 * (2.0 interns strings: every series of a metric points at the same help and unit).
 *
 * Invariants: nothing here reads outside the ranges the front ends checked; output is written
 * only after checking room (c->full otherwise, and the caller retries bigger).
 */
#include <stdarg.h>
#include <stdint.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "rw_int.h"

int rw_name_ok(const uint8_t *s, uint32_t n)
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

int rw_utf8_ok(const uint8_t *s, uint32_t n)
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

void rw_reject(rw_ctx *c, uint32_t idx, int reason, const lref *l, uint32_t nl,
               const char *fmt, ...)
{
    m3_rw_result *res = c->res;
    if (res->first_reason)
        return;
    char lab[320];
    char why[192];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    res->first_reason = reason;
    res->first_series = idx;
    if (l) {
        fmt_lrefs(l, nl, lab, sizeof lab);
        snprintf(res->msg, sizeof res->msg, "series #%u %s: %s", idx, lab, why);
    } else {
        snprintf(res->msg, sizeof res->msg, "%s", why);
    }
}

/* A name for a message: at most 64 bytes, unprintable bytes as '?'. */
static void short_name(const uint8_t *s, uint32_t n, char out[72])
{
    uint32_t k = 0;
    for (; k < n && k < 64; k++)
        out[k] = s[k] >= 0x20 && s[k] < 0x7f ? (char)s[k] : '?';
    out[k] = 0;
}

int rw_series_prepare(rw_ctx *c, uint32_t idx, lref *labels, uint32_t nl, uint64_t nsamples,
                      rw_series *s)
{
    const m3_rw_limits *lim = c->lim;
    uint32_t max_labels = lim->max_labels < RW_MAX_LABELS_HARD ? lim->max_labels
                                                                : RW_MAX_LABELS_HARD;
    int reason = 0;
    char nm[72];
    /* counts and lengths first, then names, then sort and look for duplicates */
    if (nl > max_labels) {
        reason = M3_RW_TOO_MANY_LABELS;
        rw_reject(c, idx, reason, labels, max_labels,
                  "more than %u labels (limits.max_labels=%u)", max_labels, max_labels);
    } else if (nl == 0) {
        reason = M3_RW_NO_LABELS;
        rw_reject(c, idx, reason, labels, 0, "empty label set");
    }
    uint64_t clen = 0;
    for (uint32_t i = 0; !reason && i < nl; i++) {
        const lref *l = &labels[i];
        clen += 4 + (uint64_t)l->nlen + l->vlen;
        if (!rw_name_ok(l->name, l->nlen))
            reason = M3_RW_BAD_LABEL_NAME;
        else if (l->nlen > lim->max_name_bytes || l->vlen > lim->max_value_bytes)
            reason = M3_RW_LABEL_TOO_LONG;
        else if (!rw_utf8_ok(l->val, l->vlen))
            reason = M3_RW_BAD_UTF8;
        if (!reason)
            continue;
        short_name(l->name, l->nlen, nm); /* only for the message: rejections are rare */
        if (reason == M3_RW_BAD_LABEL_NAME)
            rw_reject(c, idx, reason, labels, nl,
                      "invalid label name \"%s\" (want [a-zA-Z_][a-zA-Z0-9_]*)", nm);
        else if (reason == M3_RW_BAD_UTF8)
            rw_reject(c, idx, reason, labels, nl, "value of label \"%s\" is not UTF-8", nm);
        else if (l->nlen > lim->max_name_bytes)
            rw_reject(c, idx, reason, labels, nl,
                      "label name \"%s\" is %u bytes, more than "
                      "limits.max_label_name_bytes=%u", nm, l->nlen, lim->max_name_bytes);
        else
            rw_reject(c, idx, reason, labels, nl,
                      "value of label \"%s\" is %u bytes, more than "
                      "limits.max_label_value_bytes=%u", nm, l->vlen, lim->max_value_bytes);
    }
    if (!reason && clen > RW_MAX_LABELS_BYTES) {
        reason = M3_RW_LABEL_TOO_LONG;
        rw_reject(c, idx, reason, labels, nl,
                  "label set is %llu bytes in canonical form, more than the fixed limit %d",
                  (unsigned long long)clen, RW_MAX_LABELS_BYTES);
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
                short_name(labels[i].name, labels[i].nlen, nm);
                rw_reject(c, idx, reason, labels, nl, "duplicate label name \"%s\"", nm);
            }
        }
        int has_name = 0;
        for (uint32_t i = 0; i < nl; i++)
            if (labels[i].nlen == 8 && memcmp(labels[i].name, "__name__", 8) == 0)
                has_name = 1;
        if (!reason && !has_name) {
            reason = M3_RW_NO_NAME;
            rw_reject(c, idx, reason, labels, nl, "no __name__ label");
        }
    }
    if (reason) {
        c->res->series_bad++;
        c->res->samples_bad += nsamples;
        return reason;
    }
    uint32_t cl = 0;
    for (uint32_t i = 0; i < nl; i++) {
        s->canon[cl] = (uint8_t)labels[i].nlen;
        s->canon[cl + 1] = (uint8_t)(labels[i].nlen >> 8);
        memcpy(s->canon + cl + 2, labels[i].name, labels[i].nlen);
        cl += 2 + labels[i].nlen;
        s->canon[cl] = (uint8_t)labels[i].vlen;
        s->canon[cl + 1] = (uint8_t)(labels[i].vlen >> 8);
        memcpy(s->canon + cl + 2, labels[i].val, labels[i].vlen);
        cl += 2 + labels[i].vlen;
    }
    s->clen = cl;
    s->nlabels = nl;
    s->hash = m3_labels_hash(s->canon, cl);
    s->shard = (uint32_t)(s->hash % lim->num_shards);
    return 0;
}

static void emit(rw_ctx *c, const rw_series *s, const int64_t *ts, const double *v, uint32_t n)
{
    uint64_t need = rec_bytes(s->clen, n);
    c->res->out_needed += need;
    if (c->full || c->out_len + need > c->o->records_cap) {
        c->full = 1; /* keep counting what is needed, so one retry is enough */
        return;
    }
    m3_rec *r = (m3_rec *)(c->o->records + c->out_len);
    memset(r, 0, sizeof *r);
    r->len = (uint32_t)need;
    r->type = M3_REC_SAMPLES;
    r->vtype = M3_VT_FLOAT;
    r->shard = s->shard;
    r->tenant = 0;
    r->hash = s->hash;
    r->nsamples = n;
    r->labels_len = s->clen;
    r->nlabels = s->nlabels;
    uint8_t *q = (uint8_t *)(r + 1);
    memcpy(q, s->canon, s->clen);
    memset(q + s->clen, 0, round8(s->clen) - s->clen);
    q += round8(s->clen);
    memcpy(q, ts, (size_t)n * 8);
    memcpy(q + (size_t)n * 8, v, (size_t)n * 8);
    c->out_len += need;
    c->res->records++;
}

uint64_t rw_series_samples(rw_ctx *c, uint32_t idx, const rw_series *s, const lref *labels,
                           uint32_t nl, const uint8_t *b, const uint8_t *e, uint32_t field)
{
    const m3_rw_limits *lim = c->lim;
    int64_t tsb[M3_REC_MAX_SAMPLES];
    double vb[M3_REC_MAX_SAMPLES];
    uint32_t nb = 0;
    uint64_t ok = 0, bad = 0;
    rd r = {b, e, 0, NULL};
    while (r.p < r.end && !r.err) {
        uint32_t f = 0, wt = 0;
        if (rd_tag(&r, &f, &wt))
            break;
        if (f != field) {
            rd_skip(&r, wt);
            continue;
        }
        const uint8_t *mb = NULL, *me = NULL;
        if (rd_len(&r, &mb, &me))
            break;
        rd m = {mb, me, 0, NULL};
        uint64_t vbits = 0;
        int64_t ts = 0;
        while (m.p < m.end && !m.err) {
            uint32_t f2 = 0, wt2 = 0;
            if (rd_tag(&m, &f2, &wt2))
                break;
            if (f2 == 1) {
                memcpy(&vbits, m.p, 8); /* wire type checked by rw_check_sample */
                m.p += 8;
            } else if (f2 == 2) {
                ts = (int64_t)rd_varint(&m);
            } else {
                rd_skip(&m, wt2);
            }
        }
        if (ts < lim->min_ts || ts > lim->max_ts) {
            bad++;
            if (ts < lim->min_ts)
                rw_reject(c, idx, M3_RW_TOO_OLD, labels, nl,
                          "sample timestamp %lld ms is too old (accepted from %lld ms)",
                          (long long)ts, (long long)lim->min_ts);
            else
                rw_reject(c, idx, M3_RW_TOO_NEW, labels, nl,
                          "sample timestamp %lld ms is too far in the future (accepted "
                          "until %lld ms)", (long long)ts, (long long)lim->max_ts);
            continue;
        }
        tsb[nb] = ts;
        memcpy(&vb[nb], &vbits, 8);
        nb++;
        ok++;
        if (nb == M3_REC_MAX_SAMPLES) {
            emit(c, s, tsb, vb, nb);
            nb = 0;
        }
    }
    M3_ASSERT(!r.err);
    if (nb)
        emit(c, s, tsb, vb, nb);
    if (ok) {
        c->res->series_ok++;
        c->res->samples_ok += ok;
    }
    if (bad) {
        c->res->series_bad++;
        c->res->samples_bad += bad;
    }
    return ok;
}

/* ---- metadata ------------------------------------------------------------------------- */

static inline uint64_t mix(uint64_t h)
{
    h ^= h >> 33;
    h *= UINT64_C(0xff51afd7ed558ccd);
    h ^= h >> 33;
    h *= UINT64_C(0xc4ceb9fe1a85ec53);
    h ^= h >> 33;
    return h;
}

uint64_t m3_rw_meta_hash(const uint8_t *name, size_t nlen, uint32_t type, const uint8_t *help,
                         size_t hlen, const uint8_t *unit, size_t ulen)
{
    uint64_t h = m3_labels_hash(name, nlen);
    h = mix(h ^ (m3_labels_hash(help, hlen) + UINT64_C(0x9e3779b97f4a7c15)));
    h = mix(h ^ (m3_labels_hash(unit, ulen) * 3 + type));
    return h < 2 ? h + 2 : h;
}

static int known(const uint64_t *set, uint64_t size, uint64_t h)
{
    if (!size)
        return 0;
    for (uint64_t i = h & (size - 1), n = 0; n < size; i = (i + 1) & (size - 1), n++) {
        if (set[i] == h)
            return 1;
        if (set[i] == 0)
            return 0;
    }
    return 0;
}

void rw_meta_offer(rw_ctx *c, const uint8_t *name, uint32_t nlen, uint32_t type,
                   const uint8_t *help, uint32_t hlen, const uint8_t *unit, uint32_t ulen)
{
    uintptr_t pk = (uintptr_t)name * 31 + (uintptr_t)help * 7 + (uintptr_t)unit + type;
    uint32_t pi = (uint32_t)((pk * UINT64_C(0x9e3779b97f4a7c15)) >> 56) & (RW_META_PTRS - 1);
    if (c->offered[pi].name == name && c->offered[pi].help == help &&
        c->offered[pi].unit == unit && c->offered[pi].nlen == nlen &&
        c->offered[pi].hlen == hlen && c->offered[pi].ulen == ulen &&
        c->offered[pi].type == type)
        return;
    c->offered[pi].name = name, c->offered[pi].help = help, c->offered[pi].unit = unit;
    c->offered[pi].nlen = nlen, c->offered[pi].hlen = hlen, c->offered[pi].ulen = ulen;
    c->offered[pi].type = type;
    uint64_t h = m3_rw_meta_hash(name, nlen, type, help, hlen, unit, ulen);
    if (known(c->o->known, c->o->known_size, h))
        return;
    /* this request's own set (linear probing, at most half full: then it stops growing and
       later duplicates are emitted, which is harmless) */
    uint32_t i = (uint32_t)h & (RW_META_SEEN - 1);
    while (c->seen[i] && c->seen[i] != h)
        i = (i + 1) & (RW_META_SEEN - 1);
    if (c->seen[i] == h)
        return;
    if (c->nseen < RW_META_SEEN / 2) {
        c->seen[i] = h;
        c->nseen++;
    }
    if (c->res->nmeta >= c->o->meta_cap) {
        c->full = 1;
        c->res->nmeta++;
        return;
    }
    m3_rw_meta *m = &c->o->meta[c->res->nmeta++];
    m->name_off = (uint64_t)(name - c->in);
    m->name_len = nlen;
    m->help_off = (uint64_t)(help - c->in);
    m->help_len = hlen;
    m->unit_off = (uint64_t)(unit - c->in);
    m->unit_len = ulen;
    m->type = type;
    m->hash = h;
}

int rw_meta_check(rw_ctx *c, const char *what, uint32_t idx, const uint8_t *name, uint32_t nlen,
                  uint64_t type, const uint8_t *help, uint32_t hlen, const uint8_t *unit,
                  uint32_t ulen)
{
    char nm[72];
    short_name(name, nlen, nm);
    const char *why = NULL;
    if (!nlen)
        why = "empty metric name";
    else if (nlen > c->lim->max_value_bytes)
        why = "metric name longer than limits.max_label_value_bytes";
    else if (type > 7)
        why = "unknown metric type";
    else if (hlen > RW_MAX_HELP_BYTES)
        why = "help is longer than the fixed limit of 16384 bytes";
    else if (ulen > RW_MAX_UNIT_BYTES)
        why = "unit is longer than the fixed limit of 256 bytes";
    else if (!rw_utf8_ok(name, nlen) || !rw_utf8_ok(help, hlen) || !rw_utf8_ok(unit, ulen))
        why = "name, help or unit is not UTF-8";
    if (!why)
        return 0;
    c->res->meta_bad++;
    rw_reject(c, idx, M3_RW_BAD_METADATA, NULL, 0, "%s%u for \"%s\": %s", what, idx, nm, why);
    return -1;
}

int rw_ctx_init(rw_ctx *c, const uint8_t *in, size_t len, const m3_rw_limits *lim,
                m3_rw_out *o, m3_rw_result *res)
{
    if (!res || !lim || !o || (!in && len) || (!o->records && o->records_cap) ||
        (!o->meta && o->meta_cap) || (!o->known && o->known_size) ||
        (o->known_size & (o->known_size - 1)) || (!o->symbols && o->symbols_cap) ||
        lim->num_shards == 0)
        return M3_EINVAL;
    memset(res, 0, sizeof *res);
    memset(c->seen, 0, sizeof c->seen);
    memset(c->offered, 0, sizeof c->offered);
    c->nseen = 0;
    c->in = in;
    c->lim = lim;
    c->o = o;
    c->res = res;
    c->out_len = 0;
    c->full = 0;
    return M3_OK;
}

int rw_ctx_finish(rw_ctx *c, rd *r, uint32_t idx)
{
    m3_rw_result *res = c->res;
    if (r->err) {
        snprintf(res->msg, sizeof res->msg, "malformed protobuf at byte %zu (timeseries #%u): %s",
                 (size_t)(r->p - c->in), idx, r->what ? r->what : "invalid");
        res->first_reason = M3_RW_MALFORMED;
        res->out_len = 0;
        res->nmeta = 0;
        return r->err;
    }
    res->out_len = c->out_len;
    return c->full ? M3_ENOSPC : M3_OK;
}
