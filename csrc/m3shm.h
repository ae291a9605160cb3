/*
 * m3shm.h -- the one public header of m3shm's C core.
 *
 * cffi parses this file as it is (csrc/build_ffi.py passes it to ffi.cdef), so it holds only
 * what cdef understands: typedefs, structs, enums and prototypes. No #include, no #if, no
 * include guard, no function-like macros. C files include <stdint.h> and <stddef.h> first.
 *
 * Conventions:
 *  - Every fallible function returns an int from enum m3_err: 0 on success, a negative code on
 *    failure. Python maps the codes to exceptions in exactly one place (m3shm/errors.py).
 *  - Structs that may live in shared memory hold no pointers, only offsets and plain values.
 *  - Each section below belongs to one csrc/ file, named in its heading.
 */

/* ---- errors (every csrc file) --------------------------------------------------------- */

enum m3_err {
    M3_OK = 0,
    M3_EINVAL = -1,      /* a bad argument from the caller (NULL, wrong length, bad option) */
    M3_ENOSPC = -2,      /* the caller's buffer is too small; nothing was written */
    M3_EORDER = -3,      /* a timestamp not greater than the previous one */
    M3_ECORRUPT = -4,    /* input bytes are not a valid encoding */
    M3_ETRUNC = -5,      /* input bytes end before the encoding does */
    M3_EVERSION = -6,    /* an encoding or layout version this build does not know */
    M3_ERANGE = -7,      /* a value outside what the format can hold */
    M3_ENOENT = -8       /* no such series: a free slot, or a generation that is gone */
};

/* ---- codec.c: M3TSZ-style time-series codec (format: docs/formats/tsz.md) ------------ */

/* Bytes before the bit stream: magic "TZ", version, flags, published sample count (u32 LE). */
#define TSZ_HEADER_BYTES 8
/* An upper bound on the bytes one appended sample can add (148 bits + a partial byte). */
#define TSZ_MAX_SAMPLE_BYTES 24
#define TSZ_VERSION 1

/*
 * Encoder state: plain values only, so it can live in shared memory beside its buffer and a
 * process can resume a stream another one started. `seq` is odd while an append is updating
 * the state; tsz_enc_resume() rebuilds the state from the published bytes when it finds the
 * state torn or ahead of / behind the published count.
 */
typedef struct tsz_enc {
    uint64_t nbits;       /* bits of stream written after the header */
    uint64_t prev_ts;     /* previous timestamp (two's complement int64 stored unsigned) */
    uint64_t prev_delta;  /* previous timestamp delta (mod 2^64) */
    uint64_t prev_bits;   /* previous value's float64 bit pattern */
    int64_t prev_int;     /* previous value scaled by 10^mult, valid in integer mode */
    uint32_t count;       /* samples appended */
    uint32_t seq;         /* odd while an append is in progress */
    uint8_t mode;         /* 0 = XOR mode, 1 = integer mode */
    uint8_t mult;         /* integer mode: decimal exponent k (value = int / 10^k) */
    uint8_t sig;          /* integer mode: bits of |delta| that '10' carries */
    uint8_t lead;         /* XOR mode: leading zero bits of the current window */
    uint8_t mlen;         /* XOR mode: meaningful bits of the current window (0 = none yet) */
    uint8_t low_run;      /* integer mode: consecutive deltas that fit in fewer bits */
    uint8_t low_max;      /* integer mode: widest of those deltas */
    uint8_t pad;
} tsz_enc;

/* Start a stream in buf (cap bytes, at least TSZ_HEADER_BYTES): writes the header. */
int tsz_enc_init(tsz_enc *e, uint8_t *buf, size_t cap);
/* Append one sample. M3_ENOSPC if fewer than TSZ_MAX_SAMPLE_BYTES remain (nothing written),
   M3_EORDER if ts <= the previous timestamp. Publishes the new count last (release). */
int tsz_enc_append(tsz_enc *e, uint8_t *buf, size_t cap, int64_t ts, double v);
/* Append n samples; *done receives how many were appended before any error. */
int tsz_enc_append_many(tsz_enc *e, uint8_t *buf, size_t cap, const int64_t *ts,
                        const double *v, size_t n, size_t *done);
/* Bytes of buf in use (header + whole bytes of the bit stream). */
size_t tsz_enc_size(const tsz_enc *e);
/* Check e against the stream in buf and rebuild it from the published samples if needed
   (after the process that appended died). Returns M3_OK or the decode error. */
int tsz_enc_resume(tsz_enc *e, uint8_t *buf, size_t cap);
/* Encode n samples into a fresh stream in buf; *size receives the bytes used. */
int tsz_encode(const int64_t *ts, const double *v, size_t n, uint8_t *buf, size_t cap,
               size_t *size);
/* Worst-case bytes of a stream of n samples. */
size_t tsz_bound(size_t n);
/* Read and sanity-check the header: *count = published samples (acquire). */
int tsz_count(const uint8_t *buf, size_t len, uint32_t *count);
/* The same check without an out-parameter: the published count, or a negative m3_err. */
int64_t tsz_samples(const uint8_t *buf, size_t len);
/* Decode min(published, cap) samples into ts/v: returns how many, or a negative m3_err. */
int64_t tsz_decode(const uint8_t *buf, size_t len, int64_t *ts, double *v, size_t cap);
/* After a failed decode, where it failed: *n samples decoded before stream bit *err_bit. */
int tsz_decode_diag(const uint8_t *buf, size_t len, size_t *n, uint64_t *err_bit);
/* Blocks stored back to back: block i is buf[offs[i], offs[i+1]). tsz_count_many fills
   out[0..nblocks] with the prefix sums of their counts (out[0] = 0); tsz_decode_many then
   decodes block i into ts/v[out[i], out[i+1]). On error *bad is the failing block's index. */
int tsz_count_many(const uint8_t *buf, const uint64_t *offs, size_t nblocks, uint64_t *out,
                   size_t *bad);
int tsz_decode_many(const uint8_t *buf, const uint64_t *offs, size_t nblocks,
                    const uint64_t *out, int64_t *ts, double *v, size_t *bad);

/* ---- segment.c: the shared-memory segment's header and layout (docs/formats/shm.md) ---- */

#define M3_SEG_LAYOUT_VERSION 6
#define M3_CACHE_LINE 64
/* Bytes of one chunk of an open block (header + tsz stream); changing it changes the layout. */
#define M3_CHUNK_BYTES 512
/* Open (appendable) streams a series tracks; changing it changes the layout. */
#define M3_OPEN_STREAMS 8
/* Most samples one lane record carries; longer series are split into several records. */
#define M3_REC_MAX_SAMPLES 512
#define M3_MAX_SHARDS 4096
#define M3_MAX_PRODUCERS 256
/* Reader slots in the segment (epoch.c): threads of any process that read shards. */
#define M3_MAX_READERS 256
/* m3_seg_params.flags */
#define M3_NS_COLD_WRITES 1

/* Parameters fixed when a segment is created; recorded in its header. */
typedef struct m3_seg_params {
    uint32_t num_shards;        /* shard = series hash mod num_shards */
    uint32_t num_producers;     /* workers; one lane per (shard, producer) */
    uint64_t lane_bytes;        /* data bytes per lane, a power of two >= 64 KiB */
    uint32_t series_per_shard;  /* new series are refused beyond this many per shard */
    uint32_t ns_id;             /* namespace of the open blocks: 0 = the raw `default` one */
    uint64_t arena_bytes;       /* per shard: labels and chunks, a multiple of M3_CHUNK_BYTES */
    int64_t block_ms;           /* block size of the open blocks (ms) */
    uint64_t seq_base;          /* first global batch sequence number */
    /* The namespace's write window, recorded for every process (the C core does not use
       them: an owner stores whatever it is given, see m3_block_seal for warm vs cold). */
    int64_t buffer_past_ms;
    int64_t buffer_future_ms;
    int64_t retention_ms;
    uint32_t flags;             /* M3_NS_COLD_WRITES */
    uint32_t pad1;
} m3_seg_params;

/* Bytes a segment with these parameters needs, or 0 if they are invalid. */
uint64_t m3_seg_size(const m3_seg_params *p);
/* Lay out a fresh segment in base[0..size) (zero-filled by the caller, e.g. ftruncate). */
int m3_seg_init(uint8_t *base, uint64_t size, const m3_seg_params *p);
/* Validate an existing segment's header (magic, layout version, size); *p receives its params. */
int m3_seg_check(const uint8_t *base, uint64_t size, m3_seg_params *p);
/* Take the next global batch sequence number (atomic; any process). */
uint64_t m3_seg_next_seq(uint8_t *base);
/* Per-producer "done" flag used by a graceful shutdown (any process reads). */
void m3_seg_set_producer_done(uint8_t *base, uint32_t producer, uint32_t done);
int m3_seg_all_producers_done(const uint8_t *base);

