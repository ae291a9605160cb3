/*
 * series.c -- per-shard series table and open blocks in shared memory.
 *
 * Each shard region (docs/formats/shm.md) holds a header, an open-addressing hash table, an
 * array of series slots and an arena. Exactly one process writes a shard: its owner worker.
 * Any process may read it at any time, without locks, so every write is ordered for readers:
 *
 *   series      slot fields are written, then nseries is release-stored (readers that iterate
 *               slots [0, nseries) see complete slots), then the table entry is release-
 *               stored (readers that look a series up see a complete slot).
 *   table       u64 entries: (hash >> 32) << 32 | (slot + 1); 0 = empty; linear probing;
 *               size a power of two at least twice the slots, so probes stay short.
 *   chunks      a series' samples live in an append-only chain of M3_CHUNK_BYTES chunks
 *               allocated from the arena by a bump pointer. A chunk is initialised, then
 *               linked by a release store of the previous chunk's `next` (or the slot's
 *               `head`). Chunks and labels are never freed or moved while the segment lives
 *               (flush and retention come with the storage issue), so a reader can never be
 *               looking at reused memory.
 *   streams     every chunk is one in-order tsz stream of one block. A sample goes to the
 *               first open stream of its block (lowest stream number) whose last timestamp is
 *               below it ("first fit", like M3's buckets), else to a new stream with the next
 *               stream number. Hence a later write of the same timestamp always lands in a
 *               higher stream, and the read merge (sort by timestamp, then stream; keep the
 *               last of each timestamp) makes the last write win. A full chunk is closed and
 *               continued as a new stream.
 *   samples     tsz_enc_append publishes the new bytes and the encoder state with a release
 *               store of the chunk's sample count (codec.c); readers decode exactly the
 *               published prefix.
 *
 * Crash safety of the owner: it can be killed between any two instructions. Applying a record
 * twice only adds equal (timestamp, value) pairs in higher streams, which the merge removes, so
 * the lane head moves only after a record is applied. m3_shard_recover repairs the rest at
 * attach: encoder states torn mid-append (tsz_enc_resume), chain ends not yet recorded, and a
 * last series published in nseries but not yet in the table. Leaked arena bytes (allocated,
 * never linked) are harmless.
 *
 * The label hash (m3_labels_hash, "m3hash64 v1") decides each series' shard and is recorded
 * on disk with the shard count, so it must never change.
 */
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>

#include "seg_int.h"

/* ---- hashing ---------------------------------------------------------------------------- */

static inline uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

static inline uint64_t fmix64(uint64_t k)
{
    k ^= k >> 33;
    k *= UINT64_C(0xff51afd7ed558ccd);
    k ^= k >> 33;
    k *= UINT64_C(0xc4ceb9fe1a85ec53);
    k ^= k >> 33;
    return k;
}

uint64_t m3_labels_hash(const uint8_t *p, size_t len)
{
    const uint64_t k1 = UINT64_C(0x87c37b91114253d5), k2 = UINT64_C(0x4cf5ad432745937f);
    uint64_t h = UINT64_C(0x6d33736873686d31) ^ ((uint64_t)len * k2);
    size_t i = 0;
    for (; i + 8 <= len; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8); /* little-endian machines only (asserted in codec.c) */
        w *= k1;
        w = rotl64(w, 31);
        w *= k2;
        h ^= w;
        h = rotl64(h, 27) * 5 + 0x52dce729;
    }
    uint64_t t = 0;
    for (size_t j = 0; i + j < len; j++)
        t |= (uint64_t)p[i + j] << (8 * j);
    h ^= rotl64(t * k1, 31) * k2;
    return fmix64(h);
}

