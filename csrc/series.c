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
 *   chunks      a series' samples live in a chain of chunks allocated by arena.c: the first
 *               of each block CHUNK_FIRST_BYTES, later ones M3_CHUNK_BYTES (readers use
 *               cap). A chunk is initialised, then linked by a release store of the
 *               previous chunk's `next` (or the slot's `head`). Chunks leave a chain only
 *               through m3_block_release (block.c) and labels and slots only through
 *               m3_shard_expire_series; both hand them to arena.c, which reuses them only
 *               after every reader has left the read section it was in (epoch.c). So a
 *               reader inside a section never looks at reused memory.
 *   slots       a slot is FREE, LIVE or RETIRED (state, release-stored). Readers iterate
 *               [0, nseries) and skip slots that are not live; a reused slot gets gen + 1.
 *   deletion    a series leaves the table by backward-shift deletion (no tombstones, so
 *               probes stay short under churn) inside a seqlock (table_seq odd while entries
 *               move); a reader's lookup that misses while the sequence moved looks again.
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
 * attach: encoder states torn mid-append (tsz_enc_resume), chain ends not yet recorded, a
 * series being created or expired (the shard header names it), a retire cut short (arena.c).
 * At most one object in flight leaks per crash (allocated, never linked); that is harmless.
 *
 * Threads: only the owner process writes a shard, but several of its threads may (the drain
 * thread applies, a flush thread seals and releases), so every writer holds the shard lock
 * (owner_lock, a spin lock in the shard header). A killed owner cannot leave it held for
 * anyone but its own next incarnation, whose m3_shard_recover resets it.
 *
 * The label hash (m3_labels_hash, "m3hash64 v1") decides each series' shard and is recorded
 * on disk with the shard count, so it must never change.
 */
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <sched.h>

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

void m3_shard_lock(uint8_t *base, uint32_t shard)
{
    uint32_t *l = &shard_view_of(base, shard).sh->owner_lock;
    /* Acquire: the previous holder's writes to the shard happen before ours. */
    while (__atomic_exchange_n(l, 1, __ATOMIC_ACQUIRE))
        while (__atomic_load_n(l, __ATOMIC_RELAXED))
            sched_yield();
}

void m3_shard_unlock(uint8_t *base, uint32_t shard)
{
    /* Release: our writes to the shard happen before the next holder's. */
    __atomic_store_n(&shard_view_of(base, shard).sh->owner_lock, 0, __ATOMIC_RELEASE);
}

static inline uint32_t slot_state(const series_slot *s)
{
    /* Acquire: pairs with the owner's release of SLOT_LIVE; the slot's fields and labels are
       complete. */
    return __atomic_load_n(&s->state, __ATOMIC_ACQUIRE);
}

/* The slot holding these labels, or -1 (one pass over the table). */
static int64_t lookup_once(const shard_view *v, uint64_t hash, const uint8_t *labels,
                           uint32_t len)
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

