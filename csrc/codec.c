/*
 * codec.c -- M3TSZ-style streaming codec for (int64 ms timestamp, float64 value) samples.
 *
 * Format (docs/formats/tsz.md is the reference; this is a summary):
 *   header  8 bytes: 'T' 'Z' version(1) flags(0) count(u32 little-endian, published last)
 *   stream  bits, most significant bit first, one sample after another:
 *     timestamp  sample 0: 64 raw bits.  Later: dod = (delta - previous delta) mod 2^64,
 *                delta = ts - previous ts, previous delta of sample 1 = 0.
 *                '0' dod=0 | '10'+4 [-8,-1]u[1,8] | '110'+12 | '1110'+24 | '1111'+64
 *     value      two modes; the stream starts in XOR mode with previous bits 0.
 *       XOR:  '0' same bits | '10' + mlen bits in the current window
 *             | '110' + lead(6) + (mlen-1)(6) + mlen bits: new window
 *             | '111' + k(3) + len(6) + [sign + len bits]: enter integer mode, n = +-magnitude
 *       INT:  value = n / 10^k exactly (n an integer, |n| < 2^53); d = n - previous n
 *             '0' d=0 | '10' + sign + sig bits of |d|
 *             | '110' + len(6) + sign + len bits: d, and sig := len
 *             | '1110' + k(3) + len(6) + [sign + len bits]: new k; d from rescaled previous n
 *             | '1111' + an XOR-mode value op other than '111': leave integer mode
 *       "[sign + len bits]" is absent when len = 0 (d = 0).
 *
 * Losslessness: integer mode is used only after checking that (double)n / 10^k reproduces the
 * value's exact bit pattern (so -0.0, NaN payloads, +-Inf, subnormals and anything that does
 * not round-trip go through XOR, which is bit-exact by construction). IEEE division is
 * correctly rounded, so the decoder's n / 10^k is the same double on every conforming machine.
 *
 * Streaming and sharing: bits are only ever added after the published ones. When an append
 * continues a partly used byte it rewrites that byte with identical published bits, so a
 * reader of the published prefix never sees a published bit change. The sample count in the
 * header is stored last with release ordering; a reader loads it with acquire ordering and
 * decodes exactly that many samples. The encoder state (tsz_enc) has no pointers and may live
 * in shared memory; `seq` is odd while it is being rewritten, and tsz_enc_resume() rebuilds a
 * torn or disagreeing state from the published samples, which are the truth.
 *
 * Invariants: e->count samples are encoded in e->nbits bits; bits past e->nbits in the last
 * used byte are zero; every read in the decoder is bounds-checked against the caller's length.
 * Changing any bit layout above is a format change: bump TSZ_VERSION and keep version 1
 * decodable (tests/fixtures/tsz_v1.bin).
 */
#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include <math.h>

#include "m3shm.h"
#include "m3_int.h"

_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the header count is little-endian");

#define MODE_XOR 0
#define MODE_INT 1
#define MAX_MULT 7
#define INT_LIMIT 9007199254740992.0 /* 2^53: integers below it are exact doubles */
#define LOW_RUN_LIMIT 8              /* deltas narrower than sig before sig shrinks */

static const double POW10[MAX_MULT + 1] = {1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7};
static const int64_t IPOW10[MAX_MULT + 1] = {1, 10, 100, 1000, 10000, 100000, 1000000,
                                             10000000};

static inline uint64_t f2u(double v) { uint64_t u; memcpy(&u, &v, 8); return u; }
static inline double u2f(uint64_t u) { double v; memcpy(&v, &u, 8); return v; }
static inline unsigned bitlen(uint64_t x) { return x ? 64u - (unsigned)__builtin_clzll(x) : 0u; }