void m3_labels_format(const uint8_t *l, size_t len, char *out, size_t cap)
{
    if (!cap)
        return;
    size_t o = 0, i = 0;
    int first = 1;
#define PUT(c)                                                                               \
    do {                                                                                     \
        if (o + 1 < cap)                                                                     \
            out[o++] = (c);                                                                  \
    } while (0)
    PUT('{');
    while (i + 2 <= len) {
        size_t nl = (size_t)l[i] | (size_t)l[i + 1] << 8;
        if (i + 2 + nl + 2 > len)
            break;
        const uint8_t *name = l + i + 2;
        size_t vl = (size_t)l[i + 2 + nl] | (size_t)l[i + 3 + nl] << 8;
        if (i + 4 + nl + vl > len)
            break;
        const uint8_t *val = l + i + 4 + nl;
        if (!first) {
            PUT(',');
            PUT(' ');
        }
        first = 0;
        for (size_t k = 0; k < nl; k++)
            PUT((char)name[k]);
        PUT('=');
        PUT('"');
        for (size_t k = 0; k < vl; k++) {
            if (val[k] == '"' || val[k] == '\\')
                PUT('\\');
            PUT((char)(val[k] >= 0x20 ? val[k] : '?'));
        }
        PUT('"');
        i += 4 + nl + vl;
    }
    PUT('}');
#undef PUT
    if (o + 1 >= cap && cap > 4)
        memcpy(out + cap - 4, "...", 3), o = cap - 1;
    out[o] = 0;
}

/* ---- shard access ----------------------------------------------------------------------- */

typedef struct shard_view {
    const seg_hdr *h;
    shard_hdr *sh;
    uint64_t *table;
    series_slot *slots;
    uint8_t *arena;
} shard_view;

static inline shard_view view(const uint8_t *base, uint32_t shard)
{
    shard_view v;
    v.h = cseg_of(base);
    uint8_t *s = shard_at((uint8_t *)base, shard);
    v.sh = (shard_hdr *)s;
    v.table = (uint64_t *)(s + v.h->table_off);
    v.slots = (series_slot *)(s + v.h->slots_off);
    v.arena = s + v.h->arena_off;
    return v;
}

static inline chunk *chunk_at(const shard_view *v, uint64_t off) { return (chunk *)(v->arena + off); }

/* Any process: the slot holding these labels, or -1. */
static int64_t lookup(const shard_view *v, uint64_t hash, const uint8_t *labels, uint32_t len)
{
    uint64_t mask = v->h->table_size - 1;
    for (uint64_t i = hash & mask, n = 0; n <= mask; i = (i + 1) & mask, n++) {
        /* Acquire: pairs with the owner's release of the entry; the slot it names is
           complete. */
        uint64_t e = __atomic_load_n(&v->table[i], __ATOMIC_ACQUIRE);
        if (!e)
            return -1;
        if ((e >> 32) != (hash >> 32))
            continue;
        uint64_t slot = (e & 0xffffffffu) - 1;
        if (slot >= v->h->slot_cap)
            return -1;
        const series_slot *s = &v->slots[slot];
        if (s->hash == hash && s->labels_len == len &&
            memcmp(v->arena + s->labels_off, labels, len) == 0)
            return (int64_t)slot;
    }
    return -1;
}

static void table_insert(const shard_view *v, uint64_t hash, uint64_t slot)
{
    uint64_t mask = v->h->table_size - 1;
    for (uint64_t i = hash & mask;; i = (i + 1) & mask) {
        if (!v->table[i]) {
            /* Release: the slot's fields (and nseries) are visible before the entry that
               lets a reader find them. */
            __atomic_store_n(&v->table[i], ((hash >> 32) << 32) | (slot + 1), __ATOMIC_RELEASE);
            return;
        }
    }
}

static uint64_t arena_alloc(const shard_view *v, uint64_t n)
{
    uint64_t used = v->sh->arena_used;
    if (used + n > v->h->p.arena_bytes)
        return 0;
    /* Relaxed: only the owner allocates; readers load it for statistics only. */
    __atomic_store_n(&v->sh->arena_used, used + n, __ATOMIC_RELAXED);
    return used;
}

static int64_t create_series(const shard_view *v, const m3_rec *r, const uint8_t *labels)
{
    uint32_t n = v->sh->nseries;
    if (n >= v->h->slot_cap)
        return -1;
    uint64_t off = arena_alloc(v, round8(r->labels_len));
    if (!off)
        return -1;
    memcpy(v->arena + off, labels, r->labels_len);
    series_slot *s = &v->slots[n];
    memset(s, 0, sizeof *s);
    s->hash = r->hash;
    s->labels_off = off;
    s->labels_len = r->labels_len;
    s->nlabels = r->nlabels;
    s->tenant = r->tenant;
    s->vtype = r->vtype;
    s->gen = 1;
    /* Release: the slot and its labels are visible before a reader iterating [0, nseries)
       reaches it. */
    __atomic_store_n(&v->sh->nseries, n + 1, __ATOMIC_RELEASE);
    table_insert(v, r->hash, n);
    return n;
}

