/* caprl version */
#include <stdio.h>

#include "caprl/caprl.h"
#include "commands.h"
#include "opts.h"

int cmd_version(int argc, char **argv) {
    static const cmd_info info = {"version", "caprl version", "Print the version and the number of cores.", NULL};
    opt_spec specs[] = {{0}};
    int      rc = opts_parse(&info, specs, argc, argv, NULL, 0, NULL);
    if (rc) {
        return rc < 0 ? EXIT_OK : rc;
    }
    printf("caprl %s (%d cores)\n", CAPRL_VERSION_STRING, caprl_n_cores());
    return EXIT_OK;
}
