/* Unicode case mapping of single code points (utf8proc's simple mappings), plus the few one-to-many expansions
 * Python's str.upper() / str.lower() make that change a string's length. Used where caprl must reproduce Python
 * string comparisons (the Prism scoring's lower(), upper() and ANLS lengths). Pure functions. */
#ifndef CAPRL_CASEMAP_IMPL_H
#define CAPRL_CASEMAP_IMPL_H

#include "caprl/caprl.h"

uint32_t caprl_cp_lower(uint32_t cp);
uint32_t caprl_cp_upper(uint32_t cp);
/* How many code points str.upper() makes of cp (2 for U+00DF sharp s, 3 for U+FB03 ffi, ...; 1 otherwise). */
int32_t  caprl_cp_upper_len(uint32_t cp);
/* How many code points str.lower() makes of cp (2 for U+0130 capital I with dot above; 1 otherwise). */
int32_t  caprl_cp_lower_len(uint32_t cp);

#endif /* CAPRL_CASEMAP_IMPL_H */