static inline int64_t block_of(int64_t ts, int64_t bms)
{
    int64_t q = ts / bms;
    if (ts % bms < 0)
        q--;
    return q * bms;
}

/* A new chunk for stream `stream` of block `bs`, linked at the end of the chain. */
static chunk *new_chunk(const shard_view *v, series_slot *s, int64_t bs, uint64_t *off_out)
{
    uint64_t off = arena_alloc(v, M3_CHUNK_BYTES);
    if (!off)
        return NULL;
    chunk *c = chunk_at(v, off);
    memset(c, 0, CHUNK_BUF_OFF);
    c->block_start = bs;
    c->stream = s->next_stream++;
    c->cap = (uint32_t)(M3_CHUNK_BYTES - CHUNK_BUF_OFF);
    tsz_enc_init(&c->enc, c->buf, c->cap);
    if (s->last)
        /* Release: the initialised chunk is visible before the link a reader follows. */
        __atomic_store_n(&chunk_at(v, s->last)->next, off, __ATOMIC_RELEASE);
    else
        /* Release: as above, for the first chunk of the series. */
        __atomic_store_n(&s->head, off, __ATOMIC_RELEASE);
    s->last = off;
    *off_out = off;
    return c;
}

/* Put chunk `off` into the open set, evicting the oldest-block, lowest-stream entry. */
static void open_add(const shard_view *v, series_slot *s, uint64_t off)
{
    int victim = -1;
    for (int k = 0; k < M3_OPEN_STREAMS; k++) {
        if (!s->open[k]) {
            s->open[k] = off;
            return;
        }
        if (victim < 0) {
            victim = k;
            continue;
        }
        chunk *a = chunk_at(v, s->open[k]), *b = chunk_at(v, s->open[victim]);
        if (a->block_start < b->block_start ||
            (a->block_start == b->block_start && a->stream < b->stream))
            victim = k;
    }
    s->open[victim] = off;
}

static int apply_samples(const shard_view *v, series_slot *s, const int64_t *ts,
                         const double *vals, uint32_t n)
{
    int64_t bms = v->h->p.block_ms;
    uint32_t i = 0;
    uint64_t ooo = 0;
    while (i < n) {
        int64_t bs = block_of(ts[i], bms);
        /* first fit: the lowest-numbered open stream of this block that ends before ts[i] */
        int best = -1;
        int lower_open = 0;
        for (int k = 0; k < M3_OPEN_STREAMS; k++) {
            if (!s->open[k])
                continue;
            chunk *c = chunk_at(v, s->open[k]);
            if (c->block_start != bs)
                continue;
            if (c->enc.count && (int64_t)c->enc.prev_ts >= ts[i])
                continue;
            if (best < 0 || c->stream < chunk_at(v, s->open[best])->stream)
                best = k;
        }
        uint64_t off;
        chunk *c;
        if (best < 0) {
            c = new_chunk(v, s, bs, &off);
            if (!c)
                return M3_ENOSPC;
            open_add(v, s, off);
        } else {
            off = s->open[best];
            c = chunk_at(v, off);
        }
        /* The run that first fit would also put here: same block, increasing, and not
           above the last timestamp of any lower open stream of the block. */
        int64_t bound = INT64_MAX;
        for (int k = 0; k < M3_OPEN_STREAMS; k++) {
            if (!s->open[k] || s->open[k] == off)
                continue;
            chunk *o = chunk_at(v, s->open[k]);
            if (o->block_start == bs && o->stream < c->stream && o->enc.count) {
                lower_open = 1;
                if ((int64_t)o->enc.prev_ts < bound)
                    bound = (int64_t)o->enc.prev_ts;
            }
        }
        uint32_t j = i + 1;
        while (j < n && ts[j] > ts[j - 1] && ts[j] <= bound && ts[j] - bs < bms && ts[j] >= bs)
            j++;
        size_t done = 0;
        int rc = tsz_enc_append_many(&c->enc, c->buf, c->cap, ts + i, vals + i, j - i, &done);
        if (lower_open || c->stream != 0)
            ooo += done;
        i += (uint32_t)done;
        if (rc == M3_ENOSPC) {
            /* close the full chunk; the next sample opens a new stream */
            for (int k = 0; k < M3_OPEN_STREAMS; k++)
                if (s->open[k] == off)
                    s->open[k] = 0;
        } else if (rc) {
            return rc;
        }
    }
    __atomic_store_n(&v->sh->samples, v->sh->samples + n, __ATOMIC_RELAXED);
    __atomic_store_n(&v->sh->ooo_samples, v->sh->ooo_samples + ooo, __ATOMIC_RELAXED);
    return M3_OK;
}