/* ---- lane.c: single-producer lanes that together form each shard's MPSC ring ---------- */

/* Record types in lanes and commit-log batches (persisted: explicit values). */
enum m3_rec_type {
    M3_REC_PAD = 1,       /* filler to the end of the lane's buffer; skip */
    M3_REC_SAMPLES = 2,   /* a label set and its samples */
    M3_REC_ROLLUP_IN = 3  /* forwarded rollup window values for a group cell (rollup.c) */
};
enum m3_value_type {
    M3_VT_FLOAT = 1       /* float64 samples; 2 is reserved for native histograms */
};

/* Header of one record; labels, timestamps and values follow (docs/formats/shm.md). */
typedef struct m3_rec {
    uint32_t len;         /* bytes of the whole record, a multiple of 8 */
    uint16_t type;        /* enum m3_rec_type */
    uint16_t vtype;       /* enum m3_value_type */
    uint32_t shard;
    uint32_t tenant;      /* 0 = the default tenant */
    uint64_t seq;         /* global batch sequence number */
    uint64_t hash;        /* m3_labels_hash of the canonical label bytes */
    uint32_t nsamples;
    uint32_t labels_len;  /* bytes of canonical labels (padded to 8 in the record) */
    uint32_t nlabels;
    uint32_t pad;         /* 0; reserved for a namespace id */
} m3_rec;

/* Copy every record of a batch into this producer's lanes past their published tails, stamped
   with seq. All or nothing: M3_ENOSPC (and no lane changed) if any lane lacks room. */
int m3_lane_reserve(uint8_t *base, uint32_t producer, const uint8_t *batch, size_t len,
                    uint64_t seq);
/* As m3_lane_reserve, then draw the batch's global seq (stored in *seq and stamped into its
   records) and advertise it as pending until m3_lane_publish, so owners apply every shard's
   records in seq order (lane.c). M3_ENOSPC: nothing reserved and no seq drawn. */
int m3_lane_reserve_next(uint8_t *base, uint32_t producer, const uint8_t *batch, size_t len,
                         uint64_t *seq);
/* Publish everything this producer reserved (release store of each lane's tail), then clear
   its pending seq and ring the doorbell (bell.c) of every sleeping owner it published to. */
void m3_lane_publish(uint8_t *base, uint32_t producer);
/* The same, ringing the doorbells kept in segment `bells` (the daemon's raw segment). */
void m3_lane_publish_bells(uint8_t *base, uint32_t producer, uint8_t *bells);
/* Forget reserved but unpublished bytes (a restarted producer calls this first). */
void m3_lane_recover_producer(uint8_t *base, uint32_t producer);
/* Owner: apply published records of one shard, smallest seq first, up to max_records.
   Returns the records applied (>= 0). */
int m3_lane_drain(uint8_t *base, uint32_t shard, uint32_t max_records);
/* Owner side of a test consumer: pop one record of (shard, producer) into out (cap bytes);
   *len = 0 when the lane is empty. Used by tests to check the lane protocol alone. */
int m3_lane_pop_spsc(uint8_t *base, uint32_t shard, uint32_t producer, uint8_t *out,
                     size_t cap, size_t *len);
/* Every lane's published tail (num_shards * num_producers values, shard-major). */
void m3_lane_tails(const uint8_t *base, uint64_t *tails);
/* 1 if every lane's head has reached the given tails (all published data applied). */
int m3_lane_caught_up(const uint8_t *base, const uint64_t *tails);
/* Bytes published but not yet consumed in all lanes of one shard. */
uint64_t m3_lane_backlog(const uint8_t *base, uint32_t shard);

/* ---- bell.c: owner doorbells, so an idle drain thread sleeps instead of polling ------- */

/* Owner: sleep up to timeout_ms on its doorbell in segment `bells` unless a lane of shards
   [lo, hi) in one of segs[0..nsegs) holds published records. Returns 1 (did not sleep: work
   waits), 0 (slept: woken by a ring, or timed out), or an error. */
int m3_bell_wait(uint8_t *bells, uint32_t owner, uint8_t **segs, uint32_t nsegs, uint32_t lo,
                 uint32_t hi, uint32_t timeout_ms);
/* Wake owner if it sleeps in m3_bell_wait (anything the caller stored before is visible). */
void m3_bell_ring(uint8_t *bells, uint32_t owner);
/* The worker that drains shard of num_shards split among num_producers contiguous ranges
   (UINT32_MAX for bad arguments); publish rings exactly these owners. */
uint32_t m3_shard_owner(uint32_t shard, uint32_t num_shards, uint32_t num_producers);

/* ---- series.c: per-shard series table and open blocks in shared memory -------------- */

/* Hash of canonical label bytes (fixed forever: it decides the shard of every series). */
uint64_t m3_labels_hash(const uint8_t *labels, size_t len);

typedef struct m3_shard_stats {
    uint64_t nseries;        /* live series */
    uint64_t arena_used;     /* arena bytes in use (bump pointer minus free and limbo bytes) */
    uint64_t arena_bytes;
    uint64_t samples;        /* samples applied */
    uint64_t ooo_samples;    /* samples that opened or went to a non-first stream */
    uint64_t dropped;        /* records the owner could not apply (capacity overshoot) */
    uint64_t recovered;      /* 1 once replay/recovery of the shard is done */
    uint64_t slots;          /* slot high-water mark: iterate [0, slots), skip free slots */
    uint64_t arena_bump;     /* bump pointer (never moves back) */
    uint64_t chunks_free;    /* chunks on the free list, ready for reuse */
    uint64_t chunks_limbo;   /* released chunks waiting for readers to pass their epoch */
    uint64_t chunks_released;/* chunks released since the segment was created */
    uint64_t series_removed; /* series expired since the segment was created */
    uint64_t slots_limbo;    /* expired slots waiting for readers */
    int64_t warm_floor;      /* blocks starting below it take only cold writes */
} m3_shard_stats;

/* Owner: apply a record directly (replay). */
int m3_shard_apply(uint8_t *base, const m3_rec *rec);
/* Owner: apply the records of a commit-log batch whose shard is in [lo, hi). Returns the
   records applied or an error for a malformed batch. */
int m3_shard_apply_batch(uint8_t *base, const uint8_t *batch, size_t len, uint64_t seq,
                         uint32_t lo, uint32_t hi);
/* Owner, at attach: repair what a killed owner may have left half-done (encoder states,
   chain ends, the last series' table entry). */
int m3_shard_recover(uint8_t *base, uint32_t shard);
void m3_shard_set_recovered(uint8_t *base, uint32_t shard, uint32_t v);
void m3_shard_stats_get(const uint8_t *base, uint32_t shard, m3_shard_stats *out);
/* Producer: drop from a batch (in place) the records a full shard cannot take: new series
   beyond series_per_shard or arena 7/8 full, every record at arena 15/16. Returns the new
   length; *rejected counts dropped records and msg (cap bytes) names the first. */
size_t m3_batch_admit(const uint8_t *base, uint8_t *batch, size_t len, uint32_t *rejected,
                      uint32_t *rejected_samples, char *msg, size_t msg_cap);
/* Any process: the slot high-water mark of a shard (acquire): slots [0, n) have been used;
   some may be free now (m3_series_get says M3_ENOENT). */
uint32_t m3_shard_nseries(const uint8_t *base, uint32_t shard);

/* Series readers (any process) must be inside a read section (epoch.c) so that the slot,
   its labels and its chunks are not reused under them. Within one section a live slot keeps
   its generation; a series is named by (shard, slot, gen) across sections. */
typedef struct m3_series_info {
    uint64_t hash;
    const uint8_t *labels;   /* canonical labels, in the segment (valid inside the section) */
    uint32_t labels_len;
    uint32_t nlabels;
    uint32_t gen;            /* bumped each time the slot is reused */
    uint32_t tenant;
    int64_t max_ts;          /* largest timestamp ever applied to the series */
} m3_series_info;
/* M3_ENOENT if the slot is free (never used, or its series expired). */
int m3_series_get(const uint8_t *base, uint32_t shard, uint32_t slot, m3_series_info *out);
/* Canonical labels of a live series (pointer into the segment); M3_ENOENT if free. */
int m3_series_labels(const uint8_t *base, uint32_t shard, uint32_t slot,
                     const uint8_t **labels, uint32_t *len);
/* Upper bound on the samples of a series (published counts of its chunks); 0 if free. */
uint64_t m3_series_count(const uint8_t *base, uint32_t shard, uint32_t slot);
/* The series' samples in [mint, maxt], sorted, one per timestamp (the last written wins).
   M3_ENOSPC if cap is too small, M3_ENOENT if the slot is free. */
