/*
 * json_points.c -- the points of query results as Prometheus writes them in JSON, in one call.
 *
 * A matrix series' points are `[t,"v"],[t,"v"],...`. Prometheus 2.42 writes t with
 * MarshalTimestamp (unix seconds, then `.` and three digits of milliseconds unless they are
 * zero; a minus sign before a negative time) and v with Go's strconv.FormatFloat(v, 'f', -1,
 * 64): the shortest decimal that reads back as v, in positional notation (never an exponent),
 * `NaN`, `+Inf`, `-Inf`, and `-0` for negative zero.
 *
 * The shortest digits are not computed here: the caller passes CPython's repr of the values
 * (repr of a list of floats: `[v, v, ...]`, each the shortest round-trip form by David Gay's
 * algorithm, the same digits Go chooses), which CPython produces at C speed. This file only
 * re-lays each token: `nan`/`inf`/`-inf` become `NaN`/`+Inf`/`-Inf`, a trailing `.0` goes, and
 * an exponent form (`1e-07`, `1.5e+21`) is written positionally (`0.0000001`,
 * `1500000000000000000000`). Tokens are checked as they are read; anything that is not a
 * float repr is M3_ECORRUPT (never an overrun).
 *
 * m3_json_points_f computes the shortest digits itself, from the doubles (no repr needed):
 *  - exact path, for 1e-5 <= |v| < 2^53 (v = m / 2^s with s <= 76): for k = 0, 1, ... 22
 *    decimals, n = m * 10^k (exact in 128 bits) gives the two k-decimal candidates around
 *    |v|, q = floor(n / 2^s) and q + 1, and their exact distances to |v|. A candidate reads
 *    back as v when it is inside v's rounding interval (half an ulp either side; a quarter
 *    below a power of two; ties go to the even mantissa, as strtod rounds). The first k
 *    with a candidate that reads back gives the shortest digits, and of two the closer,
 *    which is what Gay's algorithm (CPython's repr) and Go's FormatFloat choose (an exact
 *    tie between the two: the even one, as repr). 17
 *    significant digits always read back, and they fit 22 decimals in this range;
 *  - otherwise (tiny or huge values), for p = 1 .. 17 the correctly rounded p-digit string
 *    (snprintf %.*e, exact in glibc) is taken if strtod reads it back as v: the closest
 *    p-digit string reads back whenever any does, except when v is a power of two (its
 *    interval is narrower below it). Such a power of two is left to the caller (M3_ERANGE):
 *    it formats that series through the repr path above.
 * Both go through the same token layout as reprs (put_token).
 *
 * Sizes: a value takes at most 330 bytes positionally (309 integer digits of DBL_MAX, or "0."
 * and 323 zeros before a subnormal's digits); m3_json_points_bound(n) is always enough.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "m3shm.h"

#define VALUE_MAX 340   /* bytes one formatted value can take (see above) */
#define TS_MAX 24       /* "-9223372036854775.808" */

static size_t put_ts(int64_t t, char *out)
{
    size_t o = 0;
    uint64_t u = (uint64_t)t;
    if (t < 0) {
        out[o++] = '-';
        u = 0 - u;
    }
    uint64_t sec = u / 1000, ms = u % 1000;
    char tmp[24];
    int k = 0;
    do {
        tmp[k++] = (char)('0' + sec % 10);
        sec /= 10;
    } while (sec);
    while (k)
        out[o++] = tmp[--k];
    if (ms) {
        out[o++] = '.';
        out[o++] = (char)('0' + ms / 100);
        out[o++] = (char)('0' + ms / 10 % 10);
        out[o++] = (char)('0' + ms % 10);
    }
    return o;
}