int m3_shard_apply_rec(uint8_t *base, const m3_rec *r)
{
    shard_view v = view(base, r->shard);
    const uint8_t *labels = (const uint8_t *)(r + 1);
    const int64_t *ts = (const int64_t *)(labels + round8(r->labels_len));
    const double *vals = (const double *)(ts + r->nsamples);
    int64_t slot = lookup(&v, r->hash, labels, r->labels_len);
    if (slot < 0)
        slot = create_series(&v, r, labels);
    int rc = slot < 0 ? M3_ENOSPC : apply_samples(&v, &v.slots[slot], ts, vals, r->nsamples);
    if (rc)
        __atomic_store_n(&v.sh->dropped, v.sh->dropped + 1, __ATOMIC_RELAXED);
    return rc;
}

int m3_shard_apply(uint8_t *base, const m3_rec *rec)
{
    if (!base || !rec || m3_rec_check(rec, rec->len, cseg_of(base)->p.num_shards))
        return M3_EINVAL;
    return m3_shard_apply_rec(base, rec);
}

int m3_shard_apply_batch(uint8_t *base, const uint8_t *batch, size_t len, uint64_t seq,
                         uint32_t lo, uint32_t hi)
{
    const seg_hdr *h = cseg_of(base);
    size_t off = 0;
    int n = 0;
    (void)seq;
    while (off < len) {
        if (off % 8)
            return M3_ECORRUPT;
        const m3_rec *r = (const m3_rec *)(batch + off);
        int rc = m3_rec_check(r, len - off, h->p.num_shards);
        if (rc)
            return rc;
        if (r->shard >= lo && r->shard < hi) {
            m3_shard_apply_rec(base, r);
            n++;
        }
        off += r->len;
    }
    return n;
}

int m3_shard_recover(uint8_t *base, uint32_t shard)
{
    const seg_hdr *h = cseg_of(base);
    if (shard >= h->p.num_shards)
        return M3_EINVAL;
    shard_view v = view(base, shard);
    uint32_t n = v.sh->nseries;
    if (n) {
        series_slot *s = &v.slots[n - 1];
        if (lookup(&v, s->hash, v.arena + s->labels_off, s->labels_len) != (int64_t)(n - 1))
            table_insert(&v, s->hash, n - 1);
    }
    for (uint32_t i = 0; i < n; i++) {
        series_slot *s = &v.slots[i];
        uint64_t off = s->head, last = 0;
        while (off) {
            last = off;
            off = chunk_at(&v, off)->next;
        }
        s->last = last;
        for (int k = 0; k < M3_OPEN_STREAMS; k++) {
            if (!s->open[k])
                continue;
            chunk *c = chunk_at(&v, s->open[k]);
            if (c->stream >= s->next_stream)
                s->next_stream = c->stream + 1;
            if (tsz_enc_resume(&c->enc, c->buf, c->cap) != M3_OK)
                s->open[k] = 0; /* unreadable: never append to it again */
        }
        /* next_stream must exceed every stream of the chain, open or not */
        for (off = s->head; off; off = chunk_at(&v, off)->next)
            if (chunk_at(&v, off)->stream >= s->next_stream)
                s->next_stream = chunk_at(&v, off)->stream + 1;
    }
    return M3_OK;
}

