/* UTF-8 encoding, the byte-level alphabet, and validation and lossy repair by Unicode's well-formedness table
 * (Unicode 15 §3.9, Table 3-7).
 * Repair substitutes one U+FFFD per maximal subpart of an ill-formed sequence (Unicode §3.9.6, "U+FFFD Substitution
 * of Maximal Subparts"), the practice of Python's bytes.decode(errors="replace"), Rust's from_utf8_lossy and the
 * WHATWG decoder, so caprl decodes token bytes exactly as Hugging Face does. */
#include <string.h>

#include "text/tokenizer_impl.h"

/* Length (1-4) of the well-formed sequence at s[i], or 0 if there is none; then *sub is the length (>= 1) of the
 * maximal subpart: the longest prefix of a well-formed sequence found at s[i]. */
static size_t sequence_at(const uint8_t *s, size_t n, size_t i, size_t *sub) {
    uint8_t b = s[i];
    if (b < 0x80) {
        return 1;
    }
    size_t  need;
    uint8_t lo = 0x80, hi = 0xBF; /* range allowed for the second byte; later bytes are always 80..BF */
    if (b >= 0xC2 && b <= 0xDF) {
        need = 1;
    } else if (b == 0xE0) {
        need = 2;
        lo   = 0xA0; /* no overlongs */
    } else if (b == 0xED) {
        need = 2;
        hi   = 0x9F; /* no surrogates */
    } else if (b >= 0xE1 && b <= 0xEF) {
        need = 2;
    } else if (b == 0xF0) {
        need = 3;
        lo   = 0x90; /* no overlongs */
    } else if (b >= 0xF1 && b <= 0xF3) {
        need = 3;
    } else if (b == 0xF4) {
        need = 3;
        hi   = 0x8F; /* nothing above U+10FFFF */
    } else {
        *sub = 1; /* 80..C1, F5..FF never start a sequence */
        return 0;
    }
    size_t k = 1;
    while (k <= need && i + k < n && s[i + k] >= lo && s[i + k] <= hi) {
        lo = 0x80;
        hi = 0xBF;
        k++;
    }
    if (k == need + 1) {
        return k;
    }
    *sub = k;
    return 0;
}

size_t caprl_utf8_validate(const uint8_t *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        if (s[i] < 0x80) {
            i++;
            continue;
        }
        size_t sub, len = sequence_at(s, n, i, &sub);
        if (len == 0) {
            return i;
        }
        i += len;
    }
    return n;
}

size_t caprl_utf8_repair(const uint8_t *s, size_t n, char *out, size_t cap) {
    static const uint8_t k_fffd[3] = {0xEF, 0xBF, 0xBD};
    size_t               o = 0, i = 0;
    while (i < n) {
        size_t         sub = 0, len = s[i] < 0x80 ? 1 : sequence_at(s, n, i, &sub);
        const uint8_t *src = s + i;
        size_t         m   = len;
        if (len == 0) {
            src = k_fffd;
            m   = 3;
            i += sub;
        } else {
            i += len;
        }
        if (cap > 0 && o < cap - 1) {
            size_t room = cap - 1 - o;
            memcpy(out + o, src, m < room ? m : room);
        }
        o += m;
    }
    if (cap > 0) {
        out[o < cap - 1 ? o : cap - 1] = '\0';
    }
    return o;
}

/* Bytes 21-7E, A1-AC, AE-FF stand for themselves; the other 68 map, in byte order, to U+0100..U+0143. */
uint32_t caprl_byte_level_cp(uint32_t b) {
    if ((b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE) {
        return b;
    }
    if (b <= 0x20) {
        return 0x100 + b;
    }
    if (b <= 0xA0) {
        return 0x121 + (b - 0x7F);
    }
    return 0x143; /* 0xAD */
}

size_t caprl_utf8_put(uint32_t cp, uint8_t *out) {
    if (cp < 0x80) {
        out[0] = (uint8_t)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (uint8_t)(0xC0 | (cp >> 6));
        out[1] = (uint8_t)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (uint8_t)(0xE0 | (cp >> 12));
        out[1] = (uint8_t)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (uint8_t)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (uint8_t)(0xF0 | (cp >> 18));
    out[1] = (uint8_t)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (uint8_t)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (uint8_t)(0x80 | (cp & 0x3F));
    return 4;
}