/* Owner: exact. Other processes: a miss is retried while the owner was moving entries. */
static int64_t lookup(const shard_view *v, uint64_t hash, const uint8_t *labels, uint32_t len)
{
    for (int tries = 0; tries < 1000; tries++) {
        /* Acquire: pairs with the owner's final release of table_seq; entries moved before
           it are visible to the probe. */
        uint32_t s1 = __atomic_load_n(&v->sh->table_seq, __ATOMIC_ACQUIRE);
        int64_t r = lookup_once(v, hash, labels, len);
        if (r >= 0)
            return r;
        /* Acquire fence: the probe's loads happen before the second load of the sequence. */
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (!(s1 & 1) && __atomic_load_n(&v->sh->table_seq, __ATOMIC_RELAXED) == s1)
            return -1;
        sched_yield();
    }
    return -1; /* the owner died mid-move; m3_shard_recover rebuilds the table */
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

/* Owner: delete slot's entry by backward shift (Knuth 6.4 algorithm R). */
static void table_remove(const shard_view *v, uint64_t hash, uint32_t slot)
{
    uint64_t mask = v->h->table_size - 1, i = hash & mask;
    for (uint64_t n = 0;; i = (i + 1) & mask, n++) {
        if (!v->table[i] || n > mask)
            return; /* not there */
        if ((v->table[i] & 0xffffffffu) == (uint64_t)slot + 1)
            break;
    }
    uint32_t seq = v->sh->table_seq;
    __atomic_store_n(&v->sh->table_seq, seq + 1, __ATOMIC_RELAXED);
    /* Release fence: the odd sequence is visible before any entry moves (a reader that sees
       a moved entry also sees the sequence changed). */
    __atomic_thread_fence(__ATOMIC_RELEASE);
    for (uint64_t j = i;;) {
        j = (j + 1) & mask;
        uint64_t e = v->table[j];
        if (!e)
            break;
        uint64_t k = v->slots[(e & 0xffffffffu) - 1].hash & mask; /* home of entry j */
        int stays = i <= j ? (i < k && k <= j) : (i < k || k <= j);
        if (stays)
            continue;
        /* Release: the slot named by the moved entry is complete (it was already). */
        __atomic_store_n(&v->table[i], e, __ATOMIC_RELEASE);
        i = j;
    }
    __atomic_store_n(&v->table[i], 0, __ATOMIC_RELAXED);
    /* Release: every move is visible before the even sequence that ends it. */
    __atomic_store_n(&v->sh->table_seq, seq + 2, __ATOMIC_RELEASE);
}

int m3_series_unlink_table(const shard_view *v, uint32_t slot)
{
    table_remove(v, v->slots[slot].hash, slot);
    return M3_OK;
}

static int64_t create_series(const shard_view *v, const m3_rec *r, const uint8_t *labels)
{
    shard_hdr *sh = v->sh;
    uint32_t n = arena_alloc_slot(v);
    if (n == UINT32_MAX)
        return -1;
    int fresh = n == sh->nseries;
    uint64_t off = arena_alloc_labels(v, r->labels_len);
    if (!off) {
        if (!fresh)
            arena_free_slot(v, n);
        return -1;
    }
    sh->creating = n + 1;
    memcpy(v->arena + off, labels, r->labels_len);
    series_slot *s = &v->slots[n];
    uint32_t gen = s->gen + 1;
    /* every field but state, which readers may load at any time (it stays FREE until the
       release store below) */
    memset(&s->next_stream, 0, sizeof *s - offsetof(series_slot, next_stream));
    s->hash = r->hash;
    s->labels_off = off;
    s->labels_len = (uint16_t)r->labels_len;
    s->nlabels = (uint16_t)r->nlabels;
    s->tenant = r->tenant;
    s->vtype = r->vtype;
    s->ns = 0;
    s->gen = gen ? gen : 1;
    s->max_ts = INT64_MIN;
    /* Release: the slot and its labels are visible before a reader that sees it live. */
    __atomic_store_n(&s->state, SLOT_LIVE, __ATOMIC_RELEASE);
    if (fresh)
        /* Release: as above, for a reader iterating [0, nseries). */
        __atomic_store_n(&sh->nseries, n + 1, __ATOMIC_RELEASE);
    table_insert(v, r->hash, n);
    __atomic_store_n(&sh->live, sh->live + 1, __ATOMIC_RELAXED);
    sh->creating = 0;
    return n;
}

/* Owner, under the shard lock: the live slot of these labels, created if absent (-1 when
   the shard has no room). For loaders that hold labels outside a record (snapshot.c). */
int64_t m3_series_find_or_create(const shard_view *v, uint64_t hash, const uint8_t *labels,
                                 uint32_t len, uint32_t nlabels, uint32_t tenant,
                                 uint32_t vtype)
{
    int64_t slot = lookup(v, hash, labels, len);
    if (slot >= 0)
        return slot;
    m3_rec r;
    memset(&r, 0, sizeof r);
    r.hash = hash;
    r.labels_len = len;
    r.nlabels = nlabels;
    r.tenant = tenant;
    r.vtype = (uint16_t)vtype;
    return create_series(v, &r, labels);
}

static inline int64_t block_of(int64_t ts, int64_t bms)
{
    int64_t q = ts / bms;
    if (ts % bms < 0)
        q--;
    return q * bms;
}

/* A new chunk for stream `stream` of block `bs`, linked at the end of the chain. The first
   chunk of a block (the chain's last chunk is of another block, or there is none) is small:
   most series take few samples in a block before it closes or they go idle. */
static chunk *new_chunk(const shard_view *v, series_slot *s, int64_t bs, uint64_t *off_out)
{
    uint32_t bytes = s->last && chunk_at(v, s->last)->block_start == bs ? M3_CHUNK_BYTES
                                                                         : CHUNK_FIRST_BYTES;
    uint64_t off = arena_alloc_chunk(v, bytes);
    if (!off && bytes != M3_CHUNK_BYTES)
        off = arena_alloc_chunk(v, bytes = M3_CHUNK_BYTES); /* only full chunks are free */
    if (!off)
        return NULL;
    chunk *c = chunk_at(v, off);
    memset(c, 0, CHUNK_BUF_OFF);
    c->block_start = bs;
    c->stream = s->next_stream++;
    c->flags = bs < v->sh->warm_floor ? CHUNK_COLD : 0;
    c->cap = (uint16_t)(bytes - CHUNK_BUF_OFF);
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
        if (done && ts[i + done - 1] > s->max_ts)
            /* Relaxed: a statistic for readers (expiry is decided by the owner). */
            __atomic_store_n(&s->max_ts, ts[i + done - 1], __ATOMIC_RELAXED);
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

int64_t m3_series_resolve(const shard_view *v, const m3_rec *r)
{
    const uint8_t *labels = (const uint8_t *)(r + 1);
    int64_t slot = lookup(v, r->hash, labels, r->labels_len);
    if (slot < 0)
        slot = create_series(v, r, labels);
    return slot;
}

int m3_series_append(const shard_view *v, uint32_t slot, const m3_rec *r)
{
    const int64_t *ts = (const int64_t *)((const uint8_t *)(r + 1) + round8(r->labels_len));
    const double *vals = (const double *)(ts + r->nsamples);
    return apply_samples(v, &v->slots[slot], ts, vals, r->nsamples);
}

int m3_shard_apply_rec(uint8_t *base, const m3_rec *r)
{
    shard_view v = shard_view_of(base, r->shard);
    int64_t slot = m3_series_resolve(&v, r);
    if (r->type == M3_REC_ROLLUP_IN) {
        /* Forwarded window values are for the group series' cells (rollup.c), not its blocks:
           here the group series only comes to exist (its slot keys the group's plan), and its
           newest window end keeps an idle expiry from retiring it while inputs arrive. */
        if (slot < 0) {
            __atomic_store_n(&v.sh->dropped, v.sh->dropped + 1, __ATOMIC_RELAXED);
            return M3_ENOSPC;
        }
        series_slot *s = &v.slots[slot];
        const int64_t *ts = (const int64_t *)((const uint8_t *)(r + 1) + round8(r->labels_len));
        for (uint32_t i = 0; i < r->nsamples; i++)
            if (ts[i] > s->max_ts)
                /* Relaxed: a statistic for readers, as in m3_series_append. */
                __atomic_store_n(&s->max_ts, ts[i], __ATOMIC_RELAXED);
        return M3_OK;
    }
    int rc = slot < 0 ? M3_ENOSPC : m3_series_append(&v, (uint32_t)slot, r);
    if (rc)
        __atomic_store_n(&v.sh->dropped, v.sh->dropped + 1, __ATOMIC_RELAXED);
    return rc;
}

int m3_shard_apply(uint8_t *base, const m3_rec *rec)
{
    if (!base || !rec || m3_rec_check(rec, rec->len, cseg_of(base)->p.num_shards))
        return M3_EINVAL;
    m3_shard_lock(base, rec->shard);
    int rc = m3_shard_apply_rec(base, rec);
    m3_shard_unlock(base, rec->shard);
    return rc;
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
            m3_shard_lock(base, r->shard);
            m3_shard_apply_rec(base, r);
            m3_shard_unlock(base, r->shard);
            n++;
        }
        off += r->len;
    }
    return n;
}