void m3_shard_set_recovered(uint8_t *base, uint32_t shard, uint32_t val)
{
    if (shard >= cseg_of(base)->p.num_shards)
        return;
    /* Release: everything replayed into the shard is visible before the flag. */
    __atomic_store_n(&view(base, shard).sh->recovered, val, __ATOMIC_RELEASE);
}

void m3_shard_stats_get(const uint8_t *base, uint32_t shard, m3_shard_stats *out)
{
    memset(out, 0, sizeof *out);
    if (shard >= cseg_of(base)->p.num_shards)
        return;
    shard_view v = view(base, shard);
    out->nseries = __atomic_load_n(&v.sh->nseries, __ATOMIC_ACQUIRE);
    out->arena_used = __atomic_load_n(&v.sh->arena_used, __ATOMIC_RELAXED);
    out->arena_bytes = v.h->p.arena_bytes;
    out->samples = __atomic_load_n(&v.sh->samples, __ATOMIC_RELAXED);
    out->ooo_samples = __atomic_load_n(&v.sh->ooo_samples, __ATOMIC_RELAXED);
    out->dropped = __atomic_load_n(&v.sh->dropped, __ATOMIC_RELAXED);
    /* Acquire: pairs with m3_shard_set_recovered. */
    out->recovered = __atomic_load_n(&v.sh->recovered, __ATOMIC_ACQUIRE);
}

size_t m3_batch_admit(const uint8_t *base, uint8_t *batch, size_t len, uint32_t *rejected,
                      uint32_t *rejected_samples, char *msg, size_t msg_cap)
{
    const seg_hdr *h = cseg_of(base);
    size_t in = 0, out = 0;
    uint32_t nrej = 0, nrej_s = 0;
    if (msg && msg_cap)
        msg[0] = 0;
    while (in < len) {
        m3_rec *r = (m3_rec *)(batch + in);
        if (m3_rec_check(r, len - in, h->p.num_shards))
            break; /* malformed tail: m3_lane_reserve will refuse it */
        uint32_t rl = r->len;
        shard_view v = view(base, r->shard);
        uint64_t used = __atomic_load_n(&v.sh->arena_used, __ATOMIC_RELAXED);
        uint64_t ab = h->p.arena_bytes;
        int reject = 0;
        if (used >= ab - ab / 16) {
            reject = 1;
        } else if (used >= ab - ab / 8 ||
                   __atomic_load_n(&v.sh->nseries, __ATOMIC_ACQUIRE) >=
                       h->p.series_per_shard) {
            reject = lookup(&v, r->hash, (const uint8_t *)(r + 1), r->labels_len) < 0 ? 2 : 0;
        }
        if (reject) {
            if (!nrej && msg && msg_cap) {
                char lab[256];
                m3_labels_format((const uint8_t *)(r + 1), r->labels_len, lab, sizeof lab);
                if (reject == 1)
                    snprintf(msg, msg_cap,
                             "series %s: shard %u is out of memory (arena_bytes=%llu per "
                             "shard, %llu used)", lab, r->shard, (unsigned long long)ab,
                             (unsigned long long)used);
                else
                    snprintf(msg, msg_cap,
                             "series %s: new series refused, shard %u is full "
                             "(series_per_shard=%u, arena_bytes=%llu)", lab, r->shard,
                             h->p.series_per_shard, (unsigned long long)ab);
            }
            nrej++;
            nrej_s += r->nsamples;
        } else {
            if (out != in)
                memmove(batch + out, batch + in, rl);
            out += rl;
        }
        in += rl;
    }
    if (rejected)
        *rejected = nrej;
    if (rejected_samples)
        *rejected_samples = nrej_s;
    return out;
}

uint32_t m3_shard_nseries(const uint8_t *base, uint32_t shard)
{
    if (shard >= cseg_of(base)->p.num_shards)
        return 0;
    /* Acquire: pairs with create_series; slots below the count are complete. */
    return __atomic_load_n(&view(base, shard).sh->nseries, __ATOMIC_ACQUIRE);
}

int m3_series_labels(const uint8_t *base, uint32_t shard, uint32_t slot,
                     const uint8_t **labels, uint32_t *len)
{
    if (slot >= m3_shard_nseries(base, shard))
        return M3_EINVAL;
    shard_view v = view(base, shard);
    *labels = v.arena + v.slots[slot].labels_off;
    *len = v.slots[slot].labels_len;
    return M3_OK;
}