/* One repr token s[0..n) -> Prometheus' form in out; bytes written, or -1 if malformed. */
static int64_t put_token(const char *s, size_t n, char *out)
{
    size_t o = 0;
    if (n == 3 && !memcmp(s, "nan", 3)) {
        memcpy(out, "NaN", 3);
        return 3;
    }
    if (n == 3 && !memcmp(s, "inf", 3)) {
        memcpy(out, "+Inf", 4);
        return 4;
    }
    if (n == 4 && !memcmp(s, "-inf", 4)) {
        memcpy(out, "-Inf", 4);
        return 4;
    }
    size_t i = 0;
    if (i < n && s[i] == '-')
        out[o++] = s[i++];
    /* mantissa: digits, optionally '.' digits */
    char dig[32];
    int nd = 0, intd = 0, dot = 0;
    for (; i < n && s[i] != 'e'; i++) {
        if (s[i] == '.' && !dot) {
            dot = 1;
            continue;
        }
        if (s[i] < '0' || s[i] > '9' || nd >= 30)
            return -1;
        dig[nd++] = s[i];
        if (!dot)
            intd++;
    }
    if (!nd || !intd)
        return -1;
    int e = intd - 1;   /* decimal exponent of dig[0] */
    if (i < n) {   /* exponent */
        i++;
        int sign = 1, x = 0, nx = 0;
        if (i < n && (s[i] == '+' || s[i] == '-'))
            sign = s[i++] == '-' ? -1 : 1;
        for (; i < n; i++, nx++) {
            if (s[i] < '0' || s[i] > '9' || nx > 3)
                return -1;
            x = x * 10 + (s[i] - '0');
        }
        if (!nx)
            return -1;
        e += sign * x;
        if (e > 310 || e < -330)
            return -1;
    }
    /* drop leading zeros (positional "0.001" -> digits 1, e -3) and trailing zeros */
    int lead = 0;
    while (lead < nd - 1 && dig[lead] == '0') {
        lead++;
        e--;
    }
    int end = nd;
    while (end > lead + 1 && dig[end - 1] == '0')
        end--;
    const char *d = dig + lead;
    int m = end - lead;
    if (m == 1 && d[0] == '0') {   /* zero, its sign already written */
        out[o++] = '0';
        return (int64_t)o;
    }
    if (e >= 0) {
        for (int k = 0; k <= e; k++)
            out[o++] = k < m ? d[k] : '0';
        if (m > e + 1) {
            out[o++] = '.';
            for (int k = e + 1; k < m; k++)
                out[o++] = d[k];
        }
    } else {
        out[o++] = '0';
        out[o++] = '.';
        for (int k = 0; k < -e - 1; k++)
            out[o++] = '0';
        for (int k = 0; k < m; k++)
            out[o++] = d[k];
    }
    return (int64_t)o;
}

size_t m3_json_points_bound(size_t n)
{
    return n * (TS_MAX + VALUE_MAX + 6);
}

int64_t m3_json_points(const int64_t *ts, const char *reprs, size_t reprs_len, size_t n,
                       char *out, size_t cap)
{
    if ((n && (!ts || !reprs)) || !out)
        return M3_EINVAL;
    size_t r = 0, o = 0;
    if (r < reprs_len && reprs[r] == '[')
        r++;
    for (size_t i = 0; i < n; i++) {
        if (cap - o < TS_MAX + VALUE_MAX + 6)
            return M3_ENOSPC;
        while (r < reprs_len && (reprs[r] == ' ' || reprs[r] == ','))
            r++;
        size_t a = r;
        while (r < reprs_len && reprs[r] != ',' && reprs[r] != ']')
            r++;
        if (r == a)
            return M3_ECORRUPT;   /* fewer tokens than points */
        if (i)
            out[o++] = ',';
        out[o++] = '[';
        o += put_ts(ts[i], out + o);
        out[o++] = ',';
        out[o++] = '"';
        int64_t k = put_token(reprs + a, r - a, out + o);
        if (k < 0)
            return M3_ECORRUPT;
        o += (size_t)k;
        out[o++] = '"';
        out[o++] = ']';
    }
    return (int64_t)o;
}

typedef unsigned __int128 u128;