/* value == n / 10^k bit for bit, with |n| < 2^53 */
static inline int as_int(double v, unsigned k, int64_t *out)
{
    double x = v * POW10[k];
    if (!(fabs(x) < INT_LIMIT))
        return 0; /* also rejects NaN and Inf */
    int64_t n = (int64_t)(x >= 0 ? x + 0.5 : x - 0.5);
    double dn = (double)n;
    if (k == 0)
        return f2u(dn) == f2u(v) ? (*out = n, 1) : 0;
    if (fabs(x - dn) > fabs(x) * 0x1p-50) /* cheap reject before the division */
        return 0;
    if (f2u(dn / POW10[k]) != f2u(v))
        return 0;
    *out = n;
    return 1;
}

static inline int find_mult(double v, int64_t *n)
{
    for (unsigned k = 0; k <= MAX_MULT; k++)
        if (as_int(v, k, n))
            return (int)k;
    return -1;
}

/* The predictor for the first delta after a change of k: the previous integer rescaled,
   or 0 where that could overflow. Encoder and decoder must compute it identically. */
static inline int64_t rescale(int64_t n, unsigned from, unsigned to)
{
    if (to == from)
        return n;
    if (to < from)
        return n / IPOW10[from - to];
    int64_t f = IPOW10[to - from];
    if (n > INT64_MAX / f || n < -(INT64_MAX / f))
        return 0; /* only a corrupt stream gets here: an encoder's |n| is below 2^53 */
    return n * f;
}

/* The bit pattern of integer-mode value n / 10^k (as_int checked the encoder's side). */
static inline uint64_t int_value_bits(int64_t n, unsigned k)
{
    double dn = (double)n;
    return f2u(k ? dn / POW10[k] : dn);
}

/* ---- bit writer: pending bits in acc, flushed MSB-first to buf[byte...] ----------------- */

typedef struct {
    uint8_t *buf;  /* start of the stream (after the header) */
    size_t byte;   /* next byte to write */
    uint64_t acc;  /* low n bits are pending */
    unsigned n;    /* pending bit count, < 8 after bw_drain */
} bw;

static inline void bw_open(bw *b, uint8_t *stream, uint64_t nbits)
{
    b->buf = stream;
    b->byte = (size_t)(nbits >> 3);
    b->n = (unsigned)(nbits & 7);
    b->acc = b->n ? (uint64_t)(stream[b->byte] >> (8 - b->n)) : 0;
}

static inline void bw_drain(bw *b)
{
    while (b->n >= 8) {
        b->n -= 8;
        b->buf[b->byte++] = (uint8_t)(b->acc >> b->n);
    }
    b->acc &= (UINT64_C(1) << b->n) - 1;
}

/* w <= 56 bits, v < 2^w */
static inline void bw_put(bw *b, uint64_t v, unsigned w)
{
    if (b->n + w > 64)
        bw_drain(b);
    b->acc = (b->acc << w) | v;
    b->n += w;
}

static inline void bw_putn(bw *b, uint64_t v, unsigned w) /* any w in 0..64 */
{
    if (w > 32) {
        bw_put(b, v >> 32, w - 32);
        bw_put(b, v & 0xffffffffu, 32);
    } else if (w) {
        bw_put(b, v, w);
    }
}

/* Write out every pending bit; the last partial byte is padded with zeros. */
static inline void bw_flush(bw *b)
{
    bw_drain(b);
    if (b->n)
        b->buf[b->byte] = (uint8_t)(b->acc << (8 - b->n));
}

static inline uint64_t bw_pos(const bw *b) { return (uint64_t)b->byte * 8 + b->n; }

/* ---- encoder ------------------------------------------------------------------------------ */

static inline void put_signed(bw *b, int64_t d, unsigned len)
{
    if (len == 0)
        return;
    uint64_t mag = d < 0 ? (uint64_t)0 - (uint64_t)d : (uint64_t)d;
    bw_put(b, d < 0, 1);
    bw_putn(b, mag, len);
}