int m3_series_read(const uint8_t *base, uint32_t shard, uint32_t slot, int64_t mint,
                   int64_t maxt, int64_t *ts, double *v, size_t cap, size_t *n);

/* ---- epoch.c: reader slots and epochs, so freed memory is never reused under a reader --- */

/* A reading thread claims a slot once (tagged with its pid and process start time) and
   brackets every read of shard memory with m3_read_begin/m3_read_end (nestable). Memory an
   owner releases is reused only after every reader that was inside a section at the release
   has left it. A slot whose process is gone is cleared by m3_readers_reap, which owners call
   themselves when a slot holds reclamation back, so a SIGKILLed reader blocks nothing for
   long. M3_ENOSPC when all M3_MAX_READERS slots are held by live processes. */
int m3_reader_claim(uint8_t *base, uint32_t *rslot);
void m3_reader_release(uint8_t *base, uint32_t rslot);
void m3_read_begin(uint8_t *base, uint32_t rslot);
void m3_read_end(uint8_t *base, uint32_t rslot);
/* Clear the slots of processes that no longer exist; returns how many were cleared. */
uint32_t m3_readers_reap(uint8_t *base);
/* The global epoch (starts at 1; every release advances it). */
uint64_t m3_epoch_now(const uint8_t *base);

/* ---- block.c: block lifecycle of the open blocks (flush, cold writes, reclamation, churn) */

/* A chunk is warm if its block had not been sealed warm when the chunk was created (its
   block start was >= the shard's warm floor), cold otherwise. Flushing one block of a shard:
     1. m3_block_seal(warm)  - owner: no more appends to the block's warm chunks; the warm
                               floor moves past the block, so later samples of it (late
                               warm writes, cold writes, replay) go to new cold chunks;
     2. m3_block_encode      - any thread in a read section: one merged tsz stream per series
                               of the sealed chunks, into the caller's buffer (resumable);
     3. write the fileset, make it durable;
     4. m3_block_release     - owner: unlink the sealed chunks; they return to the free list
                               once every reader has left the sections it was in.
   Cold data of an already flushed block goes the same way with kind M3_BLK_COLD (the flush
   side writes volume N+1 = volume N merged with it). Data that is never sealed is never
   released, so nothing acknowledged is dropped by a flush that dies half-way. */
enum m3_blk_kind {
    M3_BLK_WARM = 0,
    M3_BLK_COLD = 1
};

typedef struct m3_block_info {
    int64_t block_start;     /* ms, a multiple of block_ms */
    uint32_t kind;           /* enum m3_blk_kind */
    uint32_t nseries;        /* series with at least one chunk of it */
    uint64_t chunks;
    uint64_t sealed;         /* of which sealed (awaiting m3_block_release) */
    uint64_t samples;        /* published samples over its streams (duplicates included) */
} m3_block_info;

/* Any process: the (block start, kind) pairs a shard holds chunks for, sorted by block start
   then kind. *n = how many exist; M3_ENOSPC (out filled up to cap) if more than cap. */
int m3_shard_blocks(const uint8_t *base, uint32_t shard, m3_block_info *out, size_t cap,
                    size_t *n);
/* Owner: seal the unsealed chunks of (block_start, kind). Returns the chunks sealed. */
int m3_block_seal(uint8_t *base, uint32_t shard, int64_t block_start, uint32_t kind);

/* One series of an encoded block: out[labels_off, +labels_len) are its canonical labels and
   out[data_off, +data_len) a tsz stream (docs/formats/tsz.md) of its `count` samples, sorted,
   one per timestamp, the last write winning. */
typedef struct m3_flush_entry {
    uint32_t slot;
    uint32_t gen;
    uint64_t hash;
    uint64_t labels_off;
    uint32_t labels_len;
    uint32_t count;
    uint64_t data_off;
    uint64_t data_len;
    int64_t mint;
    int64_t maxt;
} m3_flush_entry;

/* Inside a read section: encode the sealed chunks of (block_start, kind) for slots from
   *cursor on, in slot order, into out (cap bytes) and idx (idx_cap entries). *used = bytes
   written, *n = entries. Returns 1 if it stopped because out or idx was full (call again
   with the updated *cursor and fresh buffers), 0 when every slot has been visited, M3_ENOSPC
   if not even the next series fits in an empty out (needs more than cap bytes). */
int m3_block_encode(const uint8_t *base, uint32_t shard, int64_t block_start, uint32_t kind,
                    uint32_t *cursor, uint8_t *out, size_t cap, size_t *used,
                    m3_flush_entry *idx, size_t idx_cap, size_t *n);
/* Owner: unlink the sealed chunks of (block_start, kind) and hand them to the limbo list.
   Returns the chunks released. */
int m3_block_release(uint8_t *base, uint32_t shard, int64_t block_start, uint32_t kind);
/* Owner: move limbo chunks and slots that no reader can still see to the free lists. Returns
   how many objects were freed. (Allocation and release also call it.) */
int m3_shard_reclaim(uint8_t *base, uint32_t shard);
/* Owner: remove live series with no chunks left whose newest sample is older than
   idle_before_ms: table entry deleted, slot and labels freed through limbo, slot reused later
   with gen + 1. Returns the series removed. */
int m3_shard_expire_series(uint8_t *base, uint32_t shard, int64_t idle_before_ms);
/* Owner: raise the warm floor (e.g. at start-up, to the end of the newest flushed block). */
void m3_shard_set_warm_floor(uint8_t *base, uint32_t shard, int64_t floor_ms);

/* ---- rw_decode.c, rw2_decode.c, rw_series.c: remote write 1.0 / 2.0 -> lane records ---- */

/* Why a series (or metadata entry, or request) was rejected (persisted in no file; values
   are stable for logs and tests). */
enum m3_rw_reason {
    M3_RW_OK = 0,
    M3_RW_BAD_LABEL_NAME = 1,
    M3_RW_DUP_LABEL = 2,
    M3_RW_NO_LABELS = 3,
    M3_RW_NO_NAME = 4,
    M3_RW_TOO_MANY_LABELS = 5,
    M3_RW_LABEL_TOO_LONG = 6,
    M3_RW_TOO_OLD = 7,
    M3_RW_TOO_NEW = 8,
    M3_RW_HISTOGRAM = 9,
    M3_RW_MALFORMED = 10,
    M3_RW_BAD_UTF8 = 11,
    M3_RW_EXEMPLARS = 12,        /* exemplars are not stored yet (the samples are) */
    M3_RW_BAD_REF = 13,          /* 2.0: a symbol reference out of range or an odd count */
    M3_RW_TOO_MANY_SERIES = 14,  /* more than limits.max_series_per_request: nothing written */
    M3_RW_BAD_METADATA = 15      /* a metadata entry with a bad name, type or text */
};

typedef struct m3_rw_limits {
    int64_t min_ts;              /* accepted window, ms, inclusive */
    int64_t max_ts;
    uint32_t num_shards;
    uint32_t max_labels;
    uint32_t max_name_bytes;
    uint32_t max_value_bytes;
    uint64_t max_series;         /* series per request; more fails the whole request */
} m3_rw_limits;

/* One metadata entry of a request (1.0: WriteRequest.metadata; 2.0: a series' metadata keyed
   by its __name__). Offsets point into the decoder's input buffer. */
typedef struct m3_rw_meta {
    uint64_t name_off;
    uint64_t help_off;
    uint64_t unit_off;
    uint32_t name_len;
    uint32_t help_len;
    uint32_t unit_len;
    uint32_t type;               /* MetricType: 0 unknown, 1 counter, ... 7 stateset */
    uint64_t hash;               /* m3_rw_meta_hash of the entry, never 0 or 1 */
} m3_rw_meta;

/* Where a decode writes. `known` is an open-addressing set of the metadata hashes the caller
   has stored (known_size a power of two, or 0; slot value 0 = empty, 1 = deleted): entries in
   it are not emitted again. `symbols` is 2.0's scratch: room for symbols_cap symbols, two
   u64 (offset, length) each. Capacities count elements (bytes, entries, symbols). */
typedef struct m3_rw_out {
    uint8_t *records;
    uint64_t records_cap;
    m3_rw_meta *meta;
    uint64_t meta_cap;
    const uint64_t *known;
    uint64_t known_size;
    uint64_t *symbols;
    uint64_t symbols_cap;
} m3_rw_out;