/* 1 if chunk off is in slot s's chain. */
static int in_chain(const shard_view *v, const series_slot *s, uint64_t off)
{
    for (uint64_t o = s->head; o; o = chunk_at(v, o)->next)
        if (o == off)
            return 1;
    return 0;
}

int m3_shard_recover(uint8_t *base, uint32_t shard)
{
    const seg_hdr *h = cseg_of(base);
    if (shard >= h->p.num_shards)
        return M3_EINVAL;
    shard_view v = shard_view_of(base, shard);
    shard_hdr *sh = v.sh;
    /* Only the owner process takes the lock, and it is being (re)started: whoever held it
       is dead. Release: pairs with the acquire of the next holder. */
    __atomic_store_n(&sh->owner_lock, 0, __ATOMIC_RELEASE);
    if (sh->table_seq & 1) {
        /* died while moving entries: rebuild the table from the live slots */
        for (uint64_t i = 0; i < h->table_size; i++)
            __atomic_store_n(&v.table[i], 0, __ATOMIC_RELAXED);
        for (uint32_t i = 0; i < sh->nseries; i++)
            if (v.slots[i].state == SLOT_LIVE)
                table_insert(&v, v.slots[i].hash, i);
        /* Release: the rebuilt table is visible before the even sequence. */
        __atomic_store_n(&sh->table_seq, sh->table_seq + 1, __ATOMIC_RELEASE);
    }
    if (sh->creating) {
        uint32_t n = sh->creating - 1;
        series_slot *s = &v.slots[n];
        if (n >= sh->nseries)
            __atomic_store_n(&sh->nseries, n + 1, __ATOMIC_RELEASE);
        if (s->state == SLOT_LIVE) {
            if (lookup_once(&v, s->hash, v.arena + s->labels_off, s->labels_len) != (int64_t)n) {
                table_insert(&v, s->hash, n);
                sh->live++;
            }
        } else {
            arena_free_slot(&v, n); /* popped, never published (its labels leak) */
        }
        sh->creating = 0;
    }
    if (sh->expiring) {
        uint32_t n = sh->expiring - 1;
        series_slot *s = &v.slots[n];
        if (s->state != SLOT_FREE) {
            if (lookup_once(&v, s->hash, v.arena + s->labels_off, s->labels_len) == (int64_t)n)
                table_remove(&v, s->hash, n);
            if (s->state == SLOT_LIVE) {
                __atomic_store_n(&s->state, SLOT_RETIRED, __ATOMIC_RELEASE);
                sh->live--;
            }
            if (sh->slot_pending_tail != n + 1 && sh->slot_limbo_tail != n + 1)
                arena_pend_slot(&v, n);
        }
        sh->expiring = 0;
    }
    arena_retire_pending(&v);
    uint32_t n = sh->nseries, live = 0;
    for (uint32_t i = 0; i < n; i++) {
        series_slot *s = &v.slots[i];
        if (s->state != SLOT_LIVE)
            continue;
        live++;
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
            if ((c->flags & CHUNK_SEALED) || !in_chain(&v, s, s->open[k])) {
                s->open[k] = 0; /* sealed or released while the owner died */
                continue;
            }
            if (tsz_enc_resume(&c->enc, c->buf, c->cap) != M3_OK)
                s->open[k] = 0; /* unreadable: never append to it again */
        }
        /* next_stream must exceed every stream of the chain, open or not */
        for (off = s->head; off; off = chunk_at(&v, off)->next)
            if (chunk_at(&v, off)->stream >= s->next_stream)
                s->next_stream = chunk_at(&v, off)->stream + 1;
    }
    __atomic_store_n(&sh->live, live, __ATOMIC_RELAXED);
    return M3_OK;
}