static inline void enc_ts(tsz_enc *s, bw *b, uint64_t uts)
{
    if (s->count == 0) {
        bw_putn(b, uts, 64);
    } else {
        uint64_t delta = uts - s->prev_ts;
        uint64_t dod = delta - s->prev_delta;
        int64_t sd = (int64_t)dod;
        if (sd == 0)
            bw_put(b, 0, 1);
        else if (sd >= -8 && sd <= 8)
            bw_put(b, (UINT64_C(2) << 4) | (uint64_t)(sd < 0 ? sd + 8 : sd + 7), 6);
        else if (sd >= -2048 && sd <= 2047)
            bw_put(b, (UINT64_C(6) << 12) | (dod & 0xfff), 15);
        else if (sd >= -(INT64_C(1) << 23) && sd < (INT64_C(1) << 23))
            bw_put(b, (UINT64_C(14) << 24) | (dod & 0xffffff), 28);
        else {
            bw_put(b, 15, 4);
            bw_putn(b, dod, 64);
        }
        s->prev_delta = delta;
    }
    s->prev_ts = uts;
}

/* XOR-mode value op for bits != prev_bits (the '0' op is the caller's). */
static inline void enc_xor(tsz_enc *s, bw *b, uint64_t bits)
{
    uint64_t x = bits ^ s->prev_bits;
    unsigned lead = (unsigned)__builtin_clzll(x);
    unsigned trail = (unsigned)__builtin_ctzll(x);
    unsigned mlen = 64 - lead - trail;
    if (s->mlen && lead >= s->lead && lead + mlen <= (unsigned)s->lead + s->mlen &&
        (unsigned)s->mlen + 2 <= mlen + 15) {
        /* the current window holds it and reusing it is no dearer than a new one */
        bw_put(b, 2, 2);
        bw_putn(b, x >> (64 - s->lead - s->mlen), s->mlen);
        return;
    }
    bw_put(b, (UINT64_C(6) << 12) | ((uint64_t)lead << 6) | (mlen - 1), 15);
    bw_putn(b, x >> trail, mlen);
    s->lead = (uint8_t)lead;
    s->mlen = (uint8_t)mlen;
}

static inline void enc_value(tsz_enc *s, bw *b, double v)
{
    uint64_t bits = f2u(v);
    int64_t n;
    if (s->mode == MODE_INT) {
        if (as_int(v, s->mult, &n)) {
            int64_t d = n - s->prev_int; /* |n|, |prev| < 2^53: no overflow */
            if (d == 0) {
                bw_put(b, 0, 1);
            } else {
                unsigned len = bitlen(d < 0 ? (uint64_t)-d : (uint64_t)d);
                if (len < s->sig) {
                    s->low_run++;
                    if (len > s->low_max)
                        s->low_max = (uint8_t)len;
                }
                if (len > s->sig || (s->low_run >= LOW_RUN_LIMIT && s->low_max + 1 < s->sig)) {
                    unsigned nsig = len > s->sig ? len : s->low_max;
                    bw_put(b, (UINT64_C(6) << 6) | nsig, 9);
                    put_signed(b, d, nsig);
                    s->sig = (uint8_t)nsig;
                    s->low_run = 0;
                    s->low_max = 0;
                } else {
                    if (len == s->sig) {
                        s->low_run = 0;
                        s->low_max = 0;
                    }
                    bw_put(b, 2, 2);
                    put_signed(b, d, s->sig);
                }
            }
            s->prev_int = n;
        } else {
            int k = find_mult(v, &n);
            if (k >= 0) {
                int64_t d = n - rescale(s->prev_int, s->mult, (unsigned)k);
                unsigned len = bitlen(d < 0 ? (uint64_t)-d : (uint64_t)d);
                bw_put(b, (UINT64_C(14) << 9) | ((uint64_t)k << 6) | len, 13);
                put_signed(b, d, len);
                s->mult = (uint8_t)k;
                s->sig = (uint8_t)len;
                s->prev_int = n;
            } else {
                bw_put(b, 15, 4);
                s->mode = MODE_XOR;
                enc_xor(s, b, bits); /* bits != prev_bits: the previous value was an integer */
            }
            s->low_run = 0;
            s->low_max = 0;
        }
    } else if (bits == s->prev_bits) {
        bw_put(b, 0, 1);
    } else {
        int k = find_mult(v, &n);
        if (k >= 0) {
            unsigned len = bitlen(n < 0 ? (uint64_t)-n : (uint64_t)n);
            bw_put(b, (UINT64_C(7) << 9) | ((uint64_t)k << 6) | len, 12);
            put_signed(b, n, len);
            s->mode = MODE_INT;
            s->mult = (uint8_t)k;
            s->sig = (uint8_t)len;
            s->prev_int = n;
            s->low_run = 0;
            s->low_max = 0;
        } else {
            enc_xor(s, b, bits);
        }
    }
    s->prev_bits = bits;
}