typedef struct m3_rw_result {
    uint64_t series_ok;
    uint64_t samples_ok;
    uint64_t series_bad;
    uint64_t samples_bad;
    uint64_t histograms_bad;     /* native histogram samples rejected */
    uint64_t exemplars_bad;      /* exemplars rejected */
    uint64_t meta_bad;           /* metadata entries rejected */
    uint64_t records;
    uint64_t out_len;            /* bytes of records written to out->records */
    uint64_t out_needed;         /* bytes the records need (> records_cap after M3_ENOSPC) */
    uint64_t nmeta;              /* metadata entries written to out->meta */
    uint64_t nseries;            /* time series in the request */
    uint64_t nsymbols;           /* 2.0: symbols in the request */
    int32_t first_reason;        /* enum m3_rw_reason of the first rejection */
    uint32_t first_series;       /* its index in the request */
    char msg[512];               /* what was wrong, naming the series */
} m3_rw_result;

/* Decode a remote write 1.0 WriteRequest (already snappy-decompressed) into records and
   metadata. M3_ECORRUPT/M3_ETRUNC for malformed protobuf (res->msg says where), M3_ENOSPC if
   out->records or out->meta is too small (retry with more). Invalid series are counted and
   skipped, not fatal; more than lim->max_series series writes nothing (M3_RW_TOO_MANY_SERIES). */
int m3_rw1_decode(const uint8_t *in, size_t len, const m3_rw_limits *lim, m3_rw_out *out,
                  m3_rw_result *res);
/* The same for a remote write 2.0 io.prometheus.write.v2.Request. M3_ENOSPC also when
   out->symbols_cap < res->nsymbols (res->nsymbols says how many are needed). */
int m3_rw2_decode(const uint8_t *in, size_t len, const m3_rw_limits *lim, m3_rw_out *out,
                  m3_rw_result *res);
/* Hash of a metadata entry (name, type, help, unit); never 0 or 1. */
uint64_t m3_rw_meta_hash(const uint8_t *name, size_t nlen, uint32_t type, const uint8_t *help,
                         size_t hlen, const uint8_t *unit, size_t ulen);

/* ---- shard_read.c: bulk reads of shards for queries, by any process (docs/formats/shm.md) */

/* One chunk copied out of a shard: its stream is out[off, off + len), a tsz stream whose
   header count is `count`. */
typedef struct m3_chunk_ref {
    uint32_t series;       /* index into the caller's slot list */
    uint32_t count;        /* published samples held by the copy */
    int64_t block_start;   /* ms; every sample is in [block_start, block_start + block_ms) */
    uint64_t stream;       /* higher = written later (wins equal timestamps) */
    uint64_t off;          /* bytes into the caller's out buffer */
    uint64_t len;          /* bytes of the copied stream */
} m3_chunk_ref;

/* Every function of this section must be called inside a read section (m3_read_begin). A
   series is named by (shard, slot, gen): a slot whose series expired is reused with gen + 1.

   Per shard (num_shards entries each): the slot high-water mark and the count of series
   expired so far (acquire loads, in that order). While the count stays the same, no slot
   below an earlier high-water mark has changed except slots that were not live then, which
   may have been reused. */
void m3_shards_churn(const uint8_t *base, uint32_t *nseries, uint64_t *removed);
/* The generation of each of slots[0..n) into gens: 0 if the slot is not live (never used,
   expired, or beyond the high-water mark). */
int m3_series_gens(const uint8_t *base, uint32_t shard, const uint32_t *slots, size_t n,
                   uint32_t *gens);
/* Canonical labels of the live series among slots[0..n) back to back into out, with their
   generations (gens[i] = 0 and no bytes for a slot that is not live); offs[0..n] receive the
   boundaries. Stops at a slot that does not fit: *done = slots done (M3_ENOSPC if none). */
int m3_series_labels_many(const uint8_t *base, uint32_t shard, const uint32_t *slots,
                          size_t n, uint8_t *out, size_t cap, uint64_t *offs, uint32_t *gens,
                          size_t *done);
/* Per series (slots[i], gens[i]) of [0, n): chunks that may hold samples in [mint, maxt] (by
   their first and last timestamps) and their published samples (what m3_series_chunks would copy now); 0 and 0 for a series that is
   gone (its slot not live, or live with another generation). */
int m3_series_extent(const uint8_t *base, uint32_t shard, const uint32_t *slots,
                     const uint32_t *gens, size_t n, int64_t mint, int64_t maxt,
                     uint32_t *chunks, uint64_t *samples);
/* Copy the published streams of those chunks into out, each series' chunks sorted by
   (block_start, stream), described by refs; nothing for a series that is gone. Stops before a
   series that does not fit in out_cap bytes / max_refs refs: *done = series copied, *nrefs =
   refs written (M3_ENOSPC if not even the first series fits). */
int m3_series_chunks(const uint8_t *base, uint32_t shard, const uint32_t *slots,
                     const uint32_t *gens, size_t n, int64_t mint, int64_t maxt, uint8_t *out,
                     size_t out_cap, m3_chunk_ref *refs, size_t max_refs, size_t *done,
                     size_t *nrefs);

/* ---- aggwin.c: aggregation windows and transforms for downsampling (docs/formats/aggwin.md) */

/* Layout of a cell; changing any constant or struct below changes the format: bump it. */
#define M3_AGG_VERSION 2
#define M3_AGG_MAX_WINDOWS 64    /* open windows one cell can hold (its ring) */
#define M3_AGG_MAX_OPS 4         /* transforms per chain (before / after the window) */
#define M3_SKETCH_POS 256        /* buckets for positive values */
#define M3_SKETCH_NEG 64         /* buckets for negative values */
/* Aggregation bits that need the quantile sketch (Median, P10 .. P9999). */
#define M3_AGG_SKETCH_MASK 0x3FFE10

/* Aggregation types: bit numbers in an aggregation mask (persisted: explicit values). */
enum m3_agg_type {
    M3_AGG_LAST = 0, M3_AGG_MIN = 1, M3_AGG_MAX = 2, M3_AGG_MEAN = 3, M3_AGG_MEDIAN = 4,
    M3_AGG_COUNT = 5, M3_AGG_SUM = 6, M3_AGG_SUMSQ = 7, M3_AGG_STDEV = 8,
    M3_AGG_P10 = 9, M3_AGG_P20 = 10, M3_AGG_P30 = 11, M3_AGG_P40 = 12, M3_AGG_P50 = 13,
    M3_AGG_P60 = 14, M3_AGG_P70 = 15, M3_AGG_P80 = 16, M3_AGG_P90 = 17, M3_AGG_P95 = 18,
    M3_AGG_P99 = 19, M3_AGG_P999 = 20, M3_AGG_P9999 = 21
};

/* Transforms (persisted: explicit values). */
enum m3_xform {
    M3_XF_NONE = 0,
    M3_XF_INCREASE = 1,   /* v - previous v; a drop means the counter restarted at 0: v */
    M3_XF_PERSECOND = 2,  /* the increase per second */
    M3_XF_ADD = 3,        /* running sum (re-accumulates increments into a counter) */
    M3_XF_ABSOLUTE = 4    /* |v| */
};

/* Log-bucketed relative-error quantile sketch of one window (alpha = 2%, see aggwin.c). */
typedef struct m3_sketch {
    uint64_t zero;                  /* values equal to 0 */
    int32_t pos_lo;                 /* bucket index held by pos[0]; INT32_MIN = empty */
    int32_t neg_lo;                 /* bucket index (of |v|) held by neg[0]; INT32_MIN = empty */
    uint32_t pos[M3_SKETCH_POS];
    uint32_t neg[M3_SKETCH_NEG];
} m3_sketch;

/* State of one transform in a chain. */
typedef struct m3_xstate {
    int64_t prev_ts;
    double prev;
    double acc;
    uint32_t have;        /* 1 once prev is set */
    uint32_t pad;
} m3_xstate;

/* What a cell aggregates and how (set once by m3_agg_cell_init). */
typedef struct m3_agg_params {
    int64_t res_ms;        /* window length, > 0 */
    int64_t admission_ms;  /* a window is final once its end + admission_ms <= now */
    uint32_t aggmask;      /* 1 << enum m3_agg_type for each aggregation emitted */
    uint32_t nwin;         /* open windows held, 1 .. M3_AGG_MAX_WINDOWS */
    uint8_t pre[M3_AGG_MAX_OPS];   /* per-sample transforms before the window (0-terminated) */
    uint8_t post[M3_AGG_MAX_OPS];  /* per-window transforms of the finalised value */
} m3_agg_params;

/* A cell: the aggregation state of one (series or rollup group, storage policy, rule).
   Fixed size, no pointers: it may live in shared memory. This header is followed by the
   transform state (only when the cell has transforms), nwin windows holding only the fields
   its aggregations need, and their sketches (docs/formats/aggwin.md; m3_agg_cell_layout). */
