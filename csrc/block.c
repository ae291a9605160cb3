/*
 * block.c -- the life cycle of a shard's open blocks: listing, sealing, encoding for a flush,
 * releasing, and expiring series that have nothing left (docs/formats/shm.md, "Blocks").
 *
 * A block is (block start, kind) of one shard: every chunk whose block_start is that start,
 * warm or cold (CHUNK_COLD: created after the shard's warm floor had passed the block, i.e.
 * after the block was sealed warm once). The flush side drives it:
 *
 *   seal      (owner, under the shard lock) sets CHUNK_SEALED on the block's unsealed chunks
 *             of that kind and drops them from their series' open streams, so nothing is
 *             appended to them again; sealing warm also raises the warm floor past the block,
 *             so any later sample of it (a late warm write, a cold write, a replayed record)
 *             starts a new cold chunk. The release store of the flag publishes the chunk's
 *             final count to the encoder.
 *   encode    (any thread, in a read section) visits live slots in order; for each series
 *             with sealed chunks of the block it decodes them, sorts by (timestamp, stream),
 *             keeps the last of equal timestamps (the write-order rule of series.c) and
 *             writes one tsz stream plus an index entry. Sealed chunks never change, so the
 *             result does not depend on the owner's progress. It stops when the caller's
 *             buffers are full and resumes from *cursor.
 *   release   (owner, under the lock) unlinks exactly the sealed chunks of the block from
 *             their chains (release stores of the predecessor's `next` / the slot's `head`;
 *             a reader already on one still follows its intact `next`), then hands them to
 *             arena.c, which reuses them only after every reader has left its section.
 *             Unsealed chunks are never released: whatever arrived after the seal stays.
 *   expire    (owner, under the lock) removes live series with no chunks whose newest sample
 *             is older than a cut-off: table entry (seqlock'd backward shift), state RETIRED,
 *             slot and labels to limbo; the slot comes back with gen + 1.
 *
 * A flush that dies anywhere before release loses nothing (the chunks stay, sealed, and are
 * listed, encoded and released by the next attempt); seal and release are idempotent.
 */
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "seg_int.h"

#define DEC_CAP (M3_CHUNK_BYTES * 8 / 2 + 2) /* most samples one chunk can hold */

static inline uint32_t kind_of(uint32_t flags) { return (flags & CHUNK_COLD) ? M3_BLK_COLD : M3_BLK_WARM; }

static inline uint32_t chunk_flags(const chunk *c)
{
    /* Acquire: pairs with the owner's release in m3_block_seal; a sealed chunk's stream is
       final. */
    return __atomic_load_n(&c->flags, __ATOMIC_ACQUIRE);
}

static inline uint32_t live(const series_slot *s)
{
    /* Acquire: pairs with create_series' release of SLOT_LIVE. */
    return __atomic_load_n(&s->state, __ATOMIC_ACQUIRE) == SLOT_LIVE;
}

static inline uint64_t first_chunk(const series_slot *s)
{
    /* Acquire: pairs with the release that linked the chunk; it is initialised. */
    return __atomic_load_n(&s->head, __ATOMIC_ACQUIRE);
}

static inline uint64_t next_chunk(const chunk *c)
{
    /* Acquire: as above, for the following link. */
    return __atomic_load_n(&c->next, __ATOMIC_ACQUIRE);
}

/* ---- listing ---------------------------------------------------------------------------- */

typedef struct blk_acc {
    m3_block_info info;
    uint32_t last_slot; /* slot + 1 that last added to nseries */
} blk_acc;

static int cmp_info(const void *a, const void *b)
{
    const m3_block_info *x = a, *y = b;
    if (x->block_start != y->block_start)
        return x->block_start < y->block_start ? -1 : 1;
    return (x->kind > y->kind) - (x->kind < y->kind);
}