/* Store the working state s into e so that a crash at any point is detectable. */
static void commit_state(tsz_enc *e, const tsz_enc *s, uint8_t *buf)
{
    uint32_t seq = e->seq | 1u;
    __atomic_store_n(&e->seq, seq, __ATOMIC_RELAXED);
    /* Fence: the odd seq is visible before any field below changes (a resumer that sees a
       half-copied state also sees an odd seq). */
    __atomic_thread_fence(__ATOMIC_RELEASE);
    tsz_enc t = *s;
    t.seq = seq;
    memcpy(e, &t, sizeof t);
    /* Release: the fields and the stream bits are visible before seq turns even. */
    __atomic_store_n(&e->seq, seq + 1, __ATOMIC_RELEASE);
    /* Release: the stream bits are visible before the count that makes them readable. */
    __atomic_store_n((uint32_t *)(buf + 4), s->count, __ATOMIC_RELEASE);
}

static inline int aligned4(const void *p) { return ((uintptr_t)p & 3u) == 0; }

int tsz_enc_init(tsz_enc *e, uint8_t *buf, size_t cap)
{
    if (!e || !buf || cap < TSZ_HEADER_BYTES || !aligned4(buf))
        return M3_EINVAL;
    memset(e, 0, sizeof *e);
    buf[0] = 'T';
    buf[1] = 'Z';
    buf[2] = TSZ_VERSION;
    buf[3] = 0;
    __atomic_store_n((uint32_t *)(buf + 4), 0u, __ATOMIC_RELEASE);
    return M3_OK;
}

int tsz_enc_append_many(tsz_enc *e, uint8_t *buf, size_t cap, const int64_t *ts,
                        const double *v, size_t n, size_t *done)
{
    size_t i = 0;
    int rc = M3_OK;
    if (done)
        *done = 0;
    if (!e || !buf || !aligned4(buf) || (n && (!ts || !v)) || (e->seq & 1u))
        return M3_EINVAL;
    if (cap < TSZ_HEADER_BYTES)
        return M3_EINVAL;
    tsz_enc s = *e;
    bw b;
    bw_open(&b, buf + TSZ_HEADER_BYTES, s.nbits);
    size_t room = cap - TSZ_HEADER_BYTES;
    for (; i < n; i++) {
        if (room - b.byte < TSZ_MAX_SAMPLE_BYTES) {
            rc = M3_ENOSPC;
            break;
        }
        if (s.count == UINT32_MAX) {
            rc = M3_ERANGE;
            break;
        }
        if (s.count && ts[i] <= (int64_t)s.prev_ts) {
            rc = M3_EORDER;
            break;
        }
        enc_ts(&s, &b, (uint64_t)ts[i]);
        enc_value(&s, &b, v[i]);
        s.count++;
        if (b.n >= 32) /* keep the pending bits few so the next sample fits in acc */
            bw_drain(&b);
    }
    if (i) {
        bw_flush(&b);
        s.nbits = bw_pos(&b);
        M3_ASSERT(TSZ_HEADER_BYTES + ((s.nbits + 7) >> 3) <= cap);
        commit_state(e, &s, buf);
    }
    if (done)
        *done = i;
    return rc;
}

