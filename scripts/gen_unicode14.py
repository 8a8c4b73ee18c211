#!/usr/bin/env python3
"""Dev-only: the code points that the installed utf8proc classes as letters or numbers but Unicode 14.0 leaves
unassigned, as C ranges for src/text/pretok.c (k_not_in_unicode14).

Hugging Face tokenizers match the pre-tokenizer's \\p{L} / \\p{N} with Oniguruma 6.9.8 (Unicode 14.0); Debian 12's
utf8proc 2.8 has Unicode 15.0. Python 3.11's unicodedata is 14.0.0, so it serves as the reference here.
  python3 scripts/gen_unicode14.py
"""
import ctypes
import unicodedata

assert unicodedata.unidata_version == "14.0.0", unicodedata.unidata_version
lib = ctypes.CDLL("libutf8proc.so.2")
lib.utf8proc_category.restype = ctypes.c_int
lib.utf8proc_category.argtypes = [ctypes.c_int32]


def utf8proc_class(cp):
    c = lib.utf8proc_category(cp)  # 1-5: Lu Ll Lt Lm Lo, 9-11: Nd Nl No
    return "L" if 1 <= c <= 5 else "N" if 9 <= c <= 11 else "-"


def unicode14_class(cp):
    c = unicodedata.category(chr(cp))
    return c[0] if c[0] in "LN" else "-"


ranges = []
for cp in range(0x80, 0x110000):
    if utf8proc_class(cp) == unicode14_class(cp):
        continue
    # only "letter or number in utf8proc, nothing in 14.0" is expected; anything else needs a new kind of entry
    assert unicode14_class(cp) == "-", hex(cp)
    if ranges and ranges[-1][1] == cp - 1:
        ranges[-1][1] = cp
    else:
        ranges.append([cp, cp])
print("static const uint32_t k_not_in_unicode14[][2] = {")
for lo, hi in ranges:
    print("    {0x%05X, 0x%05X}," % (lo, hi))
print("};")