typedef struct m3_aggcell {
    uint32_t magic;        /* "AGWC" */
    uint16_t version;      /* M3_AGG_VERSION */
    uint16_t flags;        /* 1 = windows carry sketches, 2 = rate (PerSecond before window) */
    m3_agg_params p;
    uint64_t last_seq;     /* highest batch sequence applied (0 = none) */
    int64_t done_widx;     /* every window <= done_widx is final */
    int64_t due_ms;        /* earliest time an open window may become final; INT64_MAX = none */
    int64_t lo_widx;       /* no open window below it (a bound, not necessarily open) */
    int64_t hi_widx;       /* the newest open window (INT64_MIN: none ever opened) */
    uint64_t applied;      /* samples applied to a window */
    uint64_t late;         /* samples for a final window: counted, not applied */
    uint64_t ooo;          /* samples not after the previous one, skipped by a transform */
    uint64_t dup;          /* samples skipped because their batch was applied already */
    uint64_t invalid;      /* NaN values and timestamps beyond +-2^62 ms, skipped */
    uint64_t evicted;      /* windows finalised early to make room in the ring */
    uint64_t emitted;      /* windows finalised */
} m3_aggcell;

/* One finalised aggregate: cell index, enum m3_agg_type, window end (ms), value. */
typedef struct m3_agg_out {
    uint32_t cell;
    uint32_t agg;
    int64_t ts;
    double value;
} m3_agg_out;

/* Bytes of a cell with these parameters (header + windows + sketches), a multiple of 8, or 0
   if they are invalid. */
uint64_t m3_agg_cell_bytes(const m3_agg_params *p);
/* Where a cell with these parameters keeps its parts: bytes before window 0 (header and
   transform state), of one window, of one sketch (0: none). M3_EINVAL if params are invalid. */
int m3_agg_cell_layout(const m3_agg_params *p, uint32_t *head_bytes, uint32_t *win_bytes,
                       uint32_t *sketch_bytes);
/* Lay out a fresh cell in cell[0..cap). M3_EINVAL names nothing: m3_agg_params_check says why. */
int m3_agg_cell_init(uint8_t *cell, uint64_t cap, const m3_agg_params *p);
/* Why params are invalid: 0 if valid, else a short static message. */
const char *m3_agg_params_check(const m3_agg_params *p);
/* After a restart: check a cell's header and repair what a killed writer may have left
   (window slots with impossible indexes are dropped). M3_ECORRUPT / M3_EVERSION if unusable. */
int m3_agg_cell_check(uint8_t *cell, uint64_t cap);
/* Undo of one apply: save into undo[0..undo_cap) what applying samples ts[0..n) can change in
   the cell (its header and the window slots of their windows; the whole cell if a window may
   be evicted). Returns the bytes written, 0 if undo_cap is too small. */
uint64_t m3_agg_undo_save(const uint8_t *cell, uint64_t cap, const int64_t *ts, size_t n,
                          uint8_t *undo, uint64_t undo_cap);
/* Put a saved undo back into the cell: M3_OK, or M3_ECORRUPT if it does not fit the cell. */
int m3_agg_undo_restore(uint8_t *cell, uint64_t cap, const uint8_t *undo, uint64_t undo_cap);
/* Apply samples ts/v[0..n) of one series to cell `cell` of an array of cells `stride` bytes
   apart. seq > 0 is the batch's sequence number: a batch not above cell->last_seq is skipped
   as already applied (seq 0: no check). Windows that must leave the ring early are finalised
   into out. M3_ENOSPC when out has no room for them: *done samples were applied, resume there. */
int m3_agg_apply(uint8_t *base, uint64_t stride, uint32_t ncells, uint32_t cell, uint64_t seq,
                 const int64_t *ts, const double *v, size_t n, int64_t now_ms,
                 m3_agg_out *out, size_t cap, size_t *nout, size_t *done);
/* Many runs at once: run r applies samples [run_start[r], run_end[r]) to cell run_cell[r]
   (runs may share samples: one series' samples applied to each of its cells, no copies).
   On M3_ENOSPC, runs [0, *done_runs) are applied and *done samples of the next one. */
int m3_agg_apply_runs(uint8_t *base, uint64_t stride, uint32_t ncells, const uint32_t *run_cell,
                      const uint64_t *run_start, const uint64_t *run_end, size_t nruns,
                      uint64_t seq, const int64_t *ts, const double *v, int64_t now_ms,
                      m3_agg_out *out, size_t cap, size_t *nout, size_t *done_runs,
                      size_t *done);
/* Finalise, oldest first, every window of cells [first, ncells) whose end + admission <= now.
   M3_ENOSPC when out is full: resume from cell *next (its remaining windows stay open). */
int m3_agg_finalise(uint8_t *base, uint64_t stride, uint32_t ncells, uint32_t first,
                    int64_t now_ms, m3_agg_out *out, size_t cap, size_t *nout, uint32_t *next);
/* Replay after a full restart, on the calling thread (set by m3_aggst_replay_mode): a sample
   for a window already final still moves an ordered pre chain's state (not applied). */
void m3_agg_replay_late(int on);
/* Replay: the cell's point for the window ending at `end` (a multiple of its resolution) was
   written before the restart with value v: every window up to it becomes final without a
   row, and a lone Add post transform's running total becomes v. 1 = sealed, 0 = older than a
   window the cell has final already (nothing changed), M3_EINVAL. */
int m3_agg_seal(uint8_t *cell, uint64_t cap, int64_t end, double v);
/* Rules activation: a cell whose ordered pre chain (Increase, PerSecond, Add) has taken no
   sample yet takes over the pre-transform state of cell `from`, the same series' cell with the
   same pre chain in the plan it replaced, so the series' first increment after the activation
   (from its last sample before it) is counted. 1 = taken, 0 = not applicable, M3_EINVAL. */
int m3_agg_take_pre(uint8_t *cell, uint64_t cap, const uint8_t *from, uint64_t from_cap);
/* Rules activation over a rollup group: whether the cell's post chain is a lone Add over one
   aggregation that has emitted no value yet (1) or not (0). */
int m3_agg_post_fresh(const uint8_t *cell, uint64_t cap);
/* Rules activation over a rollup group: a fresh lone Add total (m3_agg_post_fresh) continues
   from cell `from`'s (the group's cell of the same resolution and aggregation in the plan it
   replaced, all of whose windows are final), so the rolled-up counter goes on across the
   change instead of restarting at zero. 1 = taken, 0 = not applicable (either chain is not a
   lone Add, the cell has a value already, `from` has none, or they differ), M3_EINVAL. */
int m3_agg_take_post(uint8_t *cell, uint64_t cap, const uint8_t *from, uint64_t from_cap);
/* Whether a cell's pre chain has taken a sample (1, *last_ts = its time) or not (0; also for
   a cell without a pre chain or one that does not fit cap). */
int m3_agg_pre_last(const uint8_t *cell, uint64_t cap, int64_t *last_ts);
/* Quantile q (0 < q <= 1) of the samples a sketch holds, clamped to [lo, hi]; NaN if empty. */
double m3_sketch_quantile(const m3_sketch *s, double q, double lo, double hi);
/* Empty a sketch; add one value (NaN is ignored). Exposed for tests of the sketch alone. */
void m3_sketch_init(m3_sketch *s);
void m3_sketch_add(m3_sketch *s, double v);
/* Relative error bound alpha of the sketch's estimates (for documentation and tests). */
double m3_sketch_alpha(void);

/* ---- aggstore.c: downsampling cells and plans in shared memory (docs/formats/aggstore.md) */

#define M3_AGGST_VERSION 3
#define M3_AGGST_SPILL 1024      /* evicted rows a shard holds until the next finalise */
/* Scratch of a shard's rollup forward table: the largest cell (64 windows with sketches). */
#define M3_AGGST_FWD_SCRATCH 90112
/* What a cell's finalised rows become (persisted: explicit values). */
enum m3_agg_kind {
    M3_AGGK_OUTPUT = 0,   /* points of an aggregated series (SAMPLES records of its namespace) */
    M3_AGGK_ROLLUP = 1    /* rollup inputs forwarded to a group (M3_REC_ROLLUP_IN) */
};
/* Cell descriptor flags (persisted). */
enum m3_aggc_flags {
    M3_AGGC_AGG_LABEL = 1 /* the series' labels plus m3_aggregation="<agg>" */
};
/* m3_aggst_install flags. */
enum m3_plan_flags {
    M3_PLAN_DROP_RAW = 2  /* the raw samples are not stored (a drop rule) */
};

/* One finalised point: output stream (labels loffs[stream] .. loffs[stream + 1]), namespace
   id, kind, aggregation, window end, value. */
typedef struct m3_aggst_row {
    uint32_t stream;
    uint16_t ns;
    uint8_t kind;
    uint8_t agg;
    int64_t ts;
    double value;
} m3_aggst_row;