int tsz_enc_append(tsz_enc *e, uint8_t *buf, size_t cap, int64_t ts, double v)
{
    return tsz_enc_append_many(e, buf, cap, &ts, &v, 1, NULL);
}

size_t tsz_enc_size(const tsz_enc *e) { return TSZ_HEADER_BYTES + (size_t)((e->nbits + 7) >> 3); }

size_t tsz_bound(size_t n) { return TSZ_HEADER_BYTES + n * TSZ_MAX_SAMPLE_BYTES; }

int tsz_encode(const int64_t *ts, const double *v, size_t n, uint8_t *buf, size_t cap,
               size_t *size)
{
    tsz_enc e;
    size_t done;
    int rc = tsz_enc_init(&e, buf, cap);
    if (rc)
        return rc;
    rc = tsz_enc_append_many(&e, buf, cap, ts, v, n, &done);
    if (size)
        *size = tsz_enc_size(&e);
    return rc;
}

/* ---- decoder ------------------------------------------------------------------------------ */

/* Bit reader: the top `avail` bits of w are the next stream bits; bits below them are either
   zero or the correct following bits (the 8-byte refill loads ahead), so OR-ing is safe. */
typedef struct {
    const uint8_t *p, *end, *start;
    uint64_t w;
    unsigned avail;
} br;

static inline void br_refill(br *r)
{
    if (r->end - r->p >= 8) {
        uint64_t x;
        memcpy(&x, r->p, 8);
        x = __builtin_bswap64(x);
        r->w |= x >> r->avail;
        r->p += (63 - r->avail) >> 3;
        r->avail |= 56;
    } else {
        while (r->avail <= 56 && r->p < r->end) {
            r->w |= (uint64_t)*r->p++ << (56 - r->avail);
            r->avail += 8;
        }
    }
}

static inline uint64_t br_take(br *r, unsigned k) /* 1 <= k <= avail, k <= 63 */
{
    uint64_t v = r->w >> (64 - k);
    r->w <<= k;
    r->avail -= k;
    return v;
}

static inline uint64_t br_pos(const br *r) { return (uint64_t)(r->p - r->start) * 8 - r->avail; }

/* Refill when fewer than 56 bits are buffered; opcodes are then peeked from w directly (past
   the end of the input w holds zeros, and every bit actually consumed is checked by TAKE). */
#define REFILL()                                                                            \
    do {                                                                                    \
        if (r.avail < 56)                                                                   \
            br_refill(&r);                                                                  \
    } while (0)

/* dst = the next k bits, 1 <= k <= 56; truncation is an error */
#define TAKE(dst, k)                                                                        \
    do {                                                                                    \
        unsigned kk_ = (k);                                                                 \
        if (r.avail < kk_) {                                                                \
            br_refill(&r);                                                                  \
            if (r.avail < kk_) {                                                            \
                rc = M3_ETRUNC;                                                             \
                goto out;                                                                   \
            }                                                                               \
        }                                                                                   \
        dst = br_take(&r, kk_);                                                             \
    } while (0)

/* dst = the next k bits, 0 <= k <= 64 */
#define TAKE_WIDE(dst, k)                                                                   \
    do {                                                                                    \
        unsigned k_ = (k);                                                                  \
        uint64_t hi_ = 0, lo_ = 0;                                                          \
        if (k_ > 32) {                                                                      \
            TAKE(hi_, k_ - 32);                                                             \
            TAKE(lo_, 32);                                                                  \
            dst = hi_ << 32 | lo_;                                                          \
        } else if (k_) {                                                                    \
            TAKE(lo_, k_);                                                                  \
            dst = lo_;                                                                      \
        } else {                                                                            \
            dst = 0;                                                                        \
        }                                                                                   \
    } while (0)