static int put_digits(double v, uint64_t z, int k, char *tok)
{
    int o = 0;
    if (v < 0)
        tok[o++] = '-';
    char tmp[24];
    int nd = 0;
    do {
        tmp[nd++] = (char)('0' + z % 10);
        z /= 10;
    } while (z);
    while (nd)
        tok[o++] = tmp[--nd];
    if (k)
        o += snprintf(tok + o, 8, "e-%d", k);
    return o;
}

/* The shortest round-trip digits of finite, nonzero v as a repr-like token in tok
   ("-DIGITSe-K" or "-D.DDDe+XX"); its length, or -1 for a value only the repr path formats
   exactly (a power of two outside the exact path's range). */
static int shortest_token(double v, char *tok)
{
    double a = fabs(v);
    uint64_t bits;
    memcpy(&bits, &a, sizeof bits);
    uint64_t frac = bits & ((1ULL << 52) - 1);
    if (a >= 1e-5 && a < 9007199254740992.0) {   /* exact path: see the header comment */
        uint64_t m = frac | (1ULL << 52);
        int s = 1075 - (int)(bits >> 52);   /* a = m / 2^s, 0 <= s <= 76 */
        u128 one = (u128)1 << s, p = 1;
        for (int k = 0; k <= 22; k++, p *= 10) {
            u128 n = (u128)m * p;   /* a * 10^k * 2^s, exactly */
            uint64_t q = (uint64_t)(n >> s);
            u128 r = n & (one - 1);
            /* candidates q (below or at a) and q + 1 (above); distances in units where
               one ulp of a is p: q reads back as a if 2r < p (4r < p below a power of two),
               q + 1 if 2(one - r) < p; at an exact tie strtod rounds to the even mantissa */
            u128 dlo = r, dhi = one - r;
            int lo_ok = frac ? (2 * dlo < p || (2 * dlo == p && !(m & 1))) :
                               (4 * dlo <= p);
            int hi_ok = r && (2 * dhi < p || (2 * dhi == p && !(m & 1)));
            if (lo_ok && (!hi_ok || dlo < dhi || (dlo == dhi && !(q & 1))))
                return put_digits(v, q, k, tok);   /* a tie between two: the even one */
            if (hi_ok)
                return put_digits(v, q + 1, k, tok);
        }
        return -1;   /* not reached: 17 digits within 22 decimals always read back */
    }
    if (!frac)
        return -1;   /* a power of two: its rounding interval is narrower below it */
    for (int p = 1; p <= 17; p++) {
        int n = snprintf(tok, 40, "%.*e", p - 1, v);
        if (p == 17 || strtod(tok, NULL) == v)
            return n;
    }
    return -1;
}

int64_t m3_json_points_f(const int64_t *ts, const double *v, size_t n, char *out, size_t cap)
{
    if ((n && (!ts || !v)) || !out)
        return M3_EINVAL;
    size_t o = 0;
    char tok[48];
    for (size_t i = 0; i < n; i++) {
        if (cap - o < TS_MAX + VALUE_MAX + 6)
            return M3_ENOSPC;
        if (i)
            out[o++] = ',';
        out[o++] = '[';
        o += put_ts(ts[i], out + o);
        out[o++] = ',';
        out[o++] = '"';
        double x = v[i];
        if (isnan(x)) {
            memcpy(out + o, "NaN", 3);
            o += 3;
        } else if (isinf(x)) {
            memcpy(out + o, x > 0 ? "+Inf" : "-Inf", 4);
            o += 4;
        } else if (x == 0) {
            if (signbit(x))
                out[o++] = '-';
            out[o++] = '0';
        } else {
            int k = shortest_token(x, tok);
            if (k < 0)
                return M3_ERANGE;
            int64_t w = put_token(tok, (size_t)k, out + o);
            if (w < 0)
                return M3_ECORRUPT;
            o += (size_t)w;
        }
        out[o++] = '"';
        out[o++] = ']';
    }
    return (int64_t)o;
}