typedef struct m3_aggst_stats {
    uint64_t plans;        /* plans with cells */
    uint64_t cells;
    uint64_t cell_bytes;   /* bytes of plan blocks (cells, descriptors, labels) */
    uint64_t arena_used;
    uint64_t arena_bytes;
    uint64_t applied;      /* samples applied to cells (once per cell) */
    uint64_t late;         /* samples for final windows: counted, not applied */
    uint64_t evicted;      /* windows finalised early to make room */
    uint64_t ooo;          /* samples an ordered transform skipped */
    uint64_t points;       /* finalised rows committed */
    uint64_t refused;      /* plans installed without cells (the arena was full) */
    uint64_t spill_lost;   /* evicted rows that found the spill full */
    uint64_t raw_dropped;  /* samples not stored raw (drop rules) */
    uint64_t asked;        /* series reported for a plan */
    uint64_t spill_n;
    int64_t now_floor;
    uint64_t rules_version;
    uint64_t rollup_applied;   /* ROLLUP_IN records applied to group cells */
    uint64_t rollup_dup;       /* ... skipped as already applied (a retried forward) */
    uint64_t rollup_unmatched; /* ... with no group cell of their rule (dropped, counted) */
    uint64_t fwd_refused;  /* source side: ROLLUP_IN records a group namespace refused (lost) */
} m3_aggst_stats;
/* Source shard: count ROLLUP_IN records a group namespace's admission refused (a relaxed
   counter, read by m3_aggst_stats_get). */
void m3_aggst_count_refused(uint8_t *store, uint32_t shard, uint64_t refused);

/* Bytes of a store for this segment with arena_bytes of cells per shard (0 if invalid). */
uint64_t m3_aggst_size(const uint8_t *seg, uint64_t arena_bytes);
/* Lay out a fresh (zero-filled) store for seg; check an existing one against seg. */
int m3_aggst_init(uint8_t *store, uint64_t size, const uint8_t *seg, uint64_t arena_bytes);
int m3_aggst_check(const uint8_t *store, uint64_t size, const uint8_t *seg);
/* Owner, at attach (after m3_shard_recover): check every plan's cells, drop plans it cannot
   trust (they are asked for again). Returns the plans dropped. */
int m3_aggst_recover(uint8_t *seg, uint8_t *store, uint32_t shard);
/* Owner: the plan of series (shard, slot, gen): ncells cells with params[k]; meta[k] =
   ns_id | kind << 16 | cell flags << 24; labels[loffs[k], loffs[k+1]) the fixed labels of cell
   k (empty: the series' own). Replaces any older plan of the slot. M3_ENOENT: the series is
   gone; M3_ENOSPC: the arena is full, the plan is installed without cells (raw only).
   start_ms (INT64_MIN: none): windows ending at or before it are final in the new cells (a
   plan replacing another at a rules activation): the slot's current plan (same gen) is kept
   as the new one's prev and takes every sample stamped at or before start_ms until its
   windows are final and written, then it is freed. M3_ENOSPC then keeps the old plan. A plan
   installed from the same start_ms already is kept as it is (M3_OK). */
int m3_aggst_install(uint8_t *seg, uint8_t *store, uint32_t shard, uint32_t slot, uint32_t gen,
                     uint32_t flags, const m3_agg_params *params, const uint32_t *meta,
                     const uint8_t *labels, const uint64_t *loffs, uint32_t ncells,
                     int64_t start_ms);
/* As m3_aggst_install; rules[k] != 0 makes cell k a rollup group cell fed only by ROLLUP_IN
   records of rule id rules[k] (csrc/rollup.c), never by the series' samples. */
int m3_aggst_install_group(uint8_t *seg, uint8_t *store, uint32_t shard, uint32_t slot,
                           uint32_t gen, uint32_t flags, const m3_agg_params *params,
                           const uint32_t *meta, const uint8_t *labels, const uint64_t *loffs,
                           const uint32_t *rules, uint32_t ncells, int64_t start_ms);
/* As m3_aggst_install_group for each series (shards[i], slots[i], gens[i]) of [0, n): the
   same plan (cells, flags, start_ms) installed for every one, each as its own install
   (M3_ENOENT and M3_ENOSPC per series as there, not errors). *installed = plans installed
   with M3_OK. M3_EINVAL (nothing installed) for bad arguments. */
int m3_aggst_install_many(uint8_t *seg, uint8_t *store, const uint32_t *shards,
                          const uint32_t *slots, const uint32_t *gens, size_t n, uint32_t flags,
                          const m3_agg_params *params, const uint32_t *meta,
                          const uint8_t *labels, const uint64_t *loffs, const uint32_t *rules,
                          uint32_t ncells, int64_t start_ms, size_t *installed);
/* Owner, rollup source side: the shard's unfinished forward (fwd 0 = none) and the finalise
   now / first slot it was prepared with; set before its submit, cleared (fwd 0) after its
   commit, so a restarted owner resends exactly that forward first. */
void m3_aggst_fwd_pending(uint8_t *store, uint32_t shard, uint64_t *fwd, int64_t *now_ms,
                          uint32_t *first);
void m3_aggst_set_fwd_pending(uint8_t *store, uint32_t shard, uint64_t fwd, int64_t now_ms,
                              uint32_t first);
/* Replay after a full restart, on the calling thread (on = 1 before, 0 after): late samples
   move ordered pre-transform state (m3_agg_replay_late); ROLLUP_IN rows of windows ending
   after rollup_max_end are skipped (their sources forward them again); a replayed point of
   a rollup group series seals its group cells (m3_agg_seal). */
void m3_aggst_replay_mode(int on, int64_t rollup_max_end);
/* Owner: the rule-set version the shard's plans are made with (kept across a worker kill). */
void m3_aggst_set_rules_version(uint8_t *store, uint32_t shard, uint64_t version);
/* The plan entry of a slot: generation, flags (1 resolved, 2 drop raw), cells. */
int m3_aggst_plan(uint8_t *store, uint32_t shard, uint32_t slot, uint32_t *gen,
                  uint32_t *flags, uint32_t *ncells);
/* Owner: m3_lane_drain with aggregation at now_ms. Stops before the first record whose series
   has no plan, listing (slot, gen) of up to need_cap planless series of the shard's published
   records in need/need_gen (*nneed). Returns records applied. */
int m3_lane_drain_agg(uint8_t *base, uint8_t *store, uint32_t shard, uint32_t max_records,
                      int64_t now_ms, uint32_t *need, uint32_t *need_gen, size_t need_cap,
                      size_t *nneed);
/* Owner, replay: m3_shard_apply_batch with aggregation, from byte *off of the batch; stops
   (returning records applied, *off at the record) at a series without a plan, listing the
   planless series of the rest of the batch in every shard of [lo, hi) (*nneed > 0; that
   record's shard first). */
int m3_shard_apply_batch_agg(uint8_t *base, uint8_t *store, const uint8_t *batch, size_t len,
                             uint64_t seq, uint32_t lo, uint32_t hi, int64_t now_ms,
                             size_t *off, uint32_t *need_shard, uint32_t *need,
                             uint32_t *need_gen, size_t need_cap, size_t *nneed);
/* The same for a batch whose raw samples a loaded snapshot holds (csrc/snapshot.c): the
   records feed their series' cells only; nothing is appended to the open blocks. */
int m3_shard_apply_batch_agg_cells(uint8_t *base, uint8_t *store, const uint8_t *batch,
                                   size_t len, uint64_t seq, uint32_t lo, uint32_t hi,
                                   int64_t now_ms, size_t *off, uint32_t *need_shard,
                                   uint32_t *need, uint32_t *need_gen, size_t need_cap,
                                   size_t *nneed);
/* Owner, finalise phase 1: rows of every window final at now_ms (and of the spill), computed
   on copies (scratch: at least the largest cell), one stream per (cell, aggregation) with its
   labels; slots from `first`; M3_ENOSPC: resume at *next (whole slots only). *spill_n: spill
   rows included. Cells are not changed; the drain's now is raised to now_ms. *next ==
   UINT32_MAX: no cell of the shard was due (the table was skipped), nothing to commit. */
int m3_aggst_prepare(uint8_t *seg, uint8_t *store, uint32_t shard, int64_t now_ms,
                     uint32_t first, uint32_t *next, uint32_t *spill_n, uint8_t *scratch,
                     size_t scratch_cap, uint8_t *labels, size_t labels_cap, uint64_t *loffs,
                     size_t streams_cap, size_t *nstreams, m3_aggst_row *rows, size_t rows_cap,
                     size_t *nrows);
/* Owner, phase 2 (the rows are durable): finalise slots [first, last) at the same now_ms for
   real and drop the first spill_n spill rows (if first == 0). */
