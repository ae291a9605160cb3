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
    M3_ERANGE = -7       /* a value outside what the format can hold */
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
/* Decode up to cap samples. *n receives the samples decoded (also on error) and *err_bit the
   bit offset of the stream where decoding stopped on error. */
int tsz_decode(const uint8_t *buf, size_t len, int64_t *ts, double *v, size_t cap,
               size_t *n, uint64_t *err_bit);
