/* Code-point case mapping through utf8proc (casemap_impl.h). utf8proc has the simple (one-to-one) mappings;
 * Python's str methods use the full ones, which differ only for a handful of characters, listed here by the
 * number of code points they expand to. */
#include <utf8proc.h>

#include "text/casemap_impl.h"

uint32_t caprl_cp_lower(uint32_t cp) {
    return cp > 0x10FFFF ? cp : (uint32_t)utf8proc_tolower((utf8proc_int32_t)cp);
}

uint32_t caprl_cp_upper(uint32_t cp) {
    return cp > 0x10FFFF ? cp : (uint32_t)utf8proc_toupper((utf8proc_int32_t)cp);
}

int32_t caprl_cp_upper_len(uint32_t cp) {
    switch (cp) {
    case 0x00DF: /* sharp s -> SS */
    case 0x0149: /* n preceded by apostrophe -> ʼN */
    case 0x01F0: /* j with caron */
    case 0xFB00: /* ff */
    case 0xFB01: /* fi */
    case 0xFB02: /* fl */
    case 0xFB05: /* long s t */
    case 0xFB06: /* st */
        return 2;
    case 0x0390: /* iota with dialytika and tonos */
    case 0x03B0: /* upsilon with dialytika and tonos */
    case 0xFB03: /* ffi */
    case 0xFB04: /* ffl */
        return 3;
    default:
        return 1;
    }
}

int32_t caprl_cp_lower_len(uint32_t cp) {
    return cp == 0x0130 ? 2 : 1;
}