int m3_shard_blocks(const uint8_t *base, uint32_t shard, m3_block_info *out, size_t cap,
                    size_t *n)
{
    if (!base || !n || shard >= cseg_of(base)->p.num_shards)
        return M3_EINVAL;
    *n = 0;
    shard_view v = shard_view_of(base, shard);
    size_t na = 0, ca = 16;
    blk_acc *acc = malloc(ca * sizeof *acc);
    if (!acc)
        return M3_ENOSPC;
    uint32_t ns = m3_shard_nseries(base, shard);
    for (uint32_t i = 0; i < ns; i++) {
        const series_slot *s = &v.slots[i];
        if (!live(s))
            continue;
        for (uint64_t off = first_chunk(s); off; off = next_chunk(chunk_at(&v, off))) {
            const chunk *c = chunk_at(&v, off);
            uint32_t fl = chunk_flags(c), kind = kind_of(fl);
            size_t k = 0;
            while (k < na && (acc[k].info.block_start != c->block_start ||
                              acc[k].info.kind != kind))
                k++;
            if (k == na) {
                if (na == ca) {
                    blk_acc *g = realloc(acc, 2 * ca * sizeof *acc);
                    if (!g) {
                        free(acc);
                        return M3_ENOSPC;
                    }
                    acc = g;
                    ca *= 2;
                }
                memset(&acc[na], 0, sizeof acc[na]);
                acc[na].info.block_start = c->block_start;
                acc[na].info.kind = kind;
                na++;
            }
            m3_block_info *b = &acc[k].info;
            b->chunks++;
            if (fl & CHUNK_SEALED)
                b->sealed++;
            uint32_t cnt = 0;
            if (tsz_count(c->buf, c->cap, &cnt) == M3_OK)
                b->samples += cnt;
            if (acc[k].last_slot != i + 1) {
                acc[k].last_slot = i + 1;
                b->nseries++;
            }
        }
    }
    m3_block_info *tmp = malloc((na ? na : 1) * sizeof *tmp);
    if (!tmp) {
        free(acc);
        return M3_ENOSPC;
    }
    for (size_t k = 0; k < na; k++)
        tmp[k] = acc[k].info;
    free(acc);
    qsort(tmp, na, sizeof *tmp, cmp_info);
    size_t m = na < cap ? na : cap;
    if (out && m)
        memcpy(out, tmp, m * sizeof *tmp);
    free(tmp);
    *n = na;
    return na > cap ? M3_ENOSPC : M3_OK;
}

/* ---- seal --------------------------------------------------------------------------------- */

static int matches(const chunk *c, int64_t bs, uint32_t kind)
{
    return c->block_start == bs && kind_of(c->flags) == kind;
}

int m3_block_seal(uint8_t *base, uint32_t shard, int64_t bs, uint32_t kind)
{
    if (!base || shard >= cseg_of(base)->p.num_shards || kind > M3_BLK_COLD)
        return M3_EINVAL;
    m3_shard_lock(base, shard);
    shard_view v = shard_view_of(base, shard);
    if (kind == M3_BLK_WARM && bs + v.h->p.block_ms > v.sh->warm_floor)
        /* Relaxed: read by the owner (under the lock) and by statistics. */
        __atomic_store_n(&v.sh->warm_floor, bs + v.h->p.block_ms, __ATOMIC_RELAXED);
    int sealed = 0;
    for (uint32_t i = 0; i < v.sh->nseries; i++) {
        series_slot *s = &v.slots[i];
        if (s->state != SLOT_LIVE)
            continue;
        for (int k = 0; k < M3_OPEN_STREAMS; k++)
            if (s->open[k] && matches(chunk_at(&v, s->open[k]), bs, kind))
                s->open[k] = 0;
        for (uint64_t off = s->head; off; off = chunk_at(&v, off)->next) {
            chunk *c = chunk_at(&v, off);
            if (!matches(c, bs, kind) || (c->flags & CHUNK_SEALED))
                continue;
            /* Release: every append to the chunk happened before a reader sees it sealed. */
            __atomic_store_n(&c->flags, c->flags | CHUNK_SEALED, __ATOMIC_RELEASE);
            sealed++;
        }
    }
    m3_shard_unlock(base, shard);
    return sealed;
}

void m3_shard_set_warm_floor(uint8_t *base, uint32_t shard, int64_t floor_ms)
{
    if (!base || shard >= cseg_of(base)->p.num_shards)
        return;
    m3_shard_lock(base, shard);
    shard_view v = shard_view_of(base, shard);
    if (floor_ms > v.sh->warm_floor)
        /* Relaxed: as in m3_block_seal. */
        __atomic_store_n(&v.sh->warm_floor, floor_ms, __ATOMIC_RELAXED);
    m3_shard_unlock(base, shard);
}

