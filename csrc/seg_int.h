/*
 * seg_int.h -- private layout of the shared-memory segment, shared by segment.c, lane.c and
 * series.c. Not cffi-visible. docs/formats/shm.md is the reference for every field here;
 * changing any struct or constant in this file changes the layout: bump M3_SEG_LAYOUT_VERSION.
 *
 * All cross-process fields are plain integers accessed with __atomic builtins; nothing in the
 * segment holds a pointer (it is mapped at different addresses in different processes).
 */
#ifndef M3_SEG_INT_H
#define M3_SEG_INT_H

#include <stdint.h>
#include <stddef.h>
#include <limits.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#include "m3shm.h"
#include "m3_int.h"

#define M3_SEG_MAGIC 0x4753334du /* "M3SG" little-endian */

/* Segment header at offset 0; written once by m3_seg_init, read-only afterwards except for
   the cache lines at SEQ_OFF, DONE_OFF and EPOCH_OFF and the reader slots. */
typedef struct seg_hdr {
    uint32_t magic;
    uint32_t layout_version;
    uint64_t size;
    m3_seg_params p;
    uint64_t lanes_off;    /* first lane */
    uint64_t lane_stride;  /* LANE_HDR + lane_bytes */
    uint64_t shards_off;   /* first shard region */
    uint64_t shard_stride;
    uint64_t table_size;   /* series hash-table entries per shard (power of two) */
    uint64_t slot_cap;     /* series slots per shard */
    uint64_t table_off;    /* offsets inside a shard region */
    uint64_t slots_off;
    uint64_t arena_off;
    uint64_t checksum;     /* m3_labels_hash of the bytes before this field */
} seg_hdr;

#define SEG_SEQ_OFF 256    /* _Atomic u64 global batch sequence, alone on its cache line */
#define SEG_DONE_OFF 320   /* u32 producer_done[M3_MAX_PRODUCERS] */
#define SEG_EPOCH_OFF 1408 /* _Atomic u64 global reclamation epoch, alone on its cache line */
#define SEG_PENDING_OFF 1472 /* _Atomic u64 pending[M3_MAX_PRODUCERS] (lane.c): 0 = nothing
                                reserved; else 1 + the smallest seq the producer has reserved
                                and not yet published (1 alone: drawing one right now) */
#define SEG_READERS_OFF 4096 /* reader_slot[M3_MAX_READERS], one cache line each */
#define SEG_BELLS_OFF (SEG_READERS_OFF + M3_MAX_READERS * 64) /* 20480: owner doorbells */
#define SEG_BELL_STRIDE 16   /* one u32 word per owner (bell.c), 16 bytes apart */
#define SEG_HDR_BYTES (SEG_BELLS_OFF + M3_MAX_PRODUCERS * SEG_BELL_STRIDE)

/* A reader slot (epoch.c). tag = pid << 32 | low 32 bits of the process start time (0 = free,
   1 = being reaped); epoch = the global epoch the holder entered its read section at (0 =
   outside any section); depth = nesting, private to the holder. */
typedef struct reader_slot {
    uint64_t tag;
    uint64_t epoch;
    uint32_t depth;
    uint32_t pid;
    uint64_t start_time;   /* full start time (clock ticks after boot) */
    uint64_t pad[4];
} reader_slot;

/* Lane header: producer line, consumer line; data (lane_bytes) follows. */
typedef struct lane_hdr {
    uint64_t tail;  /* published end (monotonic byte position); release by the producer */
    uint64_t wpos;  /* producer-private: end of reserved bytes */
    uint64_t mark;  /* producer-private: wpos when the current batch began */
    uint64_t pad0[5];
    uint64_t head;  /* consumed end; release by the owner */
    uint64_t pad1[7];
} lane_hdr;
#define LANE_HDR 128

/* Label blocks come in size classes: 32-byte steps up to 512, then powers of two to 64 KiB.
   A 512-byte label block and a chunk are interchangeable (both M3_CHUNK_BYTES). */
#define LABEL_CLASSES 23

