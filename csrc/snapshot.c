/*
 * snapshot.c -- copies of a shard's open blocks, so a restart replays only the commit log
 * written after the copy (docs/formats/snapshot.md; Python side m3shm/storage/snapshot.py).
 *
 * Taking a snapshot (the owner, on its flush thread, while the drain thread keeps applying):
 *
 *   1. S := m3_seq_sync(); wait until m3_seq_settled(S): no producer holds a batch with a
 *      sequence number below S reserved and unpublished; then snapshot the lane tails and
 *      wait until the shard's heads reach them. Every batch below S is now applied to the
 *      shard (owners apply in global seq order, docs/formats/shm.md "Apply order").
 *   2. m3_shard_snapshot copies every live series, under the shard lock (so its chunks and
 *      encoder states are not changing), one whole series at a time: the hash, labels, and
 *      for each chunk of its chain (sealed or not, warm or cold) its block start, stream,
 *      flags, capacity and the used bytes of its TSZ stream, byte for byte. Nothing is
 *      decoded or re-encoded. The lock is taken once per call (the caller's buffer full),
 *      not for the whole shard: each series is a seq-prefix of its own records, at least
 *      every record below S, which is all replay needs (below).
 *
 *      Series without chunks (all flushed) are left out: they come back with their next
 *      sample.
 *
 * Loading (the owner at start-up, before replay, into its shard):
 *
 *   m3_shard_load_snapshot finds or creates each series and links a copy of each chunk at the
 *   end of its chain, its stream number raised by the series' next_stream at the time (0 in a
 *   fresh shard), so every sample loaded is older than anything applied afterwards. Chunks
 *   that were appendable when copied are made appendable again: their encoder state is
 *   rebuilt by decoding the stream (tsz_enc_resume), so nothing in the file is trusted as
 *   encoder state. Blocks the caller lists in `skip` (flushed to a fileset after the copy was
 *   taken) are not loaded. Cold chunks, and chunks of blocks below the shard's warm floor,
 *   are loaded cold.
 *
 * Why replaying every batch >= S afterwards gives the live state: for each series the copy
 * holds its records up to some seq P >= S in seq order (streams encode that order); replay
 * applies S, S+1, ... again in higher streams, so for every timestamp the last write in seq
 * order wins, exactly as in the live path, and records applied twice are equal duplicates
 * that the merge removes.
 *
 * Body layout (little-endian, every item 8-aligned), one series after another:
 *   series: hash u64, max_ts i64, labels_len u32, nchunks u32, nlabels u16, vtype u16,
 *           tenant u32, labels (labels_len bytes, zero-padded to 8)
 *   chunk:  block_start i64, stream u32, flags u16 (1 cold, 2 appendable), cap u16 (88 or
 *           408), nbytes u32, count u32, stream bytes (nbytes, zero-padded to 8)
 * The loader checks every length against the buffer, every series' hash and shard, and every
 * stream header; it returns M3_ECORRUPT with the offset of the bad item. The file around the
 * body (header, CRC, checkpoint) is Python's.
 */
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "seg_int.h"

#define SNAP_SERIES_BYTES 32
#define SNAP_CHUNK_BYTES 24
#define SNAP_COLD 1u
#define SNAP_OPEN 2u
#define SNAP_MAX_STREAM (1u << 30)

typedef struct snap_series {
    uint64_t hash;
    int64_t max_ts;
    uint32_t labels_len;
    uint32_t nchunks;
    uint16_t nlabels;
    uint16_t vtype;
    uint32_t tenant;
} snap_series;

typedef struct snap_chunk {
    int64_t block_start;
    uint32_t stream;
    uint16_t flags;
    uint16_t cap;
    uint32_t nbytes;
    uint32_t count;
} snap_chunk;

_Static_assert(sizeof(snap_series) == SNAP_SERIES_BYTES, "snapshot series header");
_Static_assert(sizeof(snap_chunk) == SNAP_CHUNK_BYTES, "snapshot chunk header");

int m3_seq_settled(const uint8_t *base, uint64_t seq)
{
    const seg_hdr *h = cseg_of(base);
    const uint64_t *pending = (const uint64_t *)(base + SEG_PENDING_OFF);
    for (uint32_t p = 0; p < h->p.num_producers; p++) {
        /* Acquire: pairs with the producer's stores of pending (lane.c): a value 0 or a seq
           >= `seq` means every batch it drew below `seq` is published, and the lane tails
           loaded after this include it. 1 ("drawing now") may still be below: not settled. */
        uint64_t v = __atomic_load_n(&pending[p], __ATOMIC_ACQUIRE);
        if (v != 0 && v - 1 < seq)
            return 0;
    }
    return 1;
}

/* Bytes of a chunk's stream that are in use: the encoder's size when its state agrees with
   the published count, else the whole buffer (a state left torn by a killed owner). */
static uint32_t used_bytes(const chunk *c, uint32_t *count)
{
    uint32_t n = 0;
    if (tsz_count(c->buf, c->cap, &n) != M3_OK) {
        *count = 0;
        return c->cap;
    }
    *count = n;
    if ((c->enc.seq & 1u) || c->enc.count != n)
        return c->cap;
    size_t sz = tsz_enc_size(&c->enc);
    return sz > c->cap ? c->cap : (uint32_t)sz;
}