void m3_shard_set_recovered(uint8_t *base, uint32_t shard, uint32_t val)
{
    if (shard >= cseg_of(base)->p.num_shards)
        return;
    /* Release: everything replayed into the shard is visible before the flag. */
    __atomic_store_n(&shard_view_of(base, shard).sh->recovered, val, __ATOMIC_RELEASE);
}

void m3_shard_stats_get(const uint8_t *base, uint32_t shard, m3_shard_stats *out)
{
    memset(out, 0, sizeof *out);
    if (shard >= cseg_of(base)->p.num_shards)
        return;
    shard_view v = shard_view_of(base, shard);
    shard_hdr *sh = v.sh;
    /* Relaxed loads: statistics, each exact on its own, not a consistent snapshot. */
    out->nseries = __atomic_load_n(&sh->live, __ATOMIC_RELAXED);
    out->arena_bump = __atomic_load_n(&sh->arena_used, __ATOMIC_RELAXED);
    uint64_t fb = __atomic_load_n(&sh->free_bytes, __ATOMIC_RELAXED);
    out->arena_used = out->arena_bump > fb ? out->arena_bump - fb : 0;
    out->arena_bytes = v.h->p.arena_bytes;
    out->samples = __atomic_load_n(&sh->samples, __ATOMIC_RELAXED);
    out->ooo_samples = __atomic_load_n(&sh->ooo_samples, __ATOMIC_RELAXED);
    out->dropped = __atomic_load_n(&sh->dropped, __ATOMIC_RELAXED);
    /* Acquire: pairs with m3_shard_set_recovered. */
    out->recovered = __atomic_load_n(&sh->recovered, __ATOMIC_ACQUIRE);
    out->slots = __atomic_load_n(&sh->nseries, __ATOMIC_ACQUIRE);
    out->chunks_free = __atomic_load_n(&sh->chunks_free, __ATOMIC_RELAXED);
    out->chunks_limbo = __atomic_load_n(&sh->chunks_limbo, __ATOMIC_RELAXED);
    out->chunks_released = __atomic_load_n(&sh->chunks_released, __ATOMIC_RELAXED);
    out->series_removed = __atomic_load_n(&sh->series_removed, __ATOMIC_RELAXED);
    out->slots_limbo = __atomic_load_n(&sh->slots_limbo, __ATOMIC_RELAXED);
    out->warm_floor = __atomic_load_n(&sh->warm_floor, __ATOMIC_RELAXED);
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
        shard_view v = shard_view_of(base, r->shard);
        /* Relaxed: a capacity estimate; the owner re-checks when it allocates. */
        uint64_t used = __atomic_load_n(&v.sh->arena_used, __ATOMIC_RELAXED);
        uint64_t fb = __atomic_load_n(&v.sh->free_bytes, __ATOMIC_RELAXED);
        used = used > fb ? used - fb : 0;
        uint64_t ab = h->p.arena_bytes;
        /* Relaxed: a hint, as above; non-zero while /dev/shm cannot give the arena pages. */
        uint64_t shm_cap = __atomic_load_n(&v.sh->arena_cap, __ATOMIC_RELAXED);
        if (shm_cap && shm_cap < ab)
            ab = shm_cap;
        int reject = 0;
        if (used >= ab - ab / 16) {
            reject = 1;
        } else if (used >= ab - ab / 8 ||
                   __atomic_load_n(&v.sh->live, __ATOMIC_RELAXED) >=
                       h->p.series_per_shard) {
            reject = lookup(&v, r->hash, (const uint8_t *)(r + 1), r->labels_len) < 0 ? 2 : 0;
        }
        if (reject) {
            if (!nrej && msg && msg_cap) {
                char lab[256];
                m3_labels_format((const uint8_t *)(r + 1), r->labels_len, lab, sizeof lab);
                if (reject == 1 && ab < h->p.arena_bytes)
                    snprintf(msg, msg_cap,
                             "series %s: shard %u is out of memory: /dev/shm is full (its "
                             "arena got %llu of arena_bytes=%llu)", lab, r->shard,
                             (unsigned long long)ab, (unsigned long long)h->p.arena_bytes);
                else if (reject == 1)
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
    /* Acquire: pairs with create_series; slots below the count have been initialised. */
    return __atomic_load_n(&shard_view_of(base, shard).sh->nseries, __ATOMIC_ACQUIRE);
}

/* The live slot `slot` of a shard, or NULL. */
static const series_slot *live_slot(const uint8_t *base, uint32_t shard, uint32_t slot)
{
    if (slot >= m3_shard_nseries(base, shard))
        return NULL;
    const series_slot *s = &shard_view_of(base, shard).slots[slot];
    return slot_state(s) == SLOT_LIVE ? s : NULL;
}

int m3_series_get(const uint8_t *base, uint32_t shard, uint32_t slot, m3_series_info *out)
{
    if (!base || !out)
        return M3_EINVAL;
    const series_slot *s = live_slot(base, shard, slot);
    if (!s)
        return M3_ENOENT;
    shard_view v = shard_view_of(base, shard);
    out->hash = s->hash;
    out->labels = v.arena + s->labels_off;
    out->labels_len = s->labels_len;
    out->nlabels = s->nlabels;
    out->gen = s->gen;
    out->tenant = s->tenant;
    out->max_ts = __atomic_load_n(&s->max_ts, __ATOMIC_RELAXED);
    return M3_OK;
}

int m3_series_labels(const uint8_t *base, uint32_t shard, uint32_t slot,
                     const uint8_t **labels, uint32_t *len)
{
    const series_slot *s = live_slot(base, shard, slot);
    if (!s)
        return M3_ENOENT;
    *labels = shard_view_of(base, shard).arena + s->labels_off;
    *len = s->labels_len;
    return M3_OK;
}

uint64_t m3_series_count(const uint8_t *base, uint32_t shard, uint32_t slot)
{
    const series_slot *s = live_slot(base, shard, slot);
    if (!s)
        return 0;
    shard_view v = shard_view_of(base, shard);
    uint64_t total = 0;
    /* Acquire (each link): pairs with new_chunk's release; the chunk is initialised. */
    for (uint64_t off = __atomic_load_n(&s->head, __ATOMIC_ACQUIRE); off;
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
    const series_slot *s = live_slot(base, shard, slot);
    if (!s)
        return M3_ENOENT;
    shard_view v = shard_view_of(base, shard);
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
    for (uint64_t off = __atomic_load_n(&s->head, __ATOMIC_ACQUIRE); off;
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