/* Shard header: the first line holds owner-written counters that readers may load; the rest
   is the owner's allocator state (offsets are into the shard's arena, 0 = none; slot links
   are slot + 1, 0 = none). Changing it changes the layout. */
typedef struct shard_hdr {
    uint32_t nseries;        /* slot high-water mark; release by the owner */
    uint32_t recovered;      /* 1 once the owner has replayed / recovered the shard */
    uint64_t arena_used;     /* bump pointer into the arena (owner; relaxed for readers) */
    uint64_t samples;
    uint64_t ooo_samples;
    uint64_t dropped;
    uint64_t free_bytes;     /* bytes on free lists, pending and in limbo (relaxed) */
    uint32_t live;           /* live series (relaxed) */
    uint32_t table_seq;      /* odd while the owner moves table entries (seqlock) */
    int64_t warm_floor;      /* blocks starting below it take only cold writes (relaxed) */
    /* line 2: statistics */
    uint64_t chunks_free;
    uint64_t chunks_limbo;
    uint64_t chunks_released;
    uint64_t series_removed;
    uint64_t slots_limbo;
    uint32_t owner_lock;     /* mutual exclusion of the owner process's threads */
    uint32_t reclaim_skip;   /* allocations to wait before trying a blocked reclaim again */
    uint64_t chunk_free_small; /* free first chunks (CHUNK_FIRST_BYTES), through retire_next */
    uint64_t arena_cap;      /* 0, or arena_used when /dev/shm could not give the arena more
                                pages (arena_commit): admission counts the arena full there */
    /* line 3: allocator */
    uint64_t chunk_free;     /* free chunks, linked through retire_next */
    uint64_t chunk_limbo;    /* released chunks, oldest first, linked through retire_next */
    uint64_t chunk_limbo_tail;
    uint64_t chunk_pending;  /* chunks unlinked by the release in progress (not yet tagged) */
    uint64_t chunk_pending_tail;
    uint32_t slot_free;      /* free slots, linked through open[0] */
    uint32_t slot_limbo;     /* expired slots, oldest first, linked through open[0] */
    uint32_t slot_limbo_tail;
    uint32_t slot_pending;   /* slots expired by the call in progress (not yet tagged) */
    uint32_t slot_pending_tail;
    uint32_t creating;       /* slot being created, + 1 (recovery finishes it) */
    uint32_t expiring;       /* slot being expired, + 1 (recovery finishes it) */
    uint32_t pad2;
    /* lines 4-6: label free lists per size class, linked through their first 8 bytes */
    uint64_t label_free[LABEL_CLASSES];
} shard_hdr;
#define SHARD_HDR 384

enum slot_state { SLOT_FREE = 0, SLOT_LIVE = 1, SLOT_RETIRED = 2 };

/* A series slot (128 bytes). Fields up to max_ts are read by any process: they are written
   before `state` is release-stored SLOT_LIVE, except head (release) and max_ts (relaxed).
   The rest is the owner's private bookkeeping; a slot that is not live reuses open[0] as its
   list link (slot + 1) and open[1] as the epoch it was retired at. */
typedef struct series_slot {
    uint64_t hash;
    uint64_t labels_off;   /* arena offset of the canonical labels */
    uint16_t labels_len;
    uint16_t nlabels;
    uint32_t tenant;
    uint32_t gen;          /* generation: bumped each time the slot is reused */
    uint16_t vtype;
    uint16_t ns;           /* namespace id (0; reserved) */
    uint32_t state;        /* enum slot_state; release by the owner */
    uint32_t next_stream;  /* owner: stream number the next new chunk gets */
    uint64_t head;         /* arena offset of the first chunk, 0 = none; release */
    int64_t max_ts;        /* largest timestamp applied (relaxed) */
    uint64_t last;         /* owner: last chunk of the chain (repaired on recovery) */
    uint64_t open[M3_OPEN_STREAMS]; /* owner: chunks still appendable, 0 = empty */
} series_slot;