int m3_aggst_commit(uint8_t *seg, uint8_t *store, uint32_t shard, int64_t now_ms,
                    uint32_t first, uint32_t last, uint32_t spill_n);
/* Any process: a shard's counters. */
void m3_aggst_stats_get(const uint8_t *store, uint32_t shard, m3_aggst_stats *out);

/* ---- plangroup.c: series grouped by the labels a rule set reads (docs/rules.md) ---------- */

/* What m3_series_group keeps of a label not in `names`. */
enum m3_proj_others {
    M3_PROJ_SKIP = 0,     /* nothing */
    M3_PROJ_NAMES = 1,    /* its name (the plan depends on which labels exist) */
    M3_PROJ_ALL = 2       /* name and value (the plan may depend on every label) */
};
/* Scratch bytes m3_series_group needs for n series whose labels total label_bytes. */
uint64_t m3_series_group_scratch(size_t n, uint64_t label_bytes);
/* Group series (shards[i], slots[i], gens[i]) by their projection: labels named in
   names[noffs[k], noffs[k+1]) (k < nnames) with their values, the others as `others` says.
   group[i] = group number (0 .. *ngroups - 1), UINT32_MAX for a series that is not live (or
   another generation); reps[g] = index of group g's first series. Equal projections, equal
   group; different, different (bytes compared, not only hashes). M3_ENOSPC: scratch too
   small (see m3_series_group_scratch); M3_ECORRUPT: a series' labels are malformed. */
int m3_series_group(const uint8_t *base, const uint32_t *shards, const uint32_t *slots,
                    const uint32_t *gens, size_t n, const uint8_t *names, const uint64_t *noffs,
                    uint32_t nnames, uint32_t others, uint32_t *group, uint32_t *reps,
                    size_t *ngroups, uint8_t *scratch, size_t scratch_cap);

/* ---- lttb.c: Largest-Triangle-Three-Buckets downsampling (query_range max_points) ----- */

/* Indices (strictly increasing, first 0, last n - 1) of at most `threshold` points of the
   series (ts, v)[0..n) that keep its shape; out must hold min(n, threshold) entries. */
size_t m3_lttb(const int64_t *ts, const double *v, size_t n, size_t threshold, uint32_t *out);

/* ---- remote_read.c: remote read response encoding (docs/formats/remote-read.md) ------ */

/* Encode n (<= 65535) samples as one Prometheus XOR chunk into out: returns the bytes
   written, M3_ENOSPC if cap is too small (m3_promxor_bound(n) always suffices). */
int64_t m3_promxor_encode(const int64_t *ts, const double *v, size_t n, uint8_t *out,
                          size_t cap);
size_t m3_promxor_bound(size_t n);
/* The `repeated Sample samples = 2` field of a prometheus.TimeSeries for n samples: returns
   bytes written (at most 22 * n), M3_ENOSPC if cap is too small. */
int64_t m3_pb_samples(const int64_t *ts, const double *v, size_t n, uint8_t *out, size_t cap);
/* CRC-32C (Castagnoli) of p[0..n), continuing from crc (0 to start). */
uint32_t m3_crc32c(uint32_t crc, const uint8_t *p, size_t n);

/* ---- flush.c: commit-log helpers for trimming after a flush ------------------------- */

/* Min and max sample timestamps of a batch of records (INT64_MAX, INT64_MIN when empty). */
int m3_batch_time_range(const uint8_t *batch, size_t len, int64_t *mint, int64_t *maxt);
/* A global sequence number taken between a release and an acquire fence: a caller that gets a
   greater number than another caller sees every lane publish that caller made before. */
uint64_t m3_seq_sync(uint8_t *base);

/* ---- flat_decode.c: a query's blocks -> its flat series (decode, range, last write wins) */

/* Blocks data[offs[i], offs[i+1]) (TSZ, data_len bytes in all) of series bser[i] (adjacent,
   never decreasing, < nseries, in write order) decoded into ts/v (cap samples): series s at
   [soffs[s], soffs[s+1]) (nseries + 1 entries), sorted, one sample per timestamp (the later
   block wins), only [mint, maxt]. Returns the samples written or an error; *bad names the
   block at fault (M3_ENOSPC: its count exceeds what is left of cap). */
int64_t m3_decode_flat(const uint8_t *data, size_t data_len, const uint64_t *offs,
                       const int64_t *bser, size_t nblocks, size_t nseries, int64_t mint,
                       int64_t maxt, int64_t *ts, double *v, size_t cap, int64_t *soffs,
                       size_t *bad);
/* m3_decode_flat with per-block bounds as well: block i's samples outside
   [bmin[i], bmax[i]] are dropped (either may be NULL: no bound on that side). */
int64_t m3_decode_flat_clip(const uint8_t *data, size_t data_len, const uint64_t *offs,
                            const int64_t *bser, const int64_t *bmin, const int64_t *bmax,
                            size_t nblocks, size_t nseries, int64_t mint, int64_t maxt,
                            int64_t *ts, double *v, size_t cap, int64_t *soffs, size_t *bad);

/* ---- gather.c: compressed blocks of several buffers copied into one, in a new order ----- */

/* Output block i = srcs[src_of[i]][starts[i], starts[i] + lens[i]), back to back from dst.
   Returns the bytes written, or M3_EINVAL (nothing copied) if a block lies outside its
   source or the total exceeds dst_cap. */
int64_t m3_gather_blocks(const uint8_t *const *srcs, const uint64_t *src_lens, uint32_t nsrcs,
                         const uint32_t *src_of, const uint64_t *starts, const uint64_t *lens,
                         size_t n, uint8_t *dst, size_t dst_cap);

/* ---- windows.c: window bounds of every (series, step) of a query ----------------------- */

/* Series i's samples are ts[offs[i], offs[i+1]) (sorted). lo/hi (nseries x nsteps, row-major)
   receive, per step s, the bounds of the samples with start[s] <= t <= end[s]. start and end
   must not decrease (M3_EINVAL otherwise). */
int m3_windows(const int64_t *ts, const int64_t *offs, size_t nseries, const int64_t *start,
               const int64_t *end, size_t nsteps, int64_t *lo, int64_t *hi);

/* ---- json_points.c: result points as Prometheus writes them in JSON ------------------- */

/* `[t,"v"],...` for n points (t: MarshalTimestamp; v: Go's FormatFloat(v, 'f', -1, 64)),
   given the values as CPython's repr of a list of floats (`[v, v, ...]`, reprs_len bytes).
   Returns the bytes written, M3_ENOSPC if cap is short of what the next point may need
   (m3_json_points_bound(n) always suffices), M3_ECORRUPT if reprs is not such a repr. */
int64_t m3_json_points(const int64_t *ts, const char *reprs, size_t reprs_len, size_t n,
                       char *out, size_t cap);
size_t m3_json_points_bound(size_t n);
/* The same from the doubles themselves (shortest round-trip digits computed in C); M3_ERANGE
   if a value is one only the repr path formats exactly (some powers of two: see the file). */
int64_t m3_json_points_f(const int64_t *ts, const double *v, size_t n, char *out, size_t cap);

/* ---- query_slots.c: daemon-wide query admission over per-worker counters -------------- */

/* counters: worker 0's counter; worker i's is counters[i * stride] (the stats file's
   W_QUERIES_RUNNING slot). enter: claim a slot for worker `self`; 1 if admitted (the sum of
   all counters, this claim included, is <= limit), 0 if not (the claim is taken back). */
int m3_qslot_enter(uint64_t *counters, uint32_t nworkers, uint32_t stride, uint32_t self,
                   uint64_t limit);
void m3_qslot_leave(uint64_t *counters, uint32_t stride, uint32_t self);
void m3_qslot_reset(uint64_t *counters, uint32_t stride, uint32_t self);

/* ---- fwdmark.c: rollup source watermarks in the stats file (docs/rules.md "The barrier") */

/* Worker `self`: raise its mark to t_ms (release; never lowers it). marks = the stats file's
   W_FWD_MARK_MS slot of worker 0, stride = slots per worker block. */
void m3_fwd_mark_raise(uint64_t *marks, uint32_t stride, uint32_t self, int64_t t_ms);
/* Any worker: the smallest mark of workers [0, nworkers) (acquire loads); 0 if none. */
int64_t m3_fwd_mark_min(const uint64_t *marks, uint32_t nworkers, uint32_t stride);

/* ---- group_sum.c: sum and count of a values matrix by group (sum/avg/count/group) ------ */

/* vals, present: nrows x nsteps row-major; gid[r] in [0, ngroups). sum, cnt: ngroups x nsteps;
   seen: ngroups bytes of scratch. Additions within a group in row order, starting from the
   first row (absent values add 0.0). M3_EINVAL for a gid out of range. */
