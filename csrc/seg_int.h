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
#include "m3shm.h"
#include "m3_int.h"

#define M3_SEG_MAGIC 0x4753334du /* "M3SG" little-endian */

/* Segment header at offset 0; written once by m3_seg_init, read-only afterwards except for
   the cache lines at SEQ_OFF and DONE_OFF. */
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

#define SEG_SEQ_OFF 256   /* _Atomic u64 global batch sequence, alone on its cache line */
#define SEG_DONE_OFF 320  /* u32 producer_done[M3_MAX_PRODUCERS] */
#define SEG_HDR_BYTES 4096

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

/* Shard header: owner-written counters that readers may load. */
typedef struct shard_hdr {
    uint32_t nseries;     /* published series slots; release by the owner */
    uint32_t recovered;   /* 1 once the owner has replayed / recovered the shard */
    uint64_t arena_used;  /* bump pointer into the arena (owner; relaxed for readers) */
    uint64_t samples;
    uint64_t ooo_samples;
    uint64_t dropped;
    uint64_t pad[11];
} shard_hdr;
#define SHARD_HDR 128

/* A series slot (128 bytes). Fields above `head` are written once before the slot is
   published; head is release-stored; the rest is the owner's private bookkeeping. */
typedef struct series_slot {
    uint64_t hash;
    uint64_t labels_off;   /* arena offset of the canonical labels */
    uint32_t labels_len;
    uint32_t nlabels;
    uint32_t tenant;
    uint16_t vtype;
    uint16_t gen;          /* generation of the slot (slots are never reused yet: 1) */
    uint64_t head;         /* arena offset of the first chunk, 0 = none; release */
    uint64_t last;         /* owner: last chunk of the chain (repaired on recovery) */
    uint64_t next_stream;  /* owner: stream number the next new chunk gets */
    uint64_t open[M3_OPEN_STREAMS]; /* owner: chunks still appendable, 0 = empty */
    uint64_t pad;
} series_slot;

/* A chunk: one stream of one block of one series (M3_CHUNK_BYTES). */
typedef struct chunk {
    uint64_t next;         /* arena offset of the next chunk of the series, 0 = end; release */
    int64_t block_start;   /* ms, a multiple of block_ms */
    uint64_t stream;       /* higher = written later; wins ties on equal timestamps */
    uint32_t cap;          /* bytes of buf */
    uint32_t flags;
    tsz_enc enc;           /* owner's encoder state (published through buf's count) */
    uint8_t buf[];         /* tsz stream */
} chunk;
#define CHUNK_BUF_OFF offsetof(chunk, buf)

_Static_assert(sizeof(seg_hdr) <= SEG_SEQ_OFF, "segment header overflows its line");
_Static_assert(sizeof(lane_hdr) == LANE_HDR, "lane header size");
_Static_assert(sizeof(shard_hdr) == SHARD_HDR, "shard header size");
_Static_assert(sizeof(series_slot) == 128, "series slot size");
_Static_assert(sizeof(m3_rec) == 48, "record header size");
_Static_assert(sizeof(chunk) % 8 == 0, "chunk header alignment");

static inline seg_hdr *seg_of(uint8_t *base) { return (seg_hdr *)base; }
static inline const seg_hdr *cseg_of(const uint8_t *base) { return (const seg_hdr *)base; }

static inline lane_hdr *lane_at(uint8_t *base, uint32_t shard, uint32_t producer)
{
    const seg_hdr *h = cseg_of(base);
    return (lane_hdr *)(base + h->lanes_off +
                        ((uint64_t)shard * h->p.num_producers + producer) * h->lane_stride);
}
static inline uint8_t *lane_data(lane_hdr *l) { return (uint8_t *)l + LANE_HDR; }

static inline uint8_t *shard_at(uint8_t *base, uint32_t shard)
{
    const seg_hdr *h = cseg_of(base);
    return base + h->shards_off + (uint64_t)shard * h->shard_stride;
}

static inline uint64_t round8(uint64_t x) { return (x + 7) & ~(uint64_t)7; }

/* Bytes of a record with these counts (labels padded to 8, then ts[n], then v[n]). */
static inline uint64_t rec_bytes(uint32_t labels_len, uint32_t nsamples)
{
    return sizeof(m3_rec) + round8(labels_len) + (uint64_t)nsamples * 16;
}

/* Check a record header against the bytes available; 0 if well formed. */
int m3_rec_check(const m3_rec *r, size_t avail, uint32_t num_shards);
/* Format canonical labels as {a="b", ...} into out (always NUL-terminated, truncated). */
void m3_labels_format(const uint8_t *labels, size_t len, char *out, size_t cap);
/* Owner-side apply used by the lane drain (series.c). */
int m3_shard_apply_rec(uint8_t *base, const m3_rec *rec);

#endif