/* Chunk flags (atomic u32; set by the owner, read by anyone). */
#define CHUNK_SEALED 1u  /* closed for appends; waits for m3_block_release */
#define CHUNK_COLD 2u    /* created after its block was sealed warm */

/* A series' first chunk of a block is CHUNK_FIRST_BYTES (most series take few samples
   before a block closes or they go idle); its later chunks are M3_CHUNK_BYTES. A chunk's size
   is CHUNK_BUF_OFF + cap. Changing it changes the layout. */
#define CHUNK_FIRST_BYTES 192

/* A chunk: one stream of one block of one series (CHUNK_FIRST_BYTES or M3_CHUNK_BYTES). */
typedef struct chunk {
    uint64_t next;         /* arena offset of the next chunk of the series, 0 = end; release */
    int64_t block_start;   /* ms, a multiple of block_ms */
    uint32_t stream;       /* higher = written later; wins ties on equal timestamps */
    uint32_t flags;        /* CHUNK_*; release by the owner */
    uint16_t cap;          /* bytes of buf */
    uint16_t ns;           /* namespace id (0; reserved) */
    uint32_t pad;
    uint64_t retire_next;  /* owner: link in the pending, limbo and free lists */
    uint64_t retire_epoch; /* owner: epoch at which the chunk was released */
    tsz_enc enc;           /* owner's encoder state (published through buf's count) */
    uint8_t buf[];         /* tsz stream */
} chunk;
#define CHUNK_BUF_OFF offsetof(chunk, buf)

_Static_assert(sizeof(seg_hdr) <= SEG_SEQ_OFF, "segment header overflows its line");
_Static_assert(sizeof(lane_hdr) == LANE_HDR, "lane header size");
_Static_assert(sizeof(shard_hdr) == SHARD_HDR, "shard header size");
_Static_assert(sizeof(series_slot) == 128, "series slot size");
_Static_assert(sizeof(reader_slot) == 64, "reader slot size");
_Static_assert(SEG_EPOCH_OFF >= SEG_DONE_OFF + 4 * M3_MAX_PRODUCERS, "epoch line overlaps");
_Static_assert(SEG_PENDING_OFF >= SEG_EPOCH_OFF + 64 &&
               SEG_PENDING_OFF + 8 * M3_MAX_PRODUCERS <= SEG_READERS_OFF, "pending overlaps");
_Static_assert(M3_CHUNK_BYTES == 512, "a chunk must be interchangeable with a 512-byte label block");
_Static_assert(sizeof(m3_rec) == 48, "record header size");
_Static_assert(sizeof(chunk) % 8 == 0, "chunk header alignment");
_Static_assert(CHUNK_FIRST_BYTES % 32 == 0 && CHUNK_FIRST_BYTES < M3_CHUNK_BYTES &&
               CHUNK_FIRST_BYTES >= sizeof(chunk) + TSZ_HEADER_BYTES + 2 * TSZ_MAX_SAMPLE_BYTES,
               "a first chunk is a label size class and holds a few samples");
static inline uint32_t chunk_bytes(const chunk *c) { return (uint32_t)(CHUNK_BUF_OFF + c->cap); }

static inline seg_hdr *seg_of(uint8_t *base) { return (seg_hdr *)base; }
static inline const seg_hdr *cseg_of(const uint8_t *base) { return (const seg_hdr *)base; }

static inline lane_hdr *lane_at(uint8_t *base, uint32_t shard, uint32_t producer)
{
    const seg_hdr *h = cseg_of(base);
    return (lane_hdr *)(base + h->lanes_off +
                        ((uint64_t)shard * h->p.num_producers + producer) * h->lane_stride);
}
static inline uint8_t *lane_data(lane_hdr *l) { return (uint8_t *)l + LANE_HDR; }

/* The worker that owns (drains) shard s of S when P workers split the shards into contiguous
   ranges [i*S/P, (i+1)*S/P) (m3shm/workers/worker.py shard_range): the largest i with
   i*S/P <= s. */
static inline uint32_t shard_owner(uint32_t s, uint32_t S, uint32_t P)
{
    return (uint32_t)(((uint64_t)s + 1) * P - 1) / S;
}

