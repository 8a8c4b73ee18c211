/* `caprl report` on a hand-made demo run: a tiny real world from `caprl synth`, and metrics, Prism results,
 * captions and filter output written here with numbers chosen so that every figure of summary.json is known
 * (recomputed below from the scenes, independently of the program's code); the page's parts (two SVG charts, two
 * embedded PNGs, the table); absent parts; errors naming the missing or malformed file. Skipped (77) when the
 * program has not been built. */
#include <jansson.h>
#include <stdbool.h>
#include <sys/stat.h>

#include "caprl_test.h"
#include "proc_util.h"

static char g_run[4400];

/* Writes RUN/rel. */
static void write_run(const char *rel, const char *text) {
    char path[4600];
    snprintf(path, sizeof path, "%s/%s", g_run, rel);
    write_text(path, text);
}

static json_t *load_jsonl(const char *rel) {
    char path[4600];
    snprintf(path, sizeof path, "%s/%s", g_run, rel);
    char   *text = read_text(path);
    json_t *arr = json_array();
    for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n")) {
        json_t *rec = json_loads(line, 0, NULL);
        CHECK_MSG(rec != NULL, "%s: bad line %s", rel, line);
        if (rec) {
            json_array_append_new(arr, rec);
        }
    }
    free(text);
    return arr;
}

static void append_line(FILE *f, json_t *rec) {
    char *s = json_dumps(rec, JSON_COMPACT);
    fprintf(f, "%s\n", s);
    free(s);
    json_decref(rec);
}

static const char *obj_field(json_t *o, const char *k) {
    return json_string_value(json_object_get(o, k));
}

/* "A <size> <color> <shape> at the <position>." with the object's own or another position. */
static void sentence(char *buf, size_t cap, json_t *o, const char *position) {
    snprintf(buf, cap, "A %s %s %s at the %s.", obj_field(o, "size"), obj_field(o, "color"), obj_field(o, "shape"),
             position ? position : obj_field(o, "position"));
}

/* Words: the captions written here are single-spaced. */
static int64_t spaces_plus_one(const char *s) {
    int64_t n = 1;
    for (; *s; s++) {
        n += *s == ' ';
    }
    return n;
}

static bool scene_has(json_t *objs, const char *color, const char *shape) {
    size_t  i;
    json_t *o;
    json_array_foreach(objs, i, o) {
        if (strcmp(obj_field(o, "color"), color) == 0 && strcmp(obj_field(o, "shape"), shape) == 0) {
            return true;
        }
    }
    return false;
}

static double num(json_t *summary, const char *key) {
    json_t *v = json_object_get(summary, key);
    CHECK_MSG(json_is_number(v), "summary.json: no number \"%s\"", key);
    return json_is_number(v) ? json_number_value(v) : NAN;
}

static int run_report(const char *extra, char *out, size_t cap) {
    char args[9000];
    snprintf(args, sizeof args, "report --run '%s' %s", g_run, extra);
    return run_cli(args, out, cap);
}

static void check_error(int rc, const char *want1, const char *want2) {
    char err[8192];
    read_stderr(err, sizeof err);
    CHECK_EQ_I64(rc, 2);
    CHECK_MSG(strstr(err, want1) && strstr(err, want2), "stderr: %s", err);
}