static int is_open(const series_slot *s, uint64_t off)
{
    for (int k = 0; k < M3_OPEN_STREAMS; k++)
        if (s->open[k] == off)
            return 1;
    return 0;
}

/* Bytes series s takes in a snapshot (the shard lock held). */
static uint64_t series_bytes(const shard_view *v, const series_slot *s)
{
    uint64_t n = SNAP_SERIES_BYTES + round8(s->labels_len);
    uint32_t count;
    for (uint64_t off = s->head; off; off = chunk_at(v, off)->next)
        n += SNAP_CHUNK_BYTES + round8(used_bytes(chunk_at(v, off), &count));
    return n;
}

static uint32_t put_series(const shard_view *v, const series_slot *s, uint8_t *out)
{
    snap_series hdr;
    memset(&hdr, 0, sizeof hdr);
    hdr.hash = s->hash;
    hdr.max_ts = s->max_ts;
    hdr.labels_len = s->labels_len;
    hdr.nlabels = s->nlabels;
    hdr.vtype = s->vtype;
    hdr.tenant = s->tenant;
    uint8_t *p = out + SNAP_SERIES_BYTES;
    memcpy(p, v->arena + s->labels_off, s->labels_len);
    memset(p + s->labels_len, 0, round8(s->labels_len) - s->labels_len);
    p += round8(s->labels_len);
    for (uint64_t off = s->head; off; off = chunk_at(v, off)->next) {
        const chunk *c = chunk_at(v, off);
        snap_chunk ch;
        memset(&ch, 0, sizeof ch);
        ch.block_start = c->block_start;
        ch.stream = c->stream;
        ch.flags = (uint16_t)(((c->flags & CHUNK_COLD) ? SNAP_COLD : 0) |
                              (is_open(s, off) ? SNAP_OPEN : 0));
        ch.cap = c->cap;
        ch.nbytes = used_bytes(c, &ch.count);
        memcpy(p, &ch, sizeof ch);
        p += SNAP_CHUNK_BYTES;
        memcpy(p, c->buf, ch.nbytes);
        memset(p + ch.nbytes, 0, round8(ch.nbytes) - ch.nbytes);
        p += round8(ch.nbytes);
        hdr.nchunks++;
    }
    memcpy(out, &hdr, sizeof hdr);
    return hdr.nchunks;
}

int m3_shard_snapshot(uint8_t *base, uint32_t shard, uint32_t *cursor, uint8_t *out,
                      size_t cap, size_t *used, uint64_t *nseries, uint64_t *nchunks)
{
    if (!base || !cursor || !out || !used || !nseries || !nchunks ||
        shard >= cseg_of(base)->p.num_shards)
        return M3_EINVAL;
    shard_view v = shard_view_of(base, shard);
    size_t o = 0;
    int rc = 0;
    m3_shard_lock(base, shard);
    uint32_t n = v.sh->nseries;
    uint32_t i = *cursor;
    for (; i < n; i++) {
        const series_slot *s = &v.slots[i];
        if (s->state != SLOT_LIVE || !s->head)
            continue; /* a series with no chunk holds nothing to restore */
        uint64_t need = series_bytes(&v, s);
        if (need > cap - o) {
            if (o == 0) {
                *used = (size_t)need; /* tells the caller how much one series needs */
                m3_shard_unlock(base, shard);
                *cursor = i;
                return M3_ENOSPC;
            }
            rc = 1;
            break;
        }
        *nchunks += put_series(&v, s, out + o);
        o += need;
        (*nseries)++;
    }
    m3_shard_unlock(base, shard);
    *cursor = i;
    *used = o;
    return rc;
}

/* ---- loading ------------------------------------------------------------------------------ */

static int skipped(int64_t bs, const int64_t *skip, size_t nskip)
{
    for (size_t k = 0; k < nskip; k++)
        if (skip[k] == bs)
            return 1;
    return 0;
}

/* Link a copy of one snapshot chunk at the end of slot s's chain (lock held). */
static int load_chunk(const shard_view *v, series_slot *s, const snap_chunk *ch,
                      const uint8_t *bytes, uint32_t stream_base)
{
    uint32_t want = (uint32_t)CHUNK_BUF_OFF + ch->cap;
    uint64_t off = arena_alloc_chunk(v, want);
    if (!off && want != M3_CHUNK_BYTES)
        off = arena_alloc_chunk(v, want = M3_CHUNK_BYTES);
    if (!off)
        return M3_ENOSPC;
    chunk *c = chunk_at(v, off);
    memset(c, 0, want);
    c->block_start = ch->block_start;
    c->stream = stream_base + ch->stream;
    c->flags = ((ch->flags & SNAP_COLD) || ch->block_start < v->sh->warm_floor) ? CHUNK_COLD : 0;
    c->cap = (uint16_t)(want - CHUNK_BUF_OFF);
    memcpy(c->buf, bytes, ch->nbytes);
    int open = 0;
    if (ch->flags & SNAP_OPEN) {
        c->enc.seq = 1; /* "torn": tsz_enc_resume rebuilds the state from the stream */
        open = tsz_enc_resume(&c->enc, c->buf, c->cap) == M3_OK;
    }
    if (c->stream >= s->next_stream)
        s->next_stream = c->stream + 1;
    if (s->last)
        /* Release: the initialised chunk is visible before the link a reader follows. */
        __atomic_store_n(&chunk_at(v, s->last)->next, off, __ATOMIC_RELEASE);
    else
        /* Release: as above, for the series' first chunk. */
        __atomic_store_n(&s->head, off, __ATOMIC_RELEASE);
    s->last = off;
    if (open) {
        for (int k = 0; k < M3_OPEN_STREAMS; k++)
            if (!s->open[k]) {
                s->open[k] = off;
                break;
            }
    }
    return M3_OK;
}