/* Owner p's doorbell word (bell.c): bit 0 = the owner is (about to be) asleep in
   m3_bell_wait, bits 1..31 a counter bumped by every ring. */
static inline uint32_t *bell_at(uint8_t *bells, uint32_t owner)
{
    return (uint32_t *)(bells + SEG_BELLS_OFF + (uint64_t)owner * SEG_BELL_STRIDE);
}

/* Arena memory is committed (its pages allocated) in steps of this many bytes, as the bump
   pointer reaches them (arena_commit in arena.c). */
#define ARENA_COMMIT_STEP (UINT64_C(1) << 20)

static inline uint64_t align_up64(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

/* A bump allocator of a shared-memory file's arena moves its pointer from `used` to
   `used + n` (the pointer starts at `first`; `cap` = the arena's bytes): allocate the pages of
   every commit step the move enters, now, with MADV_POPULATE_WRITE, so that a full /dev/shm
   is an error here (-1: treat the arena as full) instead of a SIGBUS at the first touch. */
int arena_commit(uint8_t *arena, uint64_t first, uint64_t used, uint64_t n, uint64_t cap);

/* Ring a doorbell (bell.c has the protocol): bump its counter and wake its sleeper, if the
   sleeping bit is set or `always`. A producer calls it after its tail stores and a seq_cst
   fence, so either it sees the bit or the owner's backlog check sees its tails. */
static inline void bell_ring_word(uint32_t *w, int always)
{
    /* Relaxed: the caller's seq_cst fence orders this load after its tail stores. */
    uint32_t v = __atomic_load_n(w, __ATOMIC_RELAXED);
    if (!(v & 1) && !always)
        return;
    /* Relaxed read-modify-write: only the value matters (it makes a futex wait on the old
       value return at once); the data it announces was published before the fence. */
    v = __atomic_fetch_add(w, 2, __ATOMIC_RELAXED);
    if (v & 1)
        syscall(SYS_futex, w, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

static inline uint8_t *shard_at(uint8_t *base, uint32_t shard)
{
    const seg_hdr *h = cseg_of(base);
    return base + h->shards_off + (uint64_t)shard * h->shard_stride;
}

/* One shard's regions, as pointers valid in this process. */
typedef struct shard_view {
    uint8_t *base;
    uint32_t shard;
    const seg_hdr *h;
    shard_hdr *sh;
    uint64_t *table;
    series_slot *slots;
    uint8_t *arena;
} shard_view;

static inline shard_view shard_view_of(const uint8_t *base, uint32_t shard)
{
    shard_view v;
    v.base = (uint8_t *)base;
    v.shard = shard;
    v.h = cseg_of(base);
    uint8_t *s = shard_at((uint8_t *)base, shard);
    v.sh = (shard_hdr *)s;
    v.table = (uint64_t *)(s + v.h->table_off);
    v.slots = (series_slot *)(s + v.h->slots_off);
    v.arena = s + v.h->arena_off;
    return v;
}

static inline chunk *chunk_at(const shard_view *v, uint64_t off) { return (chunk *)(v->arena + off); }

static inline uint64_t round8(uint64_t x) { return (x + 7) & ~(uint64_t)7; }

/* Bytes of a record with these counts (labels padded to 8, then ts[n], then v[n]). */
static inline uint64_t rec_bytes(uint32_t labels_len, uint32_t nsamples)
{
    return sizeof(m3_rec) + round8(labels_len) + (uint64_t)nsamples * 16;
}

/* Bytes of a record of this type (ROLLUP_IN records end in an m3_rollup_tail). */
static inline uint64_t rec_bytes_of(uint16_t type, uint32_t labels_len, uint32_t nsamples)
{
    return rec_bytes(labels_len, nsamples) + (type == M3_REC_ROLLUP_IN ? M3_ROLLUP_TAIL_BYTES : 0);
}

/* Check a record header against the bytes available; 0 if well formed. */
int m3_rec_check(const m3_rec *r, size_t avail, uint32_t num_shards);
/* Format canonical labels as {a="b", ...} into out (always NUL-terminated, truncated). */
void m3_labels_format(const uint8_t *labels, size_t len, char *out, size_t cap);
/* Owner-side apply used by the lane drain (series.c); the caller holds the shard lock. */
int m3_shard_apply_rec(uint8_t *base, const m3_rec *rec);
/* Mutual exclusion of the owner process's threads on one shard (apply, seal, release,
   reclaim, expire). m3_shard_recover resets it: only the owner process ever takes it. */
void m3_shard_lock(uint8_t *base, uint32_t shard);
void m3_shard_unlock(uint8_t *base, uint32_t shard);

/* series.c, for the aggregation store (aggstore.c), owner under the shard lock: the slot of
   a record's series (looked up, else created; -1 when the shard is full), and appending a
   record's samples to a slot's open blocks. */
int64_t m3_series_resolve(const shard_view *v, const m3_rec *r);
int m3_series_append(const shard_view *v, uint32_t slot, const m3_rec *r);
/* aggstore.c: apply one drained record with aggregation (see aggstore.c); returns
   M3_AGG_NEEDS_PLAN, without touching anything but the series table, when the record's
   series has no plan yet. seq is the record's batch, pos orders records of one batch (their
   lane position or batch offset). */
#define M3_AGG_NEEDS_PLAN 1
int m3_aggst_apply_rec(uint8_t *base, uint8_t *store, const m3_rec *r, uint64_t seq,
                       uint64_t pos, int64_t now_ms);
/* aggstore.c: if the record's series (created if new) has no plan and was not asked for in
   this round, mark it asked and return 1 with its slot and generation. */
int m3_aggst_want(uint8_t *base, uint8_t *store, const m3_rec *r, uint32_t round,
                  uint32_t *slot, uint32_t *gen);
/* aggstore.c: the next ask round of a shard (a drain that stops for plans starts one). */
uint32_t m3_aggst_next_round(uint8_t *store, uint32_t shard);

/* series.c: the slot of these labels, created if absent; -1 if the shard is full (owner,
   under the shard lock). */
int64_t m3_series_find_or_create(const shard_view *v, uint64_t hash, const uint8_t *labels,
                                 uint32_t len, uint32_t nlabels, uint32_t tenant,
                                 uint32_t vtype);
/* series.c: remove slot's hash-table entry (owner, under the shard lock). */
int m3_series_unlink_table(const shard_view *v, uint32_t slot);

/* arena.c: the owner's allocator (free lists, limbo, reclamation); 0 / UINT32_MAX = none.
   arena_alloc_chunk takes CHUNK_FIRST_BYTES or M3_CHUNK_BYTES. */
uint64_t arena_alloc_chunk(const shard_view *v, uint32_t bytes);
uint64_t arena_alloc_labels(const shard_view *v, uint32_t len);
uint32_t arena_alloc_slot(const shard_view *v);
void arena_free_slot(const shard_view *v, uint32_t slot); /* a never-published slot */
/* Hand a chunk unlinked from its chain / a slot removed from the table to the pending list
   of the current operation; arena_retire_pending then tags the pending objects with a fresh
   epoch and appends them to limbo. */
void arena_pend_chunk(const shard_view *v, uint64_t off);
void arena_pend_slot(const shard_view *v, uint32_t slot);
void arena_retire_pending(const shard_view *v);
/* Move what no reader can see any more from limbo to the free lists; returns objects freed.
   reap: also clear the reader slots of dead processes that hold reclamation back. */
int arena_reclaim(const shard_view *v, int reap);
/* Bytes of the label block that holds len label bytes. */
uint32_t label_block_bytes(uint32_t len);

/* epoch.c, for the owner's reclamation: advance the global epoch after unlinking (returns
   the epoch to tag the unlinked objects with), and the oldest epoch any reader may still be
   in (UINT64_MAX if none); objects tagged e < that may be reused. */
uint64_t m3_epoch_retire(uint8_t *base);
uint64_t m3_epoch_min_active(uint8_t *base, int reap);

#endif