/* ---- encode ------------------------------------------------------------------------------- */

typedef struct sample3 {
    int64_t ts;
    uint64_t stream;
    double v;
} sample3;

static int cmp_sample3(const void *a, const void *b)
{
    const sample3 *x = a, *y = b;
    if (x->ts != y->ts)
        return x->ts < y->ts ? -1 : 1;
    return (x->stream > y->stream) - (x->stream < y->stream);
}

typedef struct enc_scratch {
    sample3 *all;
    size_t cap;
    int64_t *ts;
    double *v;
    size_t vcap;
} enc_scratch;

static int grow(enc_scratch *w, size_t need)
{
    if (need > w->cap) {
        size_t c = w->cap ? w->cap : 1024;
        while (c < need)
            c *= 2;
        sample3 *g = realloc(w->all, c * sizeof *g);
        if (!g)
            return M3_ENOSPC;
        w->all = g;
        w->cap = c;
    }
    if (need > w->vcap) {
        size_t c = w->cap;
        int64_t *t = realloc(w->ts, c * sizeof *t);
        if (t)
            w->ts = t;
        double *d = realloc(w->v, c * sizeof *d);
        if (d)
            w->v = d;
        if (!t || !d)
            return M3_ENOSPC;
        w->vcap = c;
    }
    return M3_OK;
}

/* Merged samples of slot s's sealed chunks of (bs, kind) into w->ts/w->v; returns the count
   or a negative m3_err. */
static int64_t merge_series(const shard_view *v, const series_slot *s, int64_t bs,
                            uint32_t kind, enc_scratch *w)
{
    int64_t tb[DEC_CAP];
    double vb[DEC_CAP];
    size_t m = 0;
    for (uint64_t off = first_chunk(s); off; off = next_chunk(chunk_at(v, off))) {
        const chunk *c = chunk_at(v, off);
        uint32_t fl = chunk_flags(c);
        if (c->block_start != bs || kind_of(fl) != kind || !(fl & CHUNK_SEALED))
            continue;
        int64_t got = tsz_decode(c->buf, c->cap, tb, vb, DEC_CAP);
        if (got < 0)
            return got;
        if (grow(w, m + (size_t)got))
            return M3_ENOSPC;
        for (int64_t i = 0; i < got; i++)
            w->all[m++] = (sample3){tb[i], c->stream, vb[i]};
    }
    if (!m)
        return 0;
    qsort(w->all, m, sizeof *w->all, cmp_sample3);
    size_t o = 0;
    for (size_t i = 0; i < m; i++) {
        if (i + 1 < m && w->all[i + 1].ts == w->all[i].ts)
            continue; /* a later write of the same timestamp wins */
        w->ts[o] = w->all[i].ts;
        w->v[o] = w->all[i].v;
        o++;
    }
    return (int64_t)o;
}

int m3_block_encode(const uint8_t *base, uint32_t shard, int64_t bs, uint32_t kind,
                    uint32_t *cursor, uint8_t *out, size_t cap, size_t *used,
                    m3_flush_entry *idx, size_t idx_cap, size_t *n)
{
    if (!base || !cursor || !used || !n || (!out && cap) || (!idx && idx_cap) ||
        shard >= cseg_of(base)->p.num_shards || kind > M3_BLK_COLD)
        return M3_EINVAL;
    *used = 0;
    *n = 0;
    shard_view v = shard_view_of(base, shard);
    uint32_t ns = m3_shard_nseries(base, shard);
    enc_scratch w = {0};
    int rc = 0;
    uint32_t i = *cursor;
    for (; i < ns; i++) {
        const series_slot *s = &v.slots[i];
        if (!live(s))
            continue;
        int64_t cnt = merge_series(&v, s, bs, kind, &w);
        if (cnt < 0) {
            rc = (int)cnt;
            break;
        }
        if (!cnt)
            continue;
        size_t loff = round8(*used), llen = s->labels_len;
        size_t doff = round8(loff + llen);
        size_t dlen = 0;
        int full = *n >= idx_cap || doff + TSZ_HEADER_BYTES > cap;
        if (!full) {
            int e = tsz_encode(w.ts, w.v, (size_t)cnt, out + doff, cap - doff, &dlen);
            if (e == M3_ENOSPC)
                full = 1;
            else if (e) {
                rc = e;
                break;
            }
        }
        if (full) {
            rc = *n ? 1 : M3_ENOSPC;
            break;
        }
        memcpy(out + loff, v.arena + s->labels_off, llen);
        m3_flush_entry *e = &idx[(*n)++];
        e->slot = i;
        e->gen = s->gen;
        e->hash = s->hash;
        e->labels_off = loff;
        e->labels_len = (uint32_t)llen;
        e->count = (uint32_t)cnt;
        e->data_off = doff;
        e->data_len = dlen;
        e->mint = w.ts[0];
        e->maxt = w.ts[cnt - 1];
        *used = doff + dlen;
    }
    free(w.all);
    free(w.ts);
    free(w.v);
    *cursor = i;
    return rc;
}