int m3_shard_load_snapshot(uint8_t *base, uint32_t shard, const uint8_t *body, size_t len,
                           const int64_t *skip, size_t nskip, uint64_t *nseries,
                           uint64_t *nchunks, uint64_t *samples, size_t *bad_off)
{
    if (!base || (!body && len) || (!skip && nskip) || !nseries || !nchunks || !samples ||
        !bad_off || shard >= cseg_of(base)->p.num_shards)
        return M3_EINVAL;
    const seg_hdr *h = cseg_of(base);
    shard_view v = shard_view_of(base, shard);
    int64_t bms = h->p.block_ms;
    int rc = M3_OK;
    size_t o = 0;
    m3_shard_lock(base, shard);
    while (o < len) {
        *bad_off = o;
        if (len - o < SNAP_SERIES_BYTES) {
            rc = M3_ETRUNC;
            break;
        }
        snap_series sh;
        memcpy(&sh, body + o, sizeof sh);
        const uint8_t *labels = body + o + SNAP_SERIES_BYTES;
        if (sh.labels_len == 0 || sh.labels_len > 65535 ||
            round8(sh.labels_len) > len - o - SNAP_SERIES_BYTES) {
            rc = M3_ECORRUPT;
            break;
        }
        if (m3_labels_hash(labels, sh.labels_len) != sh.hash ||
            sh.hash % h->p.num_shards != shard || sh.vtype != M3_VT_FLOAT) {
            rc = M3_ECORRUPT;
            break;
        }
        size_t co = o + SNAP_SERIES_BYTES + round8(sh.labels_len);
        /* check every chunk before touching the shard, so a bad series changes nothing */
        size_t p = co;
        for (uint32_t k = 0; k < sh.nchunks && rc == M3_OK; k++) {
            snap_chunk ch;
            uint32_t count;
            *bad_off = p;
            if (len - p < SNAP_CHUNK_BYTES) {
                rc = M3_ETRUNC;
                break;
            }
            memcpy(&ch, body + p, sizeof ch);
            if ((ch.cap + CHUNK_BUF_OFF != CHUNK_FIRST_BYTES &&
                 ch.cap + CHUNK_BUF_OFF != M3_CHUNK_BYTES) ||
                ch.nbytes < TSZ_HEADER_BYTES || ch.nbytes > ch.cap ||
                round8(ch.nbytes) > len - p - SNAP_CHUNK_BYTES || ch.stream >= SNAP_MAX_STREAM ||
                ch.block_start % bms != 0 || (ch.flags & ~(SNAP_COLD | SNAP_OPEN)) ||
                tsz_count(body + p + SNAP_CHUNK_BYTES, ch.nbytes, &count) != M3_OK ||
                count != ch.count)
                rc = M3_ECORRUPT;
            p += SNAP_CHUNK_BYTES + round8(ch.nbytes);
        }
        if (rc)
            break;
        *bad_off = o;
        int64_t slot = m3_series_find_or_create(&v, sh.hash, labels, sh.labels_len, sh.nlabels,
                                                sh.tenant, sh.vtype);
        if (slot < 0) {
            rc = M3_ENOSPC;
            break;
        }
        series_slot *s = &v.slots[slot];
        uint32_t stream_base = s->next_stream;
        uint64_t added = 0;
        for (uint32_t k = 0; k < sh.nchunks; k++) {
            snap_chunk ch;
            memcpy(&ch, body + co, sizeof ch);
            if (!skipped(ch.block_start, skip, nskip)) {
                rc = load_chunk(&v, s, &ch, body + co + SNAP_CHUNK_BYTES, stream_base);
                if (rc)
                    break;
                (*nchunks)++;
                added += ch.count;
            }
            co += SNAP_CHUNK_BYTES + round8(ch.nbytes);
        }
        if (sh.max_ts > s->max_ts)
            /* Relaxed: a statistic for readers, as in series.c. */
            __atomic_store_n(&s->max_ts, sh.max_ts, __ATOMIC_RELAXED);
        __atomic_store_n(&v.sh->samples, v.sh->samples + added, __ATOMIC_RELAXED);
        *samples += added;
        (*nseries)++;
        if (rc)
            break;
        o = co;
    }
    m3_shard_unlock(base, shard);
    if (rc == M3_OK)
        *bad_off = len;
    return rc;
}
