/* make demo-assets end to end, shrunk: scripts/demo_assets.sh with worlds of 520 training images and every SFT run
 * capped at 2 steps, into a scratch directory (the shipped demo/assets are not touched). The full recipe takes about
 * two hours on 2 cores; this checks in half a minute that every stage still runs and hands the next one its input:
 * each of the three models it writes loads and generates (the captioner and the curation model with an image), and
 * the curation model's questions about images come only from images past the demo's 512, whose questions make demo
 * filters. */
#include <stdlib.h>

#include "caprl_test.h"
#include "cli_util.h"

#define DEMO_IMAGES 512

/* Every question about an image in a curation training mix names one past the demo's first DEMO_IMAGES (the object
 * lists, which ask none, cover every image). */
static void check_filter_images(const char *mix_path) {
    FILE *f = fopen(mix_path, "r");
    CHECK_MSG(f != NULL, "cannot read %s", mix_path);
    if (!f) {
        return;
    }
    static char line[1 << 16];
    int         with_image = 0;
    while (fgets(line, sizeof line, f)) {
        const char *p = strstr(line, "\"image\": \"images/train/");
        if (!p || strstr(line, "\"List every object in this image.\"")) {
            continue;
        }
        int index = atoi(p + strlen("\"image\": \"images/train/"));
        CHECK_MSG(index >= DEMO_IMAGES, "%s: a curation record of demo image %d", mix_path, index);
        with_image++;
    }
    fclose(f);
    CHECK_MSG(with_image > 0, "%s: no curation record with an image", mix_path);
}

int main(void) {
    char *tmp = test_tmpdir("demo_assets");
    snprintf(g_dir, sizeof g_dir, "%s", tmp);
    free(tmp);
    char cmd[16384], args[16384], out[4096];
    snprintf(cmd, sizeof cmd,
             "cd '%s' && DEMO_ASSETS_OUT='%s/out' DEMO_ASSETS_WORK='%s/work' DEMO_ASSETS_TRAIN=%d "
             "DEMO_ASSETS_MAX_STEPS=2 ./scripts/demo_assets.sh '%s' >'%s/recipe.log'",
             CAPRL_SOURCE_DIR, g_dir, g_dir, DEMO_IMAGES + 8, CAPRL_BINARY_DIR, g_dir);
    int rc = run(cmd, NULL, 0);
    CHECK_MSG(rc == 0, "scripts/demo_assets.sh failed (%d): see %s/recipe.log and %s/stderr.txt", rc, g_dir, g_dir);
    if (rc != 0) {
        return test_finish("test_demo_assets");
    }
    snprintf(args, sizeof args, "generate --model '%s/out/reader' --prompt 'There are' --max-new-tokens 2 --seed 0",
             g_dir);
    CHECK_MSG(run_cli(args, out, sizeof out) == 0, "the recipe's reader does not generate");
    static const char *const vl_models[] = {"captioner", "filter"};
    for (int i = 0; i < 2; i++) {
        snprintf(args, sizeof args,
                 "generate --model '%s/out/%s' --image '%s/work/world-absent/images/train/00000.png' --chat "
                 "--prompt 'Please describe this image in detail.' --max-new-tokens 2 --seed 0",
                 g_dir, vl_models[i], g_dir);
        CHECK_MSG(run_cli(args, out, sizeof out) == 0, "the recipe's %s does not caption an image", vl_models[i]);
    }
    static const char *const mixes[] = {"filter_mix", "filter_shape", "filter_mixd", "filter_mixl", "filter_mixk"};
    for (size_t i = 0; i < sizeof mixes / sizeof *mixes; i++) {
        char mix[4400];
        snprintf(mix, sizeof mix, "%s/work/world-absent/%s.jsonl", g_dir, mixes[i]);
        check_filter_images(mix);
    }
    return test_finish("test_demo_assets");
}