int main(void) {
    struct stat st;
    if (stat(CAPRL_CLI, &st) != 0) {
        fprintf(stderr, "skip: %s not built\n", CAPRL_CLI);
        return 77;
    }
    char *dir = test_tmpdir("report_cli");
    snprintf(g_dir, sizeof g_dir, "%s", dir);
    snprintf(g_run, sizeof g_run, "%s/run", dir);
    char args[9000], path[4600];
    snprintf(args, sizeof args, "synth --out '%s/world' --train 4 --test 2 --seed 7", g_run);
    CHECK_EQ_I64(run_cli(args, NULL, 0), 0);
    const char *const subs[] = {"train", "prism_before", "prism_after", "filter"};
    for (int i = 0; i < 4; i++) {
        snprintf(path, sizeof path, "%s/%s", g_run, subs[i]);
        mkdir(path, 0755);
    }

    /* metrics: 20 steps, windows of 2; steps 11-12 first written with other values, then again (a resumed run:
     * the later lines win) */
    static const double reward[21] = {0, 0.25, 0.35, 0.4, 0.4, 0.5, 0.5, 0.5, 0.6, 0.6, 0.6,
                                      0.6, 0.6, 0.6, 0.7, 0.7, 0.7, 0.7, 0.7, 0.70, 0.80};
    snprintf(path, sizeof path, "%s/train/metrics.jsonl", g_run);
    FILE *f = fopen(path, "wb");
    for (int s = 1; s <= 12; s++) {
        fprintf(f, "{\"step\": %d, \"reward_mean\": %.17g, \"reward_std\": 0.1, \"caption_len_mean\": %d}\n", s,
                s > 10 ? 9.0 : reward[s], s > 10 ? 999 : 10 + 2 * s);
    }
    for (int s = 11; s <= 20; s++) {
        fprintf(f, "{\"step\": %d, \"reward_mean\": %.17g, \"reward_std\": 0.1, \"caption_len_mean\": %d}\n", s,
                reward[s], 10 + 2 * s);
    }
    fclose(f);

    write_run("prism_before/Prism_sft_step_eval_0_final.json", "[\"BoN: 0.5 Mean: 0.375\"]");
    write_run("prism_after/Prism_grpo_step_eval_0_final.json", "[\"BoN: 0.875 Mean: 0.6875\"]");

    /* captions. Before, per test image: its first object, then the same plus a phrase outside the grammar.
     * After: every object, one absent object, and the first object again at a wrong position. */
    json_t *scenes = load_jsonl("world/scenes.jsonl");
    json_t *test[2] = {NULL, NULL};
    size_t  n_test = 0, i;
    json_t *sc;
    json_array_foreach(scenes, i, sc) {
        if (strcmp(obj_field(sc, "split"), "test") == 0 && n_test < 2) {
            test[n_test++] = sc;
        }
    }
    CHECK_EQ_I64(n_test, 2);
    static const char *const colors[] = {"red", "green", "blue", "yellow", "white", "black"};
    static const char *const shapes[] = {"circle", "square", "triangle", "diamond"};
    int64_t words_before = 0, words_after = 0, objects = 0;
    FILE   *fb, *fa;
    snprintf(path, sizeof path, "%s/prism_before/captions_sft.jsonl", g_run);
    fb = fopen(path, "wb");
    snprintf(path, sizeof path, "%s/prism_after/captions_grpo.jsonl", g_run);
    fa = fopen(path, "wb");
    for (size_t k = 0; k < n_test; k++) {
        json_t *objs = json_object_get(test[k], "objects");
        objects += (int64_t)json_array_size(objs);
        char c0[256], c1[512], after[4096] = "", s[256];
        sentence(c0, sizeof c0, json_array_get(objs, 0), NULL);
        snprintf(c1, sizeof c1, "%s The picture shows a red circle.", c0);
        words_before += spaces_plus_one(c0) + spaces_plus_one(c1);
        append_line(fb, json_pack("{s:s, s:[s,s], s:[i,i], s:[s,s]}", "image", obj_field(test[k], "image"),
                                  "captions", c0, c1, "tokens", 10, 14, "finish", "eos", "eos"));
        json_t *o;
        json_array_foreach(objs, i, o) {
            sentence(s, sizeof s, o, NULL);
            snprintf(after + strlen(after), sizeof after - strlen(after), "%s ", s);
        }
        const char *ac = NULL, *as = NULL; /* a colour-shape pair that is not in the scene */
        for (int c = 0; c < 6 && !ac; c++) {
            for (int h = 0; h < 4 && !ac; h++) {
                if (!scene_has(objs, colors[c], shapes[h])) {
                    ac = colors[c];
                    as = shapes[h];
                }
            }
        }
        const char *p0 = obj_field(json_array_get(objs, 0), "position");
        snprintf(s, sizeof s, "A small %s %s at the center. ", ac, as);
        strcat(after, s);
        sentence(s, sizeof s, json_array_get(objs, 0), strcmp(p0, "center") == 0 ? "top left" : "center");
        strcat(after, s);
        words_after += spaces_plus_one(after);
        append_line(fa, json_pack("{s:s, s:[s], s:[i], s:[s]}", "image", obj_field(test[k], "image"), "captions",
                                  after, "tokens", k == 0 ? 50 : 70, "finish", "eos"));
    }
    /* an image that could not be read: counted, no captions */
    append_line(fa, json_pack("{s:s, s:s}", "image", "images/train/00000.png", "error", "cannot read"));
    fclose(fb);
    fclose(fa);

    /* the filter kept every valid question but the first and one leaky question (the first) */
    json_t *train_qa = load_jsonl("world/train.jsonl");
    snprintf(path, sizeof path, "%s/world/leaky_ids.json", g_run);
    json_t *leaky = json_load_file(path, 0, NULL);
    json_t *lk = json_object_get(leaky, "leaky");
    int64_t n_leaky = (int64_t)json_array_size(lk), n_valid = 0;
    CHECK(n_leaky >= 2);
    snprintf(path, sizeof path, "%s/filter/filtered.jsonl", g_run);
    f = fopen(path, "wb");
    bool    dropped_valid = false;
    json_t *rec;
    json_array_foreach(train_qa, i, rec) {
        json_t *qa = json_object_get(rec, "qa"), *kept = json_array();
        for (size_t j = 0; j < json_array_size(qa); j++) {
            bool is_leaky = false, first_leaky = false;
            for (size_t l = 0; l < json_array_size(lk); l++) {
                json_t *e = json_array_get(lk, l);
                if (strcmp(obj_field(e, "id"), obj_field(rec, "id")) == 0 &&
                    json_integer_value(json_object_get(e, "index")) == (json_int_t)j) {
                    is_leaky = true;
                    first_leaky = l == 0;
                }
            }
            n_valid += !is_leaky;
            bool keep = is_leaky ? first_leaky : dropped_valid;
            dropped_valid = dropped_valid || !is_leaky;
            if (keep) {
                json_array_append(kept, json_array_get(qa, j));
            }
        }
        char img[4600];
        snprintf(img, sizeof img, "%s/world/%s", g_run, obj_field(rec, "image"));
        append_line(f, json_pack("{s:s, s:s, s:o}", "id", obj_field(rec, "id"), "image", img, "qa", kept));
    }
    fclose(f);
    json_decref(train_qa);
    json_decref(leaky);

    /* the report */
    char out[16384];
    int  rc = run_report("", out, sizeof out);
    CHECK_EQ_I64(rc, 0);
    if (rc != 0) {
        char err[8192];
        read_stderr(err, sizeof err);
        fprintf(stderr, "%s\n", err);
    }
    CHECK_MSG(strstr(out, "SFT (before)") && strstr(out, "GRPO (after)") && strstr(out, "Prism Mean accuracy") &&
                  strstr(out, "37.5%") && strstr(out, "68.8%") && strstr(out, "+31.2 pts") &&
                  strstr(out, "+37.5 pts") && strstr(out, "0.300") && strstr(out, "0.750"),
              "stdout:\n%s", out);
    snprintf(path, sizeof path, "%s/summary.json", g_run);
    json_t *sum = json_load_file(path, 0, NULL);
    CHECK(sum != NULL);
    const double tol = 1e-9;
    CHECK_NEAR(num(sum, "train_steps"), 20, 0, 0);
    CHECK_NEAR(num(sum, "reward_window"), 2, 0, 0);
    CHECK_NEAR(num(sum, "reward_start"), 0.30, 0, tol);
    CHECK_NEAR(num(sum, "reward_end"), 0.75, 0, tol);
    CHECK_NEAR(num(sum, "reward_rise"), 0.45, 0, tol);
    CHECK_NEAR(num(sum, "train_caption_tokens_start"), 13, 0, tol); /* (12 + 14) / 2 */
    CHECK_NEAR(num(sum, "train_caption_tokens_end"), 49, 0, tol);   /* (48 + 50) / 2 */
    CHECK_NEAR(num(sum, "prism_mean_before"), 0.375, 0, tol);
    CHECK_NEAR(num(sum, "prism_mean_after"), 0.6875, 0, tol);
    CHECK_NEAR(num(sum, "prism_mean_gain_points"), 31.25, 0, tol);
    CHECK_NEAR(num(sum, "prism_bon_before"), 0.5, 0, tol);
    CHECK_NEAR(num(sum, "prism_bon_after"), 0.875, 0, tol);
    CHECK_NEAR(num(sum, "prism_bon_gain_points"), 37.5, 0, tol);
    CHECK_NEAR(num(sum, "prism_images_before"), 2, 0, 0);
    CHECK_NEAR(num(sum, "prism_images_after"), 2, 0, 0);
    CHECK_NEAR(num(sum, "prism_image_errors_after"), 1, 0, 0);
    CHECK_NEAR(num(sum, "captions_before"), 4, 0, 0);
    CHECK_NEAR(num(sum, "captions_after"), 2, 0, 0);
    CHECK_NEAR(num(sum, "caption_words_before"), (double)words_before / 4, 0, tol);
    CHECK_NEAR(num(sum, "caption_words_after"), (double)words_after / 2, 0, tol);
    CHECK_NEAR(num(sum, "caption_tokens_before"), 12, 0, tol);
    CHECK_NEAR(num(sum, "caption_tokens_after"), 60, 0, tol);
    /* before: one object per caption, right and in place; it covers 1 of the image's objects, twice per image */
    CHECK_NEAR(num(sum, "objects_mentioned_before"), 1, 0, tol);
    CHECK_NEAR(num(sum, "objects_precision_before"), 1, 0, tol);
    CHECK_NEAR(num(sum, "objects_exact_before"), 1, 0, tol);
    CHECK_NEAR(num(sum, "objects_recall_before"), 4.0 / (double)(2 * objects), 0, tol);
    /* after: n + 2 phrases per caption, n + 1 of objects in the image, n in place, all n objects covered */
    CHECK_NEAR(num(sum, "objects_mentioned_after"), (double)(objects + 4) / 2, 0, tol);
    CHECK_NEAR(num(sum, "objects_precision_after"), (double)(objects + 2) / (double)(objects + 4), 0, tol);
    CHECK_NEAR(num(sum, "objects_exact_after"), (double)objects / (double)(objects + 4), 0, tol);
    CHECK_NEAR(num(sum, "objects_recall_after"), 1, 0, tol);
    CHECK_NEAR(num(sum, "filter_leaky"), (double)n_leaky, 0, 0);
    CHECK_NEAR(num(sum, "filter_leaky_removed"), (double)(n_leaky - 1), 0, 0);
    CHECK_NEAR(num(sum, "filter_leaky_removed_frac"), (double)(n_leaky - 1) / (double)n_leaky, 0, tol);
    CHECK_NEAR(num(sum, "filter_valid"), (double)n_valid, 0, 0);
    CHECK_NEAR(num(sum, "filter_valid_kept"), (double)(n_valid - 1), 0, 0);
    CHECK_NEAR(num(sum, "filter_valid_kept_frac"), (double)(n_valid - 1) / (double)n_valid, 0, tol);
    CHECK(json_is_true(json_object_get(sum, "filter")) && json_is_true(json_object_get(sum, "prism_after")));
    json_decref(sum);

    snprintf(path, sizeof path, "%s/report.html", g_run);
    char *html = read_text(path);
    int   n_svg = 0, n_png = 0;
    for (const char *p = html; (p = strstr(p, "<svg")); p++) {
        n_svg++;
    }
    for (const char *p = html; (p = strstr(p, "data:image/png;base64,iVBORw0KGgo")); p++) {
        n_png++; /* iVBORw0KGgo: the PNG signature in base64 */
    }
    CHECK_EQ_I64(n_svg, 2);
    CHECK_EQ_I64(n_png, 2);
    CHECK(strstr(html, "<polyline") && strstr(html, "training step") && strstr(html, "image-rendering:pixelated"));
    CHECK(strstr(html, "<table") && strstr(html, "Prism Mean accuracy") && strstr(html, "+31.2 pts"));
    CHECK(strstr(html, "http://") == strstr(html, "http://www.w3.org/2000/svg")); /* no external resource */
    CHECK(strstr(html, "src=\"http") == NULL && strstr(html, "<link") == NULL && strstr(html, "<script") == NULL);
    CHECK(strstr(html, obj_field(test[0], "id")) != NULL);
    free(html);

    /* --out / --summary elsewhere; a missing filter directory is reported as absent */
    snprintf(path, sizeof path, "%s/filter", g_run);
    char moved[4700];
    snprintf(moved, sizeof moved, "%s/filter.off", dir);
    CHECK(rename(path, moved) == 0);
    snprintf(args, sizeof args, "--out '%s/r2.html' --summary '%s/s2.json'", dir, dir);
    CHECK_EQ_I64(run_report(args, out, sizeof out), 0);
    CHECK_MSG(strstr(out, "absent") != NULL, "%s", out);
    snprintf(path, sizeof path, "%s/s2.json", dir);
    sum = json_load_file(path, 0, NULL);
    CHECK(json_is_false(json_object_get(sum, "filter")) && json_is_null(json_object_get(sum, "filter_leaky")));
    CHECK_NEAR(num(sum, "prism_mean_after"), 0.6875, 0, tol);
    json_decref(sum);
    snprintf(path, sizeof path, "%s/r2.html", dir);
    CHECK(stat(path, &st) == 0);

    /* errors name the file: a malformed result, a missing captions file, a missing metrics file */
    snprintf(path, sizeof path, "%s/prism_after/Prism_grpo_step_eval_0_final.json", g_run);
    char *good_eval = read_text(path);
    write_run("prism_after/Prism_grpo_step_eval_0_final.json", "[\"BoN: 0.875\"]");
    check_error(run_report("", NULL, 0), "Prism_grpo_step_eval_0_final.json", "BoN");
    write_run("prism_after/Prism_grpo_step_eval_0_final.json", good_eval);
    free(good_eval);
    snprintf(path, sizeof path, "%s/prism_after/captions_grpo.jsonl", g_run);
    snprintf(moved, sizeof moved, "%s/captions.off", dir);
    CHECK(rename(path, moved) == 0);
    check_error(run_report("", NULL, 0), "prism_after/captions_grpo.jsonl", "missing");
    CHECK(rename(moved, path) == 0);
    snprintf(path, sizeof path, "%s/train/metrics.jsonl", g_run);
    CHECK(unlink(path) == 0);
    check_error(run_report("", NULL, 0), "train/metrics.jsonl", "missing");
    CHECK_EQ_I64(run_cli("report", NULL, 0), 1);

    json_decref(scenes);
    free(dir);
    return test_finish("test_report");
}