/* dst = sign bit + len bits of magnitude, as two's complement; nothing when len = 0 */
#define TAKE_SIGNED(dst, len)                                                               \
    do {                                                                                    \
        unsigned l_ = (len);                                                                \
        uint64_t m_ = 0, neg_ = 0;                                                          \
        if (l_) {                                                                           \
            TAKE(neg_, 1);                                                                  \
            TAKE_WIDE(m_, l_);                                                              \
        }                                                                                   \
        dst = neg_ ? (uint64_t)0 - m_ : m_;                                                 \
    } while (0)

#define INT_OK(n) ((int64_t)(n) < (INT64_C(1) << 53) && (int64_t)(n) > -(INT64_C(1) << 53))

#define FAIL(code)                                                                          \
    do {                                                                                    \
        rc = (code);                                                                        \
        goto out;                                                                           \
    } while (0)

/* Decode `want` samples into ts/v (either may be NULL to only track state). On return *s
   (if not NULL) holds the state after the last decoded sample, as the encoder had it. */
static inline int decode_core(const uint8_t *buf, size_t len, uint32_t want, int64_t *ts,
                              double *v, tsz_enc *s, size_t *ndone, uint64_t *err_bit)
{
    int rc = M3_OK;
    br r = {buf + TSZ_HEADER_BYTES, buf + len, buf + TSZ_HEADER_BYTES, 0, 0};
    uint64_t prev_ts = 0, prev_delta = 0, prev_bits = 0;
    uint64_t n_int = 0; /* integer-mode n, two's complement */
    unsigned mode = MODE_XOR, mult = 0, sig = 0, lead = 0, mlen = 0;
    uint32_t i = 0;
    uint64_t c, d, x;

    for (; i < want; i++) {
        if (r.avail < 32) /* the common timestamp fields take at most 28 bits */
            br_refill(&r);
        /* ---- timestamp */
        if (i == 0) {
            TAKE_WIDE(prev_ts, 64);
        } else {
            uint64_t dod;
            unsigned top = (unsigned)(r.w >> 60);
            if (top < 8) {
                TAKE(c, 1);
                dod = 0;
            } else if (top < 12) { /* '10' + 4 */
                TAKE(c, 6);
                c &= 15;
                dod = c < 8 ? c - 8 : c - 7;
            } else if (top < 14) { /* '110' + 12 */
                TAKE(c, 15);
                c &= 0xfff;
                dod = c & 0x800 ? c | ~UINT64_C(0xfff) : c;
            } else if (top == 14) { /* '1110' + 24 */
                TAKE(c, 28);
                c &= 0xffffff;
                dod = c & 0x800000 ? c | ~UINT64_C(0xffffff) : c;
            } else { /* '1111' + 64 */
                TAKE(c, 4);
                TAKE_WIDE(dod, 64);
            }
            uint64_t t = prev_ts + prev_delta + dod;
            if ((int64_t)t <= (int64_t)prev_ts) /* the encoder writes increasing times only */
                FAIL(M3_ECORRUPT);
            prev_delta += dod;
            prev_ts = t;
        }
        if (r.avail < 16) /* the value's opcode is peeked from the top 4 bits */
            br_refill(&r);
        /* ---- value */
        unsigned top = (unsigned)(r.w >> 60);
        if (mode == MODE_INT) {
            if (top < 8) { /* '0': same integer */
                TAKE(c, 1);
                goto store;
            }
            if (top < 12) { /* '10' + sign + sig bits */
                TAKE(c, 2);
                if (sig == 0)
                    FAIL(M3_ECORRUPT);
                TAKE_SIGNED(d, sig);
                n_int += d;
            } else if (top < 14) { /* '110' + len(6) + d */
                TAKE(c, 9);
                sig = (unsigned)(c & 63);
                TAKE_SIGNED(d, sig);
                n_int += d;
            } else if (top == 14) { /* '1110' + k(3) + len(6) + d from the rescaled n */
                TAKE(c, 13);
                unsigned k = (unsigned)(c >> 6) & 7;
                sig = (unsigned)(c & 63);
                TAKE_SIGNED(d, sig);
                n_int = (uint64_t)rescale((int64_t)n_int, mult, k) + d;
                mult = k;
            } else { /* '1111': leave integer mode; an XOR window op follows */
                TAKE(c, 4);
                mode = MODE_XOR;
                REFILL();
                top = (unsigned)(r.w >> 60);
                if (top < 8 || top >= 14)
                    FAIL(M3_ECORRUPT);
                goto xor_window;
            }
            if (!INT_OK(n_int))
                FAIL(M3_ECORRUPT);
            prev_bits = int_value_bits((int64_t)n_int, mult);
            goto store;
        }
        if (top < 8) { /* '0': same bits */
            TAKE(c, 1);
            goto store;
        }
        if (top >= 14) { /* '111' + k(3) + len(6) + n: enter integer mode */
            TAKE(c, 12);
            mult = (unsigned)(c >> 6) & 7;
            sig = (unsigned)(c & 63);
            TAKE_SIGNED(n_int, sig);
            if (!INT_OK(n_int))
                FAIL(M3_ECORRUPT);
            mode = MODE_INT;
            prev_bits = int_value_bits((int64_t)n_int, mult);
            goto store;
        }
    xor_window:
        if (top < 12) { /* '10' + mlen bits in the current window */
            TAKE(c, 2);
            if (mlen == 0)
                FAIL(M3_ECORRUPT);
        } else { /* '110' + lead(6) + (mlen-1)(6) */
            TAKE(c, 15);
            lead = (unsigned)(c >> 6) & 63;
            mlen = (unsigned)(c & 63) + 1;
            if (lead + mlen > 64)
                FAIL(M3_ECORRUPT);
        }
        TAKE_WIDE(x, mlen);
        prev_bits ^= x << (64 - lead - mlen);
    store:
        if (ts)
            ts[i] = (int64_t)prev_ts;
        if (v)
            v[i] = u2f(prev_bits);
    }
out:
    *ndone = i;
    if (err_bit)
        *err_bit = rc ? br_pos(&r) : 0;
    if (s) {
        memset(s, 0, sizeof *s);
        s->nbits = br_pos(&r);
        s->prev_ts = prev_ts;
        s->prev_delta = prev_delta;
        s->prev_bits = prev_bits;
        s->prev_int = (int64_t)n_int;
        s->count = i;
        s->mode = (uint8_t)mode;
        s->mult = (uint8_t)mult;
        s->sig = (uint8_t)sig;
        s->lead = (uint8_t)lead;
        s->mlen = (uint8_t)mlen;
    }
    return rc;
}