/* ---- release and expire ------------------------------------------------------------------ */

int m3_block_release(uint8_t *base, uint32_t shard, int64_t bs, uint32_t kind)
{
    if (!base || shard >= cseg_of(base)->p.num_shards || kind > M3_BLK_COLD)
        return M3_EINVAL;
    m3_shard_lock(base, shard);
    shard_view v = shard_view_of(base, shard);
    int released = 0;
    for (uint32_t i = 0; i < v.sh->nseries; i++) {
        series_slot *s = &v.slots[i];
        if (s->state != SLOT_LIVE)
            continue;
        uint64_t prev = 0;
        for (uint64_t off = s->head; off;) {
            chunk *c = chunk_at(&v, off);
            uint64_t next = c->next;
            if (!matches(c, bs, kind) || !(c->flags & CHUNK_SEALED)) {
                prev = off;
                off = next;
                continue;
            }
            if (prev)
                /* Release: readers that reach prev from now on skip c; the chunk after c
                   is initialised (it was linked with a release store before). */
                __atomic_store_n(&chunk_at(&v, prev)->next, next, __ATOMIC_RELEASE);
            else
                /* Release: as above, for the series' first chunk. */
                __atomic_store_n(&s->head, next, __ATOMIC_RELEASE);
            if (s->last == off)
                s->last = prev;
            for (int k = 0; k < M3_OPEN_STREAMS; k++)
                if (s->open[k] == off)
                    s->open[k] = 0;
            /* a crash here leaks this one chunk */
            arena_pend_chunk(&v, off);
            released++;
            off = next;
        }
    }
    arena_retire_pending(&v);
    arena_reclaim(&v, 0);
    m3_shard_unlock(base, shard);
    return released;
}

int m3_shard_reclaim(uint8_t *base, uint32_t shard)
{
    if (!base || shard >= cseg_of(base)->p.num_shards)
        return M3_EINVAL;
    m3_shard_lock(base, shard);
    shard_view v = shard_view_of(base, shard);
    arena_retire_pending(&v);
    int n = arena_reclaim(&v, 1);
    m3_shard_unlock(base, shard);
    return n;
}

int m3_shard_expire_series(uint8_t *base, uint32_t shard, int64_t idle_before_ms)
{
    if (!base || shard >= cseg_of(base)->p.num_shards)
        return M3_EINVAL;
    m3_shard_lock(base, shard);
    shard_view v = shard_view_of(base, shard);
    int removed = 0;
    for (uint32_t i = 0; i < v.sh->nseries; i++) {
        series_slot *s = &v.slots[i];
        if (s->state != SLOT_LIVE || s->head || s->max_ts >= idle_before_ms)
            continue;
        v.sh->expiring = i + 1;
        m3_series_unlink_table(&v, i);
        /* Release: (readers iterating slots skip it from now on) */
        __atomic_store_n(&s->state, SLOT_RETIRED, __ATOMIC_RELEASE);
        __atomic_store_n(&v.sh->live, v.sh->live - 1, __ATOMIC_RELAXED);
        arena_pend_slot(&v, i);
        v.sh->expiring = 0;
        removed++;
    }
    arena_retire_pending(&v);
    arena_reclaim(&v, 0);
    m3_shard_unlock(base, shard);
    return removed;
}