int m3_group_sum(const double *vals, const uint8_t *present, const int64_t *gid, size_t nrows,
                 size_t nsteps, size_t ngroups, double *sum, int64_t *cnt, uint8_t *seen);

/* ---- rec_build.c: lane records from rows (aggregated points, rollup forwarding) -------- */

/* Records (docs/formats/shm.md "Record") of type `type` for rows (series[i], ts[i], v[i]),
   i < nrows: series[i] indexes a label-blob table (canonical label set s at
   labels[offs[s], offs[s+1]), offs has nseries + 1 entries); hash and shard as the
   remote-write decoders compute them. Consecutive rows of one series make one record (split
   every M3_REC_MAX_SAMPLES). *used = bytes (written, or needed: M3_ENOSPC if cap is short,
   nothing written), *nrecords = records written. M3_EINVAL: bad index, label set not
   canonical, type PAD/0, num_shards 0. */
int m3_rec_build(uint16_t type, uint32_t num_shards, const uint8_t *labels, uint64_t labels_len,
                 const uint64_t *offs, uint32_t nseries, const uint32_t *series,
                 const int64_t *ts, const double *v, size_t nrows, uint8_t *out, size_t cap,
                 size_t *used, uint32_t *nrecords);

/* ---- rollup.c: rollup forwarding records and group cells (docs/formats/shm.md) --------- */

#define M3_ROLLUP_TAIL_BYTES 32
#define M3_FWD_VERSION 1

/* Last 32 bytes of an M3_REC_ROLLUP_IN record (after its values). */
typedef struct m3_rollup_tail {
    uint64_t fwd;          /* forward id: one finalise pass of `source` (increasing per source) */
    uint32_t ordinal;      /* record number within the forward, from 0 */
    uint32_t rule;         /* rollup rule id (m3shm.rules.rollup_plan.rule_id), never 0 */
    uint32_t source;       /* forwarding worker (producer index) */
    uint32_t pad;          /* 0 */
    int64_t res_ms;        /* the storage policy's resolution; every ts is a multiple */
} m3_rollup_tail;

/* Per shard of an aggregated segment: the last forward applied from each source, and a
   scratch cell through which a record reaches its group cell all or nothing (rollup.c). */
typedef struct m3_fwd_table {
    uint32_t magic;        /* "FWDT" */
    uint16_t version;      /* M3_FWD_VERSION */
    uint16_t pad0;
    uint32_t num_sources;
    uint32_t state;        /* 0 idle, 1 scratch being filled, 2 scratch complete */
    uint64_t scratch_cap;  /* bytes of the scratch cell after the entries */
    uint64_t applied_records;
    uint64_t dup_records;  /* records skipped as already applied */
    uint64_t scratch_fwd;  /* the record the scratch holds: (source, fwd, ordinal, cell) */
    uint32_t scratch_ordinal;
    uint32_t scratch_source;
    uint32_t scratch_cell;
    uint32_t pad1;
} m3_fwd_table;
typedef struct m3_fwd_entry {
    uint64_t fwd;          /* last (fwd, ordinal) applied from this source; fwd 0 = none */
    uint32_t ordinal;
    uint32_t pad;
} m3_fwd_entry;

/* Bytes of a ROLLUP_IN record with these counts. */
uint64_t m3_rollup_rec_bytes(uint32_t labels_len, uint32_t nsamples);
const m3_rollup_tail *m3_rollup_tail_of(const m3_rec *r);
/* m3_rec_check plus the ROLLUP_IN rules: type 3, tenant 0, tail pad 0, fwd != 0, rule != 0,
   source < num_sources, 0 < res_ms <= 2^40, every ts a multiple of res_ms within +-2^62. */
int m3_rollup_check(const m3_rec *r, size_t avail, uint32_t num_shards, uint32_t num_sources);
/* Build ROLLUP_IN records: rows (row_group[i], ts[i], v[i]) grouped by group (consecutive rows
   of one group become records of <= M3_REC_MAX_SAMPLES, numbered from 0 in order); group g's
   canonical labels are labels[labels_off[g] .. labels_off[g+1]), its rule group_rule[g].
   *len = bytes needed; M3_ENOSPC if cap is smaller (nothing written), M3_EINVAL for a bad
   group index, empty labels, rule 0, fwd 0 or a ts that is not a multiple of res_ms. */
int m3_rollup_build(const uint8_t *labels, const uint64_t *labels_off, uint32_t ngroups,
                    const uint32_t *group_rule, const uint32_t *row_group, const int64_t *ts,
                    const double *v, size_t nrows, uint32_t num_shards, uint64_t fwd,
                    uint32_t source, int64_t res_ms, uint8_t *out, size_t cap, size_t *len,
                    uint32_t *nrecords);
uint64_t m3_fwd_table_bytes(uint32_t num_sources, uint64_t scratch_cap);
int m3_fwd_table_init(uint8_t *mem, uint64_t cap, uint32_t num_sources, uint64_t scratch_cap);
int m3_fwd_table_check(const uint8_t *mem, uint64_t cap);
/* Apply one checked ROLLUP_IN record to group cell `cell` exactly once (owner only): 1 =
   applied, 0 = a duplicate (skipped), M3_EINVAL if the cell's resolution differs from the
   record's, stride exceeds the table's scratch_cap, or out holds fewer than
   (M3_AGG_MAX_WINDOWS + nsamples) x aggregations rows (rows of windows the apply finalised
   early go there, *nout of them, `cell` set to the group cell's index). */
int m3_rollup_apply(uint8_t *table, const m3_rec *r, uint8_t *cells, uint64_t stride,
                    uint32_t ncells, uint32_t cell, int64_t now_ms, m3_agg_out *out,
                    size_t cap, size_t *nout);

/* ---- snapshot.c: copies of a shard's open blocks (docs/formats/snapshot.md) ------------ */

/* 1 if no producer holds a batch with a sequence number below seq reserved and unpublished
   (lane tails loaded afterwards include every such batch), else 0. */
int m3_seq_settled(const uint8_t *base, uint64_t seq);
/* Owner: copy live series of a shard from slot *cursor on (chunks byte for byte, under the
   shard lock, one whole series at a time) into out (cap bytes); *used = bytes written,
   *nseries / *nchunks are incremented. Returns 1 if out is full (call again from the updated
   *cursor), 0 when every slot was visited, M3_ENOSPC if the next series alone needs more
   than cap bytes (*used = what it needs). */
int m3_shard_snapshot(uint8_t *base, uint32_t shard, uint32_t *cursor, uint8_t *out,
                      size_t cap, size_t *used, uint64_t *nseries, uint64_t *nchunks);
/* Owner, at start-up: load a snapshot body (the concatenated output of m3_shard_snapshot)
   into the shard; chunks of the block starts in skip[0..nskip) are left out. Loaded streams
   rank below anything applied later. M3_ECORRUPT / M3_ETRUNC with *bad_off = the offset of
   the bad series or chunk (series before it are loaded), M3_ENOSPC if the shard is full. */
int m3_shard_load_snapshot(uint8_t *base, uint32_t shard, const uint8_t *body, size_t len,
                           const int64_t *skip, size_t nskip, uint64_t *nseries,
                           uint64_t *nchunks, uint64_t *samples, size_t *bad_off);

/* ---- volptr.c: newest fileset volume per block in shared memory (docs/formats/volptr.md) */

/* Bytes of a table for num_shards shards of cap slots (a power of two); 0 if invalid. */
uint64_t m3_volptr_size(uint32_t num_shards, uint32_t cap);
int m3_volptr_init(uint8_t *base, uint64_t size, uint32_t num_shards, uint32_t cap,
                   int64_t block_ms);
/* M3_OK if base holds a table of this version that fits in size. */
int m3_volptr_check(const uint8_t *base, uint64_t size);
/* Owner: forget the shard's slots and mark it not built (readers list the directory). */
void m3_volptr_reset(uint8_t *base, uint32_t shard);
/* Owner: the shard's slots are complete; readers may use them. */
void m3_volptr_set_ready(uint8_t *base, uint32_t shard);
/* Owner: point block_start at volume (-1: the block has no fileset any more). M3_ERANGE if
   its slot holds another block: the shard is marked overflowed (readers list). */
int m3_volptr_set(uint8_t *base, uint32_t shard, int64_t block_start, int64_t volume);
/* Any process: (block start, newest volume) of every block of the shard, in slot order;
   *n = how many. M3_ENOENT if the shard is not ready (or overflowed): list the directory;
   M3_ENOSPC if more than cap. */
int m3_volptr_list(const uint8_t *base, uint32_t shard, int64_t *starts, int64_t *volumes,
                   size_t cap, size_t *n);