int tsz_count(const uint8_t *buf, size_t len, uint32_t *count)
{
    if (!buf || !count)
        return M3_EINVAL;
    *count = 0;
    if (len < TSZ_HEADER_BYTES)
        return M3_ETRUNC;
    if (buf[0] != 'T' || buf[1] != 'Z')
        return M3_ECORRUPT;
    if (buf[2] != TSZ_VERSION)
        return M3_EVERSION;
    if (buf[3] != 0)
        return M3_ECORRUPT;
    uint32_t c;
    if (aligned4(buf)) {
        /* Acquire: pairs with the encoder's release store of the count; the stream bits of
           every counted sample are visible after this load. */
        c = __atomic_load_n((const uint32_t *)(buf + 4), __ATOMIC_ACQUIRE);
    } else {
        memcpy(&c, buf + 4, 4); /* an unaligned copy is never shared with a live encoder */
    }
    /* the first sample takes at least 66 bits, every later one at least 2 */
    uint64_t bits = (uint64_t)(len - TSZ_HEADER_BYTES) * 8;
    uint64_t most = bits < 66 ? 0 : 1 + (bits - 66) / 2;
    if (c > most)
        return M3_ECORRUPT;
    *count = c;
    return M3_OK;
}

int64_t tsz_samples(const uint8_t *buf, size_t len)
{
    uint32_t count;
    int rc = tsz_count(buf, len, &count);
    return rc ? rc : (int64_t)count;
}