uint64_t m3_series_count(const uint8_t *base, uint32_t shard, uint32_t slot)
{
    if (slot >= m3_shard_nseries(base, shard))
        return 0;
    shard_view v = view(base, shard);
    uint64_t total = 0;
    /* Acquire (each link): pairs with new_chunk's release; the chunk is initialised. */
    for (uint64_t off = __atomic_load_n(&v.slots[slot].head, __ATOMIC_ACQUIRE); off;
         off = __atomic_load_n(&chunk_at(&v, off)->next, __ATOMIC_ACQUIRE)) {
        chunk *c = chunk_at(&v, off);
        uint32_t cnt = 0;
        if (tsz_count(c->buf, c->cap, &cnt) == M3_OK)
            total += cnt;
    }
    return total;
}

typedef struct triple {
    int64_t ts;
    uint64_t stream;
    double v;
} triple;

static int cmp_triple(const void *a, const void *b)
{
    const triple *x = a, *y = b;
    if (x->ts != y->ts)
        return x->ts < y->ts ? -1 : 1;
    return x->stream < y->stream ? -1 : x->stream > y->stream;
}

int m3_series_read(const uint8_t *base, uint32_t shard, uint32_t slot, int64_t mint,
                   int64_t maxt, int64_t *ts, double *vals, size_t cap, size_t *n)
{
    if (!n)
        return M3_EINVAL;
    *n = 0;
    if (slot >= m3_shard_nseries(base, shard))
        return M3_EINVAL;
    shard_view v = view(base, shard);
    int64_t bms = v.h->p.block_ms;
    uint64_t bound = m3_series_count(base, shard, slot) + 1;
    triple *all = malloc(bound * sizeof *all);
    int64_t *tbuf = malloc(sizeof(int64_t) * (M3_CHUNK_BYTES * 8 / 2 + 2));
    double *vbuf = malloc(sizeof(double) * (M3_CHUNK_BYTES * 8 / 2 + 2));
    if (!all || !tbuf || !vbuf) {
        free(all), free(tbuf), free(vbuf);
        return M3_ENOSPC;
    }
    size_t m = 0;
    int rc = M3_OK;
    /* Acquire (each link): pairs with new_chunk's release; the chunk is initialised. */
    for (uint64_t off = __atomic_load_n(&v.slots[slot].head, __ATOMIC_ACQUIRE); off;
         off = __atomic_load_n(&chunk_at(&v, off)->next, __ATOMIC_ACQUIRE)) {
        chunk *c = chunk_at(&v, off);
        if (c->block_start > maxt || c->block_start + bms <= mint)
            continue;
        /* tsz_decode loads the published count with acquire (codec.c) */
        int64_t dec = tsz_decode(c->buf, c->cap, tbuf, vbuf, M3_CHUNK_BYTES * 8 / 2 + 2);
        if (dec < 0) {
            rc = (int)dec;
            break;
        }
        size_t got = (size_t)dec;
        if (m + got > bound) { /* the owner appended since we counted */
            bound = 2 * (m + got);
            triple *grown = realloc(all, bound * sizeof *all);
            if (!grown) {
                rc = M3_ENOSPC;
                break;
            }
            all = grown;
        }
        for (size_t i = 0; i < got; i++)
            if (tbuf[i] >= mint && tbuf[i] <= maxt)
                all[m++] = (triple){tbuf[i], c->stream, vbuf[i]};
    }
    free(tbuf);
    free(vbuf);
    if (rc) {
        free(all);
        return rc;
    }
    qsort(all, m, sizeof *all, cmp_triple);
    size_t o = 0;
    for (size_t i = 0; i < m; i++) {
        if (i + 1 < m && all[i + 1].ts == all[i].ts)
            continue; /* a later write of the same timestamp wins */
        if (o >= cap) {
            rc = M3_ENOSPC;
            break;
        }
        ts[o] = all[i].ts;
        vals[o] = all[i].v;
        o++;
    }
    free(all);
    *n = o;
    return rc;
}