int64_t tsz_decode(const uint8_t *buf, size_t len, int64_t *ts, double *v, size_t cap)
{
    uint32_t count;
    size_t n;
    if (cap && (!ts || !v))
        return M3_EINVAL;
    int rc = tsz_count(buf, len, &count);
    if (rc)
        return rc;
    uint32_t want = count < cap ? count : (uint32_t)cap;
    rc = decode_core(buf, len, want, ts, v, NULL, &n, NULL);
    return rc ? rc : (int64_t)n;
}

int tsz_decode_diag(const uint8_t *buf, size_t len, size_t *n, uint64_t *err_bit)
{
    uint32_t count;
    if (!n || !err_bit)
        return M3_EINVAL;
    *n = 0;
    *err_bit = 0;
    int rc = tsz_count(buf, len, &count);
    if (rc)
        return rc;
    return decode_core(buf, len, count, NULL, NULL, NULL, n, err_bit);
}

int tsz_count_many(const uint8_t *buf, const uint64_t *offs, size_t nblocks, uint64_t *out,
                   size_t *bad)
{
    if (!offs || !out || !bad || (nblocks && !buf))
        return M3_EINVAL;
    out[0] = 0;
    for (size_t i = 0; i < nblocks; i++) {
        uint32_t count;
        *bad = i;
        if (offs[i + 1] < offs[i])
            return M3_EINVAL;
        int rc = tsz_count(buf + offs[i], (size_t)(offs[i + 1] - offs[i]), &count);
        if (rc)
            return rc;
        out[i + 1] = out[i] + count;
    }
    return M3_OK;
}

int tsz_decode_many(const uint8_t *buf, const uint64_t *offs, size_t nblocks,
                    const uint64_t *out, int64_t *ts, double *v, size_t *bad)
{
    if (!offs || !out || !bad || (nblocks && (!buf || !ts || !v)))
        return M3_EINVAL;
    for (size_t i = 0; i < nblocks; i++) {
        uint32_t count;
        size_t n;
        *bad = i;
        const uint8_t *b = buf + offs[i];
        size_t len = (size_t)(offs[i + 1] - offs[i]);
        int rc = tsz_count(b, len, &count);
        if (rc)
            return rc;
        if (out[i + 1] - out[i] != count) /* not the counts tsz_count_many gave */
            return M3_EINVAL;
        rc = decode_core(b, len, count, ts + out[i], v + out[i], NULL, &n, NULL);
        if (rc)
            return rc;
    }
    return M3_OK;
}

int tsz_enc_resume(tsz_enc *e, uint8_t *buf, size_t cap)
{
    uint32_t count;
    if (!e || !buf || !aligned4(buf))
        return M3_EINVAL;
    int rc = tsz_count(buf, cap, &count);
    if (rc)
        return rc;
    uint32_t seq = __atomic_load_n(&e->seq, __ATOMIC_ACQUIRE);
    if (!(seq & 1u) && e->count == count &&
        TSZ_HEADER_BYTES + ((e->nbits + 7) >> 3) <= cap)
        return M3_OK;
    tsz_enc s;
    size_t done;
    rc = decode_core(buf, cap, count, NULL, NULL, &s, &done, NULL);
    if (rc)
        return rc;
    /* Clear any bits a dead appender left past the published ones in the last byte. */
    if (s.nbits & 7) {
        uint8_t *last = buf + TSZ_HEADER_BYTES + (s.nbits >> 3);
        *last &= (uint8_t)(0xff00u >> (s.nbits & 7));
    }
    s.seq = (seq | 1u) + 1;
    memcpy(e, &s, sizeof s);
    return M3_OK;
}
