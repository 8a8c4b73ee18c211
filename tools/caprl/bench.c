/* caprl bench: the machine's own ceilings (fp32 FMA peak, bf16 matrix-unit peak, memory bandwidth), then the
 * decoder's speed on a Qwen2.5-0.5B-shaped random model in f32 and bf16, each as a fraction of its ceiling, and
 * the tokenizer's throughput. `caprl bench reward` compares prefix-cached reward scoring with naive full prompts;
 * `caprl bench train` measures training steps (forward, backward, AdamW) and their planned memory. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "caprl/bench.h"
#include "caprl/model.h"
#include "caprl/reward.h"
#include "caprl/tensor.h"
#include "caprl/tokenizer.h"
#include "caprl/train.h"
#include "caprl/vision.h"
#include "commands.h"
#include "common.h"
#include "opts.h"
#include "subcommands.h"

typedef struct model_figures {
    const char *dtype;
    double      weight_gb;
    double      prefill_tps, prefill_gflops, prefill_frac;
    const char *prefill_ceiling;
    double      decode1_tps, decode1_bound_tps, decode1_frac, decode1_triad_frac;
    double      decode_bytes_per_token; /* weights and KV cache read per decoded token */
    bool        bf16;
    double      decode16_tps, decode16_ratio;
} model_figures;

typedef struct vision_figures {
    const char *dtype;
    int32_t     width[2], height[2];
    double      images_per_s[2], gflops[2], frac[2];
    const char *ceiling;
    bool        bf16;
} vision_figures;

/* Qwen2.5-VL-3B's vision tower (spec/qwen.md §3.1), or a tiny one for --quick. */
static caprl_vision_config vision_bench_config(bool quick) {
    caprl_vision_config v;
    memset(&v, 0, sizeof v);
    v.depth = quick ? 2 : 32;
    v.hidden_size = quick ? 64 : 1280;
    v.intermediate_size = quick ? 128 : 3420;
    v.num_heads = quick ? 4 : 16;
    v.in_channels = 3;
    v.out_hidden_size = quick ? 128 : 2048;
    v.patch_size = 14;
    v.spatial_merge_size = 2;
    v.temporal_patch_size = 2;
    v.window_size = 112;
    v.n_fullatt = quick ? 1 : 4;
    for (int32_t i = 0; i < v.n_fullatt; i++) {
        v.fullatt_block_indexes[i] = quick ? 1 : 8 * i + 7;
    }
    v.tokens_per_second = 2.0f;
    return v;
}

/* Images/s of the tower at 448x448 and 1024x768 (sizes after the processor's smart_resize: 448x448 and
 * 1036x756), one timed encode each after the weights are built. */
static caprl_status bench_vision(const caprl_vision_config *vc, int32_t dtype, int32_t threads, vision_figures *f,
                                 caprl_error *err) {
    caprl_vision *v = NULL;
    fprintf(stderr, "bench: building a %s vision tower with random weights...\n", caprl_dtype_name(dtype));
    caprl_status init = caprl_vision_init_random(&v, vc, dtype, 3, 0.02f, threads, err);
    if (init != CAPRL_OK) {
        return init;
    }
    static const int32_t sizes[2][2] = {{448, 448}, {1036, 756}}; /* (width, height), multiples of 28 */
    f->dtype = caprl_dtype_name(dtype);
    f->bf16 = dtype == CAPRL_DTYPE_BF16;
    caprl_status st = CAPRL_OK;
    for (int s = 0; s < 2 && st == CAPRL_OK; s++) {
        int32_t grid[3] = {1, sizes[s][1] / vc->patch_size, sizes[s][0] / vc->patch_size};
        int64_t n_patches = 0, n_tokens = 0;
        st = caprl_vision_count(vc, grid, 1, &n_patches, &n_tokens, err);
        int64_t patch_dim = (int64_t)vc->in_channels * vc->temporal_patch_size * vc->patch_size * vc->patch_size;
        float  *px = st == CAPRL_OK ? tool_xmalloc((size_t)(n_patches * patch_dim) * sizeof(float)) : NULL;
        float  *out = st == CAPRL_OK ? tool_xmalloc((size_t)(n_tokens * vc->out_hidden_size) * sizeof(float)) : NULL;
        for (int64_t i = 0; px && i < n_patches * patch_dim; i++) {
            px[i] = (float)((i * 2654435761u) % 1000) / 500.0f - 1.0f;
        }
        if (st == CAPRL_OK) {
            fprintf(stderr, "bench: %s vision encode at %dx%d (%lld patches)...\n", caprl_dtype_name(dtype),
                    sizes[s][0], sizes[s][1], (long long)n_patches);
            double t0 = tool_now();
            st = caprl_vision_encode(v, px, n_patches, patch_dim, grid, 1, out, err);
            double dt = tool_now() - t0;
            f->width[s] = sizes[s][0];
            f->height[s] = sizes[s][1];
            f->images_per_s[s] = 1.0 / dt;
            f->gflops[s] = caprl_vision_encode_flops(vc, grid, 1) / dt / 1e9;
        }
        free(px);
        free(out);
    }
    caprl_vision_free(v);
    return st;
}

static caprl_text_config bench_config(bool quick) {
    caprl_text_config c;
    memset(&c, 0, sizeof c);
    c.vocab_size = quick ? 8192 : 151936;
    c.hidden_size = quick ? 128 : 896;
    c.intermediate_size = quick ? 512 : 4864;
    c.n_layers = quick ? 2 : 24;
    c.n_heads = quick ? 4 : 14;
    c.n_kv_heads = 2;
    c.head_dim = quick ? 32 : 64;
    c.max_position_embeddings = 32768;
    c.rms_norm_eps = 1e-6f;
    c.rope_theta = 1000000.0;
    c.tie_word_embeddings = true;
    c.bos_token_id = -1;
    c.eos_token_id = -1;
    c.torch_dtype = -1;
    return c;
}

/* FLOPs of one forward over T fresh tokens: 2 per matmul parameter (lm_head included) per token, plus causal
 * attention (q.k and p.v: 2 * 2 * D multiply-adds per visible key per head). */
static double prefill_flops(const caprl_text_config *c, int64_t T) {
    double C = c->hidden_size, F = c->intermediate_size, V = c->vocab_size, D = c->head_dim;
    double qd = c->n_heads * D, kvd = c->n_kv_heads * D;
    double per_layer = C * qd + 2 * C * kvd + qd * C + 3 * C * F;
    double matmul_params = c->n_layers * per_layer + V * C;
    double attn = (double)c->n_layers * c->n_heads * 4.0 * D * (double)T * (double)(T + 1) / 2.0;
    return 2.0 * matmul_params * (double)T + attn;
}

static int run_decode(caprl_context *ctx, int32_t n_seq, int32_t steps, double *seconds, caprl_error *err) {
    int32_t tokens[16], seqs[16];
    for (int32_t s = 0; s < n_seq; s++) {
        seqs[s] = s;
    }
    double t0 = tool_now();
    for (int32_t step = 0; step < steps; step++) {
        for (int32_t s = 0; s < n_seq; s++) {
            tokens[s] = (step * 31 + s * 7) % 1000 + 10;
        }
        caprl_batch b = {.n_tokens = n_seq, .tokens = tokens, .seq_ids = seqs, .want_logits = NULL};
        if (caprl_context_decode(ctx, &b, err) != CAPRL_OK) {
            return 1;
        }
    }
    *seconds = tool_now() - t0;
    return 0;
}

static caprl_status bench_model(const caprl_text_config *cfg, int32_t dtype, int32_t threads, int32_t T,
                                int32_t steps, model_figures *f, caprl_error *err) {
    caprl_model_params mp = caprl_model_default_params();
    mp.n_threads = threads;
    caprl_model *m = NULL;
    fprintf(stderr, "bench: building a %s model with random weights...\n", caprl_dtype_name(dtype));
    caprl_status st = caprl_model_init_random(&m, cfg, dtype, 1, 0.02f, &mp, err);
    if (st != CAPRL_OK) {
        return st;
    }
    caprl_context_params cp = caprl_context_default_params();
    cp.n_seq_max = 16;
    cp.n_ctx = T + 2 * steps + 2; /* sequence 0 runs both decode measurements */
    cp.n_batch_max = T > 16 ? T : 16; /* the 16-sequence decode steps, even after a shorter prompt */
    cp.n_logits_max = cp.n_batch_max;
    caprl_context *ctx = NULL;
    st = caprl_context_init(&ctx, m, &cp, err);
    int32_t *ids = tool_xmalloc((size_t)T * sizeof(int32_t));
    int32_t *seq = tool_xcalloc((size_t)T, sizeof(int32_t));
    int8_t  *want = tool_xmalloc((size_t)T);
    memset(want, 1, (size_t)T);
    for (int32_t i = 0; i < T; i++) {
        ids[i] = (i * 7919) % (cfg->vocab_size - 1);
    }
    double best = 1e30;
    for (int rep = 0; rep < 2 && st == CAPRL_OK; rep++) {
        caprl_context_seq_clear(ctx, -1);
        caprl_batch b = {.n_tokens = T, .tokens = ids, .seq_ids = seq, .want_logits = want};
        fprintf(stderr, "bench: %s prefill of %d tokens (run %d of 2)...\n", caprl_dtype_name(dtype), T, rep + 1);
        double t0 = tool_now();
        st = caprl_context_decode(ctx, &b, err);
        double dt = tool_now() - t0;
        best = dt < best ? dt : best;
    }
    f->dtype = caprl_dtype_name(dtype);
    f->bf16 = dtype == CAPRL_DTYPE_BF16;
    f->weight_gb = (double)caprl_model_weight_bytes(m) / 1e9;
    f->prefill_tps = T / best;
    f->prefill_gflops = prefill_flops(cfg, T) / best / 1e9;

    /* single-sequence decode after the prompt: weights stream once per token */
    double dt1 = 0, dt16 = 0;
    if (st == CAPRL_OK) {
        fprintf(stderr, "bench: %s decode, 1 and 16 sequences...\n", caprl_dtype_name(dtype));
        for (int32_t s = 1; s < 16 && st == CAPRL_OK; s++) {
            st = caprl_context_seq_copy(ctx, 0, s, err);
        }
    }
    if (st == CAPRL_OK && run_decode(ctx, 1, steps, &dt1, err)) {
        st = err->code;
    }
    if (st == CAPRL_OK && run_decode(ctx, 16, steps, &dt16, err)) {
        st = err->code;
    }
    if (st == CAPRL_OK) {
        f->decode1_tps = steps / dt1;
        double kv_bytes = 2.0 * cfg->n_layers * (T + steps / 2.0) * cfg->n_kv_heads * cfg->head_dim * sizeof(float);
        f->decode_bytes_per_token = (double)caprl_model_weight_bytes(m) + kv_bytes;
        f->decode16_tps = 16.0 * steps / dt16;
        f->decode16_ratio = f->decode16_tps / f->decode1_tps;
    }
    free(ids);
    free(seq);
    free(want);
    caprl_context_free(ctx);
    caprl_model_free(m);
    return st;
}

/* English-like text: a few paragraphs varied by a counter, so the word cache cannot hold the whole input. */
static char *make_english(size_t bytes) {
    static const char *words[] = {"the",     "caption",  "describes", "a",       "small",   "red",    "house",
                                  "near",    "river",    "with",      "two",     "trees",   "and",    "children",
                                  "playing", "football", "while",     "their",   "parents", "watch",  "from",
                                  "bench",   "under",    "cloudy",    "sky",     "it's",    "we're",  "models",
                                  "learn",   "questions", "answers",  "reward",  "policy",  "image",  "1984",
                                  "2025,",   "(see",     "Fig.",      "3)",      "GRPO's",  "reader.", "Yes!"};
    size_t n_words = sizeof words / sizeof words[0];
    char  *s = tool_xmalloc(bytes + 64);
    size_t len = 0;
    uint32_t x = 12345;
    while (len < bytes) {
        x = x * 1103515245u + 12345u;
        const char *w = words[(x >> 16) % n_words];
        len += (size_t)snprintf(s + len, bytes + 64 - len, "%s%s", w, ((x >> 8) & 15) == 0 ? ".\n" : " ");
    }
    s[len] = '\0';
    return s;
}

static double bench_tokenizer(const char *path, caprl_error *err, caprl_status *st) {
    caprl_tokenizer *tok = NULL;
    *st = caprl_tokenizer_load(&tok, path, err);
    if (*st != CAPRL_OK) {
        return 0;
    }
    size_t   bytes = 4u << 20;
    char    *text = make_english(bytes);
    size_t   len = strlen(text);
    int64_t  cap = (int64_t)len, n = 0;
    int32_t *ids = tool_xmalloc((size_t)cap * sizeof(int32_t));
    double   best = 1e30;
    for (int rep = 0; rep < 3 && *st == CAPRL_OK; rep++) {
        double t0 = tool_now();
        *st = caprl_tokenizer_encode(tok, text, len, true, ids, cap, &n, err);
        double dt = tool_now() - t0;
        best = dt < best ? dt : best;
    }
    free(ids);
    free(text);
    caprl_tokenizer_free(tok);
    return (double)len / best / 1e6;
}

/* The probes take a second, the runs minutes: on a shared machine a probe that met other work reads low. Probing
 * again after the runs and keeping the larger figure of each ceiling leaves fewer fractions inflated. fma_probes
 * (or NULL) receives both fp32 FMA readings. */
static caprl_status probe_again(int32_t threads, caprl_machine_peaks *peaks, double fma_probes[2],
                                const char *tool, caprl_error *err) {
    caprl_machine_peaks after;
    fprintf(stderr, "%s: measuring the machine's ceilings again...\n", tool);
    caprl_status st = caprl_measure_peaks(threads, &after, err);
    if (st != CAPRL_OK) {
        return st;
    }
    if (fma_probes) {
        fma_probes[0] = peaks->fp32_fma_gflops;
        fma_probes[1] = after.fp32_fma_gflops;
    }
    peaks->fp32_fma_gflops = fmax(peaks->fp32_fma_gflops, after.fp32_fma_gflops);
    peaks->bf16_matrix_gflops = fmax(peaks->bf16_matrix_gflops, after.bf16_matrix_gflops);
    peaks->mem_bw_gbs = fmax(peaks->mem_bw_gbs, after.mem_bw_gbs);
    peaks->mem_read_gbs = fmax(peaks->mem_read_gbs, after.mem_read_gbs);
    return CAPRL_OK;
}

/* bf16 weights are measured against the bf16 matrix unit where there is one, everything else against the FMA peak */
static const char *ceiling_of(const caprl_machine_peaks *p, bool bf16, double *gflops) {
    bool matrix = bf16 && p->bf16_matrix_gflops > 0;
    *gflops = matrix ? p->bf16_matrix_gflops : p->fp32_fma_gflops;
    return matrix ? p->bf16_unit : "fp32-fma";
}

static void model_fractions(const caprl_machine_peaks *p, model_figures *f) {
    double ceiling;
    f->prefill_ceiling = ceiling_of(p, f->bf16, &ceiling);
    f->prefill_frac = f->prefill_gflops / ceiling;
    /* decode only reads the weights and the cache: its ceiling is the read bandwidth */
    f->decode1_bound_tps = p->mem_read_gbs * 1e9 / f->decode_bytes_per_token;
    f->decode1_triad_frac = f->decode1_tps * f->decode_bytes_per_token / (p->mem_bw_gbs * 1e9);
    f->decode1_frac = f->decode1_tps / f->decode1_bound_tps;
}

static void vision_fractions(const caprl_machine_peaks *p, vision_figures *f) {
    double ceiling;
    f->ceiling = ceiling_of(p, f->bf16, &ceiling);
    for (int s = 0; s < 2; s++) {
        f->frac[s] = f->gflops[s] / ceiling;
    }
}

static void print_json(const caprl_machine_peaks *p, const model_figures *f, int nf, const vision_figures *vf,
                       int nv, double tok_mbs, int32_t T, int32_t steps) {
    printf("{\"threads\": %d, \"cpu\": \"%s\", \"fp32_fma_gflops\": %.1f, \"bf16_matrix_gflops\": %.1f, "
           "\"bf16_unit\": \"%s\", \"mem_bw_gbs\": %.2f, \"mem_read_gbs\": %.2f, \"prompt_tokens\": %d, "
           "\"decode_steps\": %d",
           p->n_threads, p->cpu_features, p->fp32_fma_gflops, p->bf16_matrix_gflops, p->bf16_unit, p->mem_bw_gbs,
           p->mem_read_gbs, T, steps);
    if (tok_mbs > 0) {
        printf(", \"tokenizer_mb_per_s_1_thread\": %.2f", tok_mbs);
    }
    printf(", \"models\": [");
    for (int i = 0; i < nf; i++) {
        printf("%s{\"dtype\": \"%s\", \"weight_gb\": %.3f, \"prefill_tokens_per_s\": %.2f, \"prefill_gflops\": %.1f, "
               "\"prefill_ceiling\": \"%s\", \"prefill_fraction\": %.3f, \"decode1_tokens_per_s\": %.3f, "
               "\"decode1_bound_tokens_per_s\": %.3f, \"decode1_fraction\": %.3f, \"decode1_fraction_of_triad\": %.3f, "
               "\"decode16_tokens_per_s\": %.3f, \"decode16_over_decode1\": %.2f}",
               i ? ", " : "", f[i].dtype, f[i].weight_gb, f[i].prefill_tps, f[i].prefill_gflops, f[i].prefill_ceiling,
               f[i].prefill_frac, f[i].decode1_tps, f[i].decode1_bound_tps, f[i].decode1_frac, f[i].decode1_triad_frac,
               f[i].decode16_tps, f[i].decode16_ratio);
    }
    printf("], \"vision\": [");
    for (int i = 0; i < nv; i++) {
        for (int s = 0; s < 2; s++) {
            printf("%s{\"dtype\": \"%s\", \"width\": %d, \"height\": %d, \"images_per_s\": %.4f, \"gflops\": %.1f, "
                   "\"ceiling\": \"%s\", \"fraction\": %.3f}",
                   i || s ? ", " : "", vf[i].dtype, vf[i].width[s], vf[i].height[s], vf[i].images_per_s[s],
                   vf[i].gflops[s], vf[i].ceiling, vf[i].frac[s]);
        }
    }
    printf("]}\n");
}

static void print_table(const caprl_machine_peaks *p, const model_figures *f, int nf, const vision_figures *vf,
                        int nv, double tok_mbs, int32_t T, int32_t steps) {
    printf("machine (%d threads; %s; each peak the larger of two probes, before and after)\n", p->n_threads,
           p->cpu_features);
    printf("  fp32 FMA peak        %8.1f GFLOP/s\n", p->fp32_fma_gflops);
    printf("  bf16 matrix peak     %8.1f GFLOP/s (%s)\n", p->bf16_matrix_gflops, p->bf16_unit);
    printf("  memory bandwidth     %8.2f GB/s (triad), %.2f GB/s (read-only)\n", p->mem_bw_gbs, p->mem_read_gbs);
    for (int i = 0; i < nf; i++) {
        printf("%s weights (%.2f GB)\n", f[i].dtype, f[i].weight_gb);
        printf("  prefill %4d tokens  %8.1f tok/s  %7.1f GFLOP/s = %5.1f%% of %s peak\n", T, f[i].prefill_tps,
               f[i].prefill_gflops, 100 * f[i].prefill_frac, f[i].prefill_ceiling);
        printf("  decode, 1 sequence   %8.2f tok/s  = %5.1f%% of the read-bandwidth bound (%.2f tok/s; %.1f%% of triad)\n",
               f[i].decode1_tps, 100 * f[i].decode1_frac, f[i].decode1_bound_tps, 100 * f[i].decode1_triad_frac);
        printf("  decode, 16 sequences %8.2f tok/s  = %5.2fx one sequence (%d steps)\n", f[i].decode16_tps,
               f[i].decode16_ratio, steps);
    }
    for (int i = 0; i < nv; i++) {
        printf("vision tower, %s weights (Qwen2.5-VL-3B shape)\n", vf[i].dtype);
        for (int s = 0; s < 2; s++) {
            printf("  %4dx%-4d            %8.3f img/s  %7.1f GFLOP/s = %5.1f%% of %s peak\n", vf[i].width[s],
                   vf[i].height[s], vf[i].images_per_s[s], vf[i].gflops[s], 100 * vf[i].frac[s], vf[i].ceiling);
        }
    }
    if (tok_mbs > 0) {
        printf("tokenizer (1 thread)  %8.2f MB/s of English text\n", tok_mbs);
    }
}

/* ---- caprl bench reward ------------------------------------------------------------------------------------ */

/* Five four-option questions per image in the CapRL format (with the saved "E) Can not answer" line). */
static void reward_bench_questions(int32_t image, caprl_qa_item *qa, char **texts) {
    static const char *const objects[] = {"car", "dog", "kite", "house", "boat", "bicycle", "lamp", "tree"};
    static const char *const ask_pre[] = {"What color is the ", "Where is the ", "How many people stand next to the ",
                                          "What is the ", "What is happening to the "};
    static const char *const ask_post[] = {" in the foreground?", " located?", "?", " made of?", "?"};
    static const char *const opts[5][6] = {
        {"Red", "Blue", "Green", "Black", "White", "Yellow"},
        {"On the left side", "In the center", "On the right side", "Behind the building", "Near the river",
         "On the roof"},
        {"One", "Two", "Three", "Four", "Five", "None"},
        {"Wood", "Metal", "Plastic", "Stone", "Glass", "Paper"},
        {"It is being repaired", "It is moving quickly", "It is standing still", "It is being painted",
         "It is covered in snow", "It is lit by a street lamp"}};
    for (int32_t q = 0; q < 5; q++) {
        char        ask[128], buf[1024];
        const char *obj = objects[(image + q) % 8];
        snprintf(ask, sizeof ask, "%s%s%s", ask_pre[q], obj, ask_post[q]);
        int32_t shift = (image * 3 + q) % 3;
        snprintf(buf, sizeof buf,
                 "%s\n   - A) %s\n   - B) %s\n   - C) %s\n   - D) %s\n   - E) Can not answer based on the caption", ask,
                 opts[q][shift], opts[q][shift + 1], opts[q][shift + 2], opts[q][shift + 3]);
        texts[q] = tool_xstrdup(buf);
        qa[q].question = texts[q];
        qa[q].gold = (char)('A' + (image + q) % 4);
    }
}

/* n captions of about T tokens each: consecutive windows of English-like text, cut at token boundaries. */
static caprl_status reward_bench_captions(const caprl_tokenizer *tok, int32_t n, int32_t T, char **caps,
                                          double *mean_tokens, caprl_error *err) {
    size_t   bytes = (size_t)n * (size_t)T * 8 + 4096;
    char    *text = make_english(bytes);
    size_t   len = strlen(text);
    int64_t  cap = (int64_t)len, got = 0;
    int32_t *ids = tool_xmalloc((size_t)cap * sizeof(int32_t));
    caprl_status st = caprl_tokenizer_encode(tok, text, len, false, ids, cap, &got, err);
    double   total = 0;
    for (int32_t c = 0; c < n && st == CAPRL_OK; c++) {
        size_t need = 0, out_cap = (size_t)T * 16 + 64;
        caps[c] = tool_xmalloc(out_cap);
        st = caprl_tokenizer_decode(tok, ids + (int64_t)c * T, T, true, caps[c], out_cap, &need, err);
        int64_t again = 0;
        if (st == CAPRL_OK) {
            st = caprl_tokenizer_encode(tok, caps[c], strlen(caps[c]), false, NULL, 0, &again, err);
        }
        total += (double)again;
    }
    *mean_tokens = n > 0 ? total / n : 0;
    free(ids);
    free(text);
    return st;
}

typedef struct reward_run {
    double  seconds;
    int64_t tokens;
} reward_run;

static caprl_status reward_bench_run(caprl_reader *r, const caprl_reward_item *items, int32_t n,
                                     const caprl_reward_params *p, caprl_reward_result *res, reward_run *out,
                                     caprl_error *err) {
    int64_t tok0 = caprl_reader_tokens_total(r);
    double  t0 = tool_now();
    caprl_status st = caprl_reward_score(r, items, n, p, res, err);
    out->seconds = tool_now() - t0;
    out->tokens = caprl_reader_tokens_total(r) - tok0;
    return st;
}

static int bench_reward(int argc, char **argv) {
    static const cmd_info info = {
        "bench reward",
        "caprl bench reward [--threads N] [--captions N] [--caption-tokens T] [--n-questions N] [--repeat R]"
        " [--dtype f32|bf16] [--tokenizer FILE] [--json] [--quick]",
        "The CapRL reward in expected mode with prefix-shared KV caches against a naive pass that runs every\n"
        "question's whole prompt, on a Qwen2.5-0.5B-shaped reader with random weights and the real Qwen tokenizer.",
        "Both runs score the same captions (English-like text of about --caption-tokens tokens) against the same\n"
        "draws of --n-questions questions (five four-option questions per image, shuffled, F appended). Reader\n"
        "tokens are every token run through the model (the cached run includes its one-time fixed prefix); times\n"
        "include tokenization (and the first cached run creating the KV cache). The two runs alternate --repeat\n"
        "times and each keeps its fastest time. The largest difference of the two runs' p(gold) is printed as a\n"
        "check. --quick: a 2-layer reader with the same vocabulary (smoke test)."};
    int32_t     threads = 0, n_cap = 2, T = 300, nq = 8, repeat = 2;
    bool        json = false, quick = false;
    const char *dtype_name = "bf16", *tok_path = "../shared/data/qwen-tokenizer/tokenizer.json";
    opt_spec    specs[] = {
        {"threads", OPT_INT, &threads, THREADS_HELP, 0, 1024, "N", 0},
        {"captions", OPT_INT, &n_cap, "captions scored by each run", 1, 4096, "N", 0},
        {"caption-tokens", OPT_INT, &T, "caption length in tokens", 1, 8192, "T", 0},
        {"n-questions", OPT_INT, &nq, "questions per caption", 1, 64, "N", 0},
        {"repeat", OPT_INT, &repeat, "alternating runs of each; the fastest counts", 1, 100, "R", 0},
        {"dtype", OPT_STRING, &dtype_name, "reader weights: f32 or bf16", 0, 0, "T", 0},
        {"tokenizer", OPT_STRING, &tok_path, "the Qwen tokenizer.json", 0, 0, "FILE", 0},
        {"json", OPT_FLAG, &json, "print the figures as one JSON object", 0, 0, NULL, 0},
        {"quick", OPT_FLAG, &quick, "2-layer reader (smoke test)", 0, 0, NULL, 0},
        {0},
    };
    int rc = opts_parse(&info, specs, argc, argv, NULL, 0, NULL);
    if (rc) {
        return rc < 0 ? EXIT_OK : rc;
    }
    int32_t dtype = strcmp(dtype_name, "f32") == 0    ? CAPRL_DTYPE_F32
                    : strcmp(dtype_name, "bf16") == 0 ? CAPRL_DTYPE_BF16
                                                      : -1;
    if (dtype < 0) {
        return tool_usage_error(info.name, "--dtype must be f32 or bf16");
    }
    caprl_text_config cfg = bench_config(false);
    if (quick) { /* the real vocabulary: the tokenizer needs it */
        cfg.hidden_size = 128;
        cfg.intermediate_size = 256;
        cfg.n_layers = 2;
        cfg.n_heads = 4;
        cfg.head_dim = 32;
    }
    caprl_error        err = {0};
    caprl_model_params mp = caprl_model_default_params();
    mp.n_threads = threads;
    caprl_model *m = NULL;
    fprintf(stderr, "bench reward: building a %s reader with random weights...\n", caprl_dtype_name(dtype));
    caprl_status st = caprl_model_init_random(&m, &cfg, dtype, 1, 0.02f, &mp, &err);
    if (st == CAPRL_OK) {
        st = caprl_model_load_tokenizer(m, tok_path, &err);
    }
    caprl_reader *r = NULL;
    if (st == CAPRL_OK) {
        caprl_reader_params rp = caprl_reader_default_params();
        rp.max_captions = n_cap < 16 ? n_cap : 16;
        rp.max_sequences = rp.max_captions * nq;
        st = caprl_reader_init(&r, m, &rp, &err);
    }
    caprl_qa_item      *qa = tool_xcalloc((size_t)n_cap * 5, sizeof *qa);
    char              **qtext = tool_xcalloc((size_t)n_cap * 5, sizeof *qtext);
    char              **caps = tool_xcalloc((size_t)n_cap, sizeof *caps);
    caprl_qa_image     *imgs = tool_xcalloc((size_t)n_cap, sizeof *imgs);
    caprl_reward_item  *items = tool_xcalloc((size_t)n_cap, sizeof *items);
    caprl_reward_result *res_c = tool_xcalloc((size_t)n_cap, sizeof *res_c);
    caprl_reward_result *res_n = tool_xcalloc((size_t)n_cap, sizeof *res_n);
    double              mean_tokens = 0, max_diff = 0;
    if (st == CAPRL_OK) {
        st = reward_bench_captions(caprl_model_tokenizer(m), n_cap, T, caps, &mean_tokens, &err);
    }
    for (int32_t i = 0; st == CAPRL_OK && i < n_cap; i++) {
        reward_bench_questions(i, qa + 5 * i, qtext + 5 * i);
        imgs[i].id = qtext[5 * i];
        imgs[i].qa = qa + 5 * i;
        imgs[i].n_qa = 5;
        items[i].caption = caps[i];
        items[i].qa = &imgs[i];
        items[i].stream_id = (uint64_t)i;
        items[i].caption_tokens = -1;
    }
    caprl_reward_params p = caprl_reward_default_params();
    p.mode = CAPRL_REWARD_EXPECTED;
    p.n_questions = nq;
    /* the runs alternate and each keeps its fastest time: a shared machine's load then hits both alike */
    reward_run cached = {1e30, 0}, naive = {1e30, 0};
    for (int32_t rep = 0; rep < repeat && st == CAPRL_OK; rep++) {
        reward_run run = {0};
        fprintf(stderr, "bench reward: expected mode, prefix-cached, %d captions x %d questions (run %d of %d)...\n",
                n_cap, nq, rep + 1, repeat);
        p.prefix_cache = true;
        for (int32_t i = 0; rep > 0 && i < n_cap; i++) {
            caprl_reward_result_clear(&res_c[i]);
        }
        st = reward_bench_run(r, items, n_cap, &p, res_c, &run, &err);
        cached.seconds = run.seconds < cached.seconds ? run.seconds : cached.seconds;
        cached.tokens = rep == 0 ? run.tokens : cached.tokens; /* later runs reuse the fixed prefix */
        if (st != CAPRL_OK) {
            break;
        }
        fprintf(stderr, "bench reward: expected mode, naive full prompts (run %d of %d)...\n", rep + 1, repeat);
        p.prefix_cache = false;
        for (int32_t i = 0; rep > 0 && i < n_cap; i++) {
            caprl_reward_result_clear(&res_n[i]);
        }
        st = reward_bench_run(r, items, n_cap, &p, res_n, &run, &err);
        naive.seconds = run.seconds < naive.seconds ? run.seconds : naive.seconds;
        naive.tokens = run.tokens;
    }
    for (int32_t i = 0; st == CAPRL_OK && i < n_cap; i++) {
        for (int32_t k = 0; k < nq; k++) {
            double d = fabs((double)res_c[i].questions[k].p_gold - (double)res_n[i].questions[k].p_gold);
            max_diff = d > max_diff ? d : max_diff;
        }
    }
    int32_t prefix = r ? caprl_reader_prefix_tokens(r) : 0, n_threads = m ? caprl_model_n_threads(m) : 0;
    for (int32_t i = 0; i < n_cap; i++) {
        caprl_reward_result_clear(&res_c[i]);
        caprl_reward_result_clear(&res_n[i]);
        free(caps[i]);
        for (int32_t q = 0; q < 5; q++) {
            free(qtext[5 * i + q]);
        }
    }
    free(qa);
    free(qtext);
    free(caps);
    free(imgs);
    free(items);
    free(res_c);
    free(res_n);
    caprl_reader_free(r);
    caprl_model_free(m);
    if (st != CAPRL_OK) {
        return tool_fail(info.name, st, err.msg);
    }
    double nqs = (double)n_cap * nq;
    double qps_c = nqs / cached.seconds, qps_n = nqs / naive.seconds;
    double tok_ratio = (double)naive.tokens / (double)cached.tokens, speed = qps_c / qps_n;
    /* in a long run the fixed prefix is spent once for thousands of captions */
    double tok_ratio_amortized = (double)naive.tokens / (double)(cached.tokens - prefix);
    if (json) {
        printf("{\"dtype\": \"%s\", \"threads\": %d, \"captions\": %d, \"caption_tokens\": %.1f, \"n_questions\": %d, "
               "\"repeat\": %d, \"prefix_tokens\": %d, \"cached_tokens\": %lld, \"naive_tokens\": %lld, "
               "\"token_ratio\": %.2f, \"token_ratio_prefix_amortized\": %.2f, \"cached_seconds\": %.3f, "
               "\"naive_seconds\": %.3f, \"cached_questions_per_s\": %.3f, \"naive_questions_per_s\": %.3f, "
               "\"speedup\": %.2f, \"max_p_gold_diff\": %.3g}\n",
               caprl_dtype_name(dtype), n_threads, n_cap, mean_tokens, nq, repeat, prefix, (long long)cached.tokens,
               (long long)naive.tokens, tok_ratio, tok_ratio_amortized, cached.seconds, naive.seconds, qps_c, qps_n,
               speed, max_diff);
    } else {
        printf("reward, expected mode: %s reader (Qwen2.5-0.5B shape%s), %d captions of %.0f tokens x %d questions\n",
               caprl_dtype_name(dtype), quick ? ", --quick: 2 layers" : "", n_cap, mean_tokens, nq);
        printf("  prefix-cached  %8lld reader tokens (fixed prefix %d, once)  %7.2f s  %7.3f questions/s\n",
               (long long)cached.tokens, prefix, cached.seconds, qps_c);
        printf("  naive          %8lld reader tokens                          %7.2f s  %7.3f questions/s\n",
               (long long)naive.tokens, naive.seconds, qps_n);
        printf("  ratio          %8.2fx fewer tokens (%.2fx with the prefix amortized)  %7.2fx more questions/s"
               "  (max |p_gold diff| %.2g)\n",
               tok_ratio, tok_ratio_amortized, speed, max_diff);
    }
    return EXIT_OK;
}

/* ---- caprl bench train --------------------------------------------------------------------------------------- */

typedef struct train_figures {
    const char *precision;
    double      best_s, mean_s, phase_s[3]; /* the fastest timed step, the mean, the fastest's forward/backward/AdamW */
    double      tps, tps_mean, gflops, frac;
    const char *ceiling;
    double      ceiling_gflops;
    double      loss, grad_norm; /* of the first step: a random model's loss is near ln(vocab) */
    size_t      planned, optimizer, act_off, act_on; /* activations with recompute off and on */
    int64_t     rss, rss_growth; /* resident bytes after the timed steps, and gained over them; -1 when unknown */
} train_figures;

/* Resident bytes (/proc/self/statm), or -1 where that file does not exist. */
static int64_t resident_bytes(void) {
    FILE *f = fopen("/proc/self/statm", "r");
    long  size = 0, resident = -1;
    if (f) {
        if (fscanf(f, "%ld %ld", &size, &resident) != 2) {
            resident = -1;
        }
        fclose(f);
    }
    long page = sysconf(_SC_PAGESIZE);
    return resident < 0 || page <= 0 ? -1 : (int64_t)resident * page;
}

/* Matmul parameters: every projection of every layer and the lm_head (tied or not: it is a matmul either way). */
static double matmul_params(const caprl_text_config *c) {
    double C = c->hidden_size, F = c->intermediate_size, V = c->vocab_size, D = c->head_dim;
    double qd = c->n_heads * D, kvd = c->n_kv_heads * D;
    return c->n_layers * (C * qd + 2 * C * kvd + qd * C + 3 * C * F) + V * C;
}

/* One step's FLOPs for n_seqs sequences of T tokens: the forward (2 x matmul params x tokens + causal attention)
 * and the backward (twice the forward), i.e. 6 x matmul params x tokens + 3 x the forward's attention.
 * Recomputation is not counted: it is overhead, not the model's work. */
static double train_step_flops(const caprl_text_config *c, int32_t T, int32_t n_seqs) {
    return 3.0 * prefill_flops(c, T) * n_seqs;
}

typedef struct train_bench_batch {
    int32_t          *tokens, *target, *seq_start;
    float            *logp, *dlogp;
    caprl_train_batch b;
} train_bench_batch;

/* n_seqs sequences of T pseudo-random tokens packed back to back. Every position is scored (the next token; at a
 * sequence's end a token of its own) with the mean-loss coefficient, so the lm_head runs on every row. */
static void train_bench_batch_init(train_bench_batch *tb, int32_t vocab, int32_t T, int32_t n_seqs) {
    int32_t n = T * n_seqs;
    tb->tokens = tool_xmalloc((size_t)n * sizeof(int32_t));
    tb->target = tool_xmalloc((size_t)n * sizeof(int32_t));
    tb->seq_start = tool_xmalloc((size_t)(n_seqs + 1) * sizeof(int32_t));
    tb->logp = tool_xmalloc((size_t)n * sizeof(float));
    tb->dlogp = tool_xmalloc((size_t)n * sizeof(float));
    uint32_t x = 2463534242u;
    for (int32_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        tb->tokens[i] = (int32_t)(x % (uint32_t)vocab);
        tb->dlogp[i] = -1.0f / (float)n;
    }
    for (int32_t i = 0; i < n; i++) {
        tb->target[i] = (i + 1) % T ? tb->tokens[i + 1] : (int32_t)(((int64_t)tb->tokens[i] * 7 + 3) % vocab);
    }
    for (int32_t s = 0; s <= n_seqs; s++) {
        tb->seq_start[s] = s * T;
    }
    caprl_train_batch b = {.n_tokens = n, .tokens = tb->tokens, .n_seqs = n_seqs, .seq_start = tb->seq_start,
                           .target = tb->target};
    tb->b = b;
}

static void train_bench_batch_free(train_bench_batch *tb) {
    free(tb->tokens);
    free(tb->target);
    free(tb->seq_start);
    free(tb->logp);
    free(tb->dlogp);
}

/* One optimizer step: forward, backward and AdamW, each phase timed into sec[0..3). */
static caprl_status train_bench_step(caprl_trainer *tr, caprl_adamw *opt, train_bench_batch *tb, double sec[3],
                                     double *loss, float *grad_norm, caprl_error *err) {
    caprl_step_info info = {0};
    double          t0 = tool_now();
    caprl_status    st = caprl_trainer_forward(tr, &tb->b, 1.0f, tb->logp, NULL, err);
    double          t1 = tool_now();
    if (st == CAPRL_OK) {
        st = caprl_trainer_backward(tr, tb->dlogp, err);
    }
    double t2 = tool_now();
    if (st == CAPRL_OK) {
        st = caprl_adamw_step(opt, 1.0f, &info, err);
    }
    sec[0] = t1 - t0;
    sec[1] = t2 - t1;
    sec[2] = tool_now() - t2;
    double sum = 0.0;
    for (int32_t i = 0; i < tb->b.n_tokens; i++) {
        sum -= (double)tb->logp[i];
    }
    *loss = sum / tb->b.n_tokens;
    *grad_norm = info.grad_norm;
    return st;
}

/* The activation bytes a trainer on m plans with the given recompute setting (a trainer made only to be asked;
 * the model keeps its weights, now in the freed trainer's block). */
static caprl_status recompute_activation_bytes(caprl_model *m, const caprl_trainer_params *tp, bool recompute,
                                               size_t *bytes, caprl_error *err) {
    caprl_trainer_params p = *tp;
    p.recompute = recompute;
    caprl_trainer *tr = NULL;
    caprl_status   st = caprl_trainer_init(&tr, m, NULL, &p, err);
    *bytes = st == CAPRL_OK ? caprl_trainer_activation_bytes(tr) : 0;
    caprl_trainer_free(tr);
    return st;
}

/* Builds the random model in the precision's natural dtype (f32 weights, or bf16 as a bf16 checkpoint stores
 * them), plans a trainer, runs one warm-up step (page faults, first touches) and `steps` timed ones. */
static caprl_status bench_train_run(const caprl_text_config *cfg, int32_t precision, int32_t threads, int32_t T,
                                    int32_t n_seqs, int32_t steps, bool recompute, int32_t logits_chunk,
                                    train_figures *f, caprl_error *err) {
    const char *name = precision == CAPRL_PRECISION_BF16 ? "bf16" : "f32";
    memset(f, 0, sizeof *f);
    f->precision = name;
    caprl_model_params mp = caprl_model_default_params();
    mp.n_threads = threads;
    caprl_model *m = NULL;
    fprintf(stderr, "bench train: building the %s model with random weights...\n", name);
    caprl_status st = caprl_model_init_random(
        &m, cfg, precision == CAPRL_PRECISION_BF16 ? CAPRL_DTYPE_BF16 : CAPRL_DTYPE_F32, 1, 0.02f, &mp, err);
    if (st != CAPRL_OK) {
        return st;
    }
    caprl_trainer_params tp = caprl_trainer_default_params();
    tp.max_tokens = T * n_seqs;
    tp.max_seqs = n_seqs;
    tp.precision = precision;
    tp.recompute = recompute;
    tp.logits_chunk = logits_chunk > 0 ? logits_chunk : tp.logits_chunk;
    size_t other = 0;
    st = recompute_activation_bytes(m, &tp, !recompute, &other, err);
    caprl_trainer *tr = NULL;
    caprl_adamw   *opt = NULL;
    if (st == CAPRL_OK) {
        st = caprl_trainer_init(&tr, m, NULL, &tp, err);
    }
    caprl_adamw_params ap = caprl_adamw_default_params();
    ap.total_steps = steps + 1;
    if (st == CAPRL_OK) {
        st = caprl_adamw_init(&opt, tr, &ap, err);
    }
    train_bench_batch tb;
    train_bench_batch_init(&tb, cfg->vocab_size, T, n_seqs);
    if (st == CAPRL_OK) {
        f->planned = caprl_trainer_bytes(tr);
        f->act_off = recompute ? other : caprl_trainer_activation_bytes(tr);
        f->act_on = recompute ? caprl_trainer_activation_bytes(tr) : other;
        for (int32_t i = 0; i < caprl_trainer_n_tensors(tr); i++) {
            f->optimizer += 2 * sizeof(float) * (size_t)caprl_trainer_tensor(tr, i)->numel; /* AdamW m and v */
        }
        fprintf(stderr, "bench train: %s, %d x %d tokens, %.2f GB planned + %.2f GB AdamW moments; warm-up step...\n",
                name, n_seqs, T, (double)f->planned / 1e9, (double)f->optimizer / 1e9);
    }
    double sec[3];
    float  gn = 0.0f;
    if (st == CAPRL_OK) {
        st = train_bench_step(tr, opt, &tb, sec, &f->loss, &gn, err);
        f->grad_norm = (double)gn;
    }
    int64_t rss0 = resident_bytes();
    f->best_s = 1e30;
    for (int32_t s = 0; s < steps && st == CAPRL_OK; s++) {
        fprintf(stderr, "bench train: %s step %d of %d...\n", name, s + 1, steps);
        double loss = 0.0;
        st = train_bench_step(tr, opt, &tb, sec, &loss, &gn, err);
        double dt = sec[0] + sec[1] + sec[2];
        f->mean_s += dt / steps;
        if (dt < f->best_s) {
            f->best_s = dt;
            memcpy(f->phase_s, sec, sizeof sec);
        }
    }
    int64_t rss1 = resident_bytes();
    f->rss = rss1;
    f->rss_growth = rss0 < 0 || rss1 < 0 ? -1 : rss1 - rss0;
    int32_t n_tokens = T * n_seqs;
    f->tps = n_tokens / f->best_s;
    f->tps_mean = n_tokens / f->mean_s;
    f->gflops = train_step_flops(cfg, T, n_seqs) / f->best_s / 1e9;
    train_bench_batch_free(&tb);
    caprl_adamw_free(opt);
    caprl_trainer_free(tr);
    caprl_model_free(m);
    return st;
}

static void print_train_json(const caprl_machine_peaks *p, const double probes[2], const caprl_text_config *c,
                             int32_t T, int32_t n_seqs, int32_t steps, bool recompute, const train_figures *f, int nf) {
    printf("{\"threads\": %d, \"cpu\": \"%s\", \"fp32_fma_gflops\": %.1f, \"fp32_fma_gflops_probes\": [%.1f, "
           "%.1f], \"bf16_matrix_gflops\": %.1f, \"bf16_unit\": \"%s\", \"mem_bw_gbs\": %.2f, \"hidden\": %d, "
           "\"layers\": %d, \"vocab\": %d, \"matmul_params\": %.0f, \"seq_len\": %d, \"seqs\": %d, "
           "\"tokens_per_step\": %d, \"steps\": %d, \"recompute\": %s, \"flops_per_step\": %.10g, \"runs\": [",
           p->n_threads, p->cpu_features, p->fp32_fma_gflops, probes[0], probes[1], p->bf16_matrix_gflops,
           p->bf16_unit, p->mem_bw_gbs, c->hidden_size, c->n_layers, c->vocab_size, matmul_params(c), T, n_seqs, T * n_seqs, steps,
           recompute ? "true" : "false", train_step_flops(c, T, n_seqs));
    for (int i = 0; i < nf; i++) {
        printf("%s{\"precision\": \"%s\", \"tokens_per_s\": %.6g, \"tokens_per_s_mean\": %.6g, \"step_seconds\": %.6f, "
               "\"forward_seconds\": %.6f, \"backward_seconds\": %.6f, \"optimizer_seconds\": %.6f, \"gflops\": %.6g, "
               "\"ceiling\": \"%s\", \"ceiling_gflops\": %.6g, \"fraction\": %.6g, \"loss\": %.6f, "
               "\"grad_norm\": %.4g, \"planned_bytes\": %zu, \"optimizer_bytes\": %zu, \"step_peak_bytes\": %zu, "
               "\"activation_bytes\": %zu, \"activation_bytes_recompute\": %zu, \"recompute_saved_bytes\": %zu, "
               "\"resident_bytes\": %lld, \"rss_growth_bytes\": %lld}",
               i ? ", " : "", f[i].precision, f[i].tps, f[i].tps_mean, f[i].best_s, f[i].phase_s[0], f[i].phase_s[1],
               f[i].phase_s[2], f[i].gflops, f[i].ceiling, f[i].ceiling_gflops, f[i].frac, f[i].loss, f[i].grad_norm,
               f[i].planned, f[i].optimizer, f[i].planned + f[i].optimizer, f[i].act_off, f[i].act_on,
               f[i].act_off - f[i].act_on, (long long)f[i].rss, (long long)f[i].rss_growth);
    }
    printf("]}\n");
}

static void print_train_table(const caprl_machine_peaks *p, const double probes[2], const caprl_text_config *c,
                              int32_t T, int32_t n_seqs, int32_t steps, bool recompute, const train_figures *f,
                              int nf) {
    printf("machine (%d threads; %s; each peak the larger of two probes, before and after)\n", p->n_threads,
           p->cpu_features);
    printf("  fp32 FMA peak        %8.1f GFLOP/s (probes %.1f, %.1f)\n", p->fp32_fma_gflops, probes[0], probes[1]);
    printf("  bf16 matrix peak     %8.1f GFLOP/s (%s)\n", p->bf16_matrix_gflops, p->bf16_unit);
    printf("model: hidden %d, %d layers, vocab %d, %.1fM matmul parameters; %d x %d tokens per step, recompute %s\n",
           c->hidden_size, c->n_layers, c->vocab_size, matmul_params(c) / 1e6, n_seqs, T, recompute ? "on" : "off");
    for (int i = 0; i < nf; i++) {
        printf("%s training (fastest of %d steps after a warm-up)\n", f[i].precision, steps);
        printf("  step                 %8.1f tok/s  %7.1f GFLOP/s = %5.1f%% of %s peak (mean %.1f tok/s)\n", f[i].tps,
               f[i].gflops, 100 * f[i].frac, f[i].ceiling, f[i].tps_mean);
        printf("  phases               forward %.2f s, backward %.2f s, AdamW %.2f s\n", f[i].phase_s[0],
               f[i].phase_s[1], f[i].phase_s[2]);
        printf("  memory               %.2f GB planned (params, grads%s, activations %.2f GB) + %.2f GB AdamW"
               " = %.2f GB\n",
               (double)f[i].planned / 1e9, strcmp(f[i].precision, "bf16") == 0 ? ", bf16 shadow" : "",
               (double)(recompute ? f[i].act_on : f[i].act_off) / 1e9, (double)f[i].optimizer / 1e9,
               (double)(f[i].planned + f[i].optimizer) / 1e9);
        printf("  recompute            activations %.3f GB -> %.3f GB (saves %.3f GB)\n", (double)f[i].act_off / 1e9,
               (double)f[i].act_on / 1e9, (double)(f[i].act_off - f[i].act_on) / 1e9);
        if (f[i].rss >= 0) {
            printf("  resident             %.2f GB after the timed steps, %+.1f MB over them\n", (double)f[i].rss / 1e9,
                   (double)f[i].rss_growth / 1e6);
        }
    }
    if (p->bf16_matrix_gflops <= 0 && strcmp(f[nf - 1].precision, "bf16") == 0) {
        printf("note: no bf16 matrix unit here: bf16 operands are widened to f32, so bf16 is measured against the fp32 "
               "FMA peak\n");
    }
}

static int bench_train(int argc, char **argv) {
    static const cmd_info info = {
        "bench train",
        "caprl bench train [--threads N] [--precision f32|bf16|both] [--seq-len T] [--seqs N] [--steps N]"
        " [--recompute] [--logits-chunk N] [--json] [--quick]",
        "Training speed: forward + backward + AdamW steps of a Qwen2.5-0.5B-shaped model with random weights, in f32\n"
        "and in bf16 mixed precision, as a fraction of the machine's ceilings, with the step's planned memory.",
        "Each step trains on --seqs packed sequences of --seq-len random tokens, every position scored. FLOPs per\n"
        "step = 6 x matmul parameters (lm_head included) x tokens + 3 x the forward's causal attention (forward and\n"
        "backward; recomputation is not counted). f32 is measured against the fp32 FMA peak; bf16 against the bf16\n"
        "matrix unit where the CPU has one, else against the fp32 FMA peak (its operands are widened to f32); each\n"
        "ceiling is the larger of two probes, before and after the runs. One warm-up step, then the fastest of\n"
        "--steps counts. Memory: everything the trainer plans at init (parameters, gradients, bf16 shadow,\n"
        "activations) plus the AdamW moments; nothing is allocated inside a step. The activations are also planned\n"
        "with recompute the other way, for the memory it saves.\n"
        "--quick: a 2-layer model with an 8192 vocabulary, 2 x 64 tokens, one timed step (a smoke test, not a\n"
        "measurement)."};
    int32_t     threads = 0, T = 512, n_seqs = 0, steps = 2, logits_chunk = 0;
    bool        json = false, quick = false, recompute = false;
    const char *precisions = "both";
    opt_spec    specs[] = {
        {"threads", OPT_INT, &threads, THREADS_HELP, 0, 1024, "N", 0},
        {"precision", OPT_STRING, &precisions, "f32, bf16 or both", 0, 0, "P", 0},
        {"seq-len", OPT_INT, &T, "tokens per sequence", 2, 32768, "T", 0},
        {"seqs", OPT_INT, &n_seqs, "sequences per step, one micro-batch (0: 1, with --quick 2)", 0, 64, "N", 0},
        {"steps", OPT_INT, &steps, "timed steps after the warm-up", 1, 1000, "N", 0},
        {"recompute", OPT_FLAG, &recompute, "time the steps with activation recomputation", 0, 0, NULL, 0},
        {"logits-chunk", OPT_INT, &logits_chunk, "rows of logits at once (0: the trainer's default)", 0, 1 << 20, "N",
         0},
        {"json", OPT_FLAG, &json, "print the figures as one JSON object", 0, 0, NULL, 0},
        {"quick", OPT_FLAG, &quick, "tiny model, short sequences (smoke test)", 0, 0, NULL, 0},
        {0},
    };
    int rc = opts_parse(&info, specs, argc, argv, NULL, 0, NULL);
    if (rc) {
        return rc < 0 ? EXIT_OK : rc;
    }
    bool do_f32 = strcmp(precisions, "f32") == 0 || strcmp(precisions, "both") == 0;
    bool do_bf16 = strcmp(precisions, "bf16") == 0 || strcmp(precisions, "both") == 0;
    if (!do_f32 && !do_bf16) {
        return tool_usage_error(info.name, "--precision must be f32, bf16 or both, got '%s'", precisions);
    }
    if (quick) {
        T = T > 64 ? 64 : T;
        steps = steps > 1 ? 1 : steps;
    }
    /* one 512-token sequence keeps a full step near a minute on 2 cores; the smoke test packs two */
    n_seqs = n_seqs > 0 ? n_seqs : quick ? 2 : 1;
    caprl_text_config cfg = bench_config(quick);
    caprl_machine_peaks peaks;
    caprl_error         err = {0};
    fprintf(stderr, "bench train: measuring the machine's ceilings...\n");
    caprl_status  st = caprl_measure_peaks(threads, &peaks, &err);
    train_figures figs[2];
    int           nf = 0;
    if (st == CAPRL_OK && do_f32) {
        st = bench_train_run(&cfg, CAPRL_PRECISION_F32, threads, T, n_seqs, steps, recompute, logits_chunk,
                             &figs[nf++], &err);
    }
    if (st == CAPRL_OK && do_bf16) {
        st = bench_train_run(&cfg, CAPRL_PRECISION_BF16, threads, T, n_seqs, steps, recompute, logits_chunk,
                             &figs[nf++], &err);
    }
    double probes[2] = {0, 0};
    if (st == CAPRL_OK) {
        st = probe_again(threads, &peaks, probes, "bench train", &err);
    }
    if (st != CAPRL_OK) {
        return tool_fail(info.name, st, err.msg);
    }
    for (int i = 0; i < nf; i++) {
        figs[i].ceiling = ceiling_of(&peaks, strcmp(figs[i].precision, "bf16") == 0, &figs[i].ceiling_gflops);
        figs[i].frac = figs[i].gflops / figs[i].ceiling_gflops;
    }
    if (json) {
        print_train_json(&peaks, probes, &cfg, T, n_seqs, steps, recompute, figs, nf);
    } else {
        print_train_table(&peaks, probes, &cfg, T, n_seqs, steps, recompute, figs, nf);
    }
    return EXIT_OK;
}

int cmd_bench(int argc, char **argv) {
    static const cmd_info info = {
        "bench", "caprl bench [--threads N] [--json] [--quick] [--dtype f32|bf16|both] [--tokenizer FILE]",
        "Measure the machine's ceilings, then prefill and decode speed of a Qwen2.5-0.5B-shaped model with random\n"
        "weights (hidden 896, 24 layers, 14 heads, 2 KV heads, FFN 4864, vocab 151936, tied) in f32 and bf16.",
        "Prefill FLOPs = 2 x matmul parameters (lm_head included) x tokens + causal attention; every position's\n"
        "logits are computed. Decode bound = read bandwidth / (weight bytes + KV bytes read per token).\n"
        "Each ceiling is the larger of two probes, before and after the runs.\n"
        "The vision figure encodes one 448x448 and one 1024x768 image (1036x756 after smart_resize) with a\n"
        "Qwen2.5-VL-3B-shaped tower (32 blocks, width 1280, 16 heads, window 112); --no-vision skips it.\n"
        "--quick uses tiny models (a smoke test, not a measurement).\n"
        "caprl bench reward [options]: the CapRL reward with prefix-shared KV caches against naive full-prompt\n"
        "scoring (caprl bench reward --help).\n"
        "caprl bench train [options]: forward + backward + AdamW training speed in f32 and bf16 mixed precision, with\n"
        "the step's planned memory (caprl bench train --help).\n"
        "caprl bench gemm [options]: each linear layer's matmul of these models on its own, forward and backward\n"
        "(caprl bench gemm --help).\n"
        "caprl bench attn [options]: the attention kernels of these models on their own (caprl bench attn --help)."};
    int32_t     threads = 0, T = 512, steps = 16;
    bool        json = false, quick = false, vision = true;
    const char *dtypes = "both", *tok_path = NULL;
    opt_spec    specs[] = {
        {"threads", OPT_INT, &threads, THREADS_HELP, 0, 1024, "N", 0},
        {"json", OPT_FLAG, &json, "print all figures as one JSON object", 0, 0, NULL, 0},
        {"quick", OPT_FLAG, &quick, "tiny model, short runs (smoke test)", 0, 0, NULL, 0},
        {"dtype", OPT_STRING, &dtypes, "weights to measure: f32, bf16 or both", 0, 0, "T", 0},
        {"prompt-tokens", OPT_INT, &T, "prefill length", 1, 8192, "N", 0},
        {"decode-steps", OPT_INT, &steps, "decode steps per measurement", 1, 4096, "N", 0},
        {"tokenizer", OPT_STRING, &tok_path, "tokenizer.json for the tokenizer throughput figure", 0, 0, "FILE", 0},
        {"vision", OPT_FLAG, &vision, "measure the Qwen2.5-VL-3B-shaped vision tower (a few minutes)", 0, 0, NULL, 0},
        {0},
    };
    if (argc >= 2 && strcmp(argv[1], "reward") == 0) {
        return bench_reward(argc - 1, argv + 1);
    }
    if (argc >= 2 && strcmp(argv[1], "train") == 0) {
        return bench_train(argc - 1, argv + 1);
    }
    if (argc >= 2 && strcmp(argv[1], "gemm") == 0) {
        return cmd_bench_gemm(argc - 1, argv + 1);
    }
    if (argc >= 2 && strcmp(argv[1], "attn") == 0) {
        return cmd_bench_attn(argc - 1, argv + 1);
    }
    int rc = opts_parse(&info, specs, argc, argv, NULL, 0, NULL);
    if (rc) {
        return rc < 0 ? EXIT_OK : rc;
    }
    bool do_f32 = strcmp(dtypes, "f32") == 0 || strcmp(dtypes, "both") == 0;
    bool do_bf16 = strcmp(dtypes, "bf16") == 0 || strcmp(dtypes, "both") == 0;
    if (!do_f32 && !do_bf16) {
        return tool_usage_error(info.name, "--dtype must be f32, bf16 or both");
    }
    if (quick) {
        T = T > 64 ? 64 : T;
        steps = steps > 4 ? 4 : steps;
    }
    caprl_machine_peaks peaks;
    caprl_error         err = {0};
    fprintf(stderr, "bench: measuring the machine's ceilings...\n");
    caprl_status st = caprl_measure_peaks(threads, &peaks, &err);
    model_figures figs[2];
    int           nf = 0;
    caprl_text_config cfg = bench_config(quick);
    if (st == CAPRL_OK && do_f32) {
        st = bench_model(&cfg, CAPRL_DTYPE_F32, threads, T, steps, &figs[nf++], &err);
    }
    if (st == CAPRL_OK && do_bf16) {
        st = bench_model(&cfg, CAPRL_DTYPE_BF16, threads, T, steps, &figs[nf++], &err);
    }
    vision_figures vfigs[2];
    int            nv = 0;
    caprl_vision_config vcfg = vision_bench_config(quick);
    if (st == CAPRL_OK && vision && do_f32) {
        st = bench_vision(&vcfg, CAPRL_DTYPE_F32, threads, &vfigs[nv++], &err);
    }
    if (st == CAPRL_OK && vision && do_bf16) {
        st = bench_vision(&vcfg, CAPRL_DTYPE_BF16, threads, &vfigs[nv++], &err);
    }
    double tok_mbs = 0;
    if (st == CAPRL_OK && tok_path) {
        fprintf(stderr, "bench: tokenizer throughput...\n");
        tok_mbs = bench_tokenizer(tok_path, &err, &st);
    }
    if (st == CAPRL_OK) {
        st = probe_again(threads, &peaks, NULL, "bench", &err);
    }
    if (st != CAPRL_OK) {
        return tool_fail(info.name, st, err.msg);
    }
    for (int i = 0; i < nf; i++) {
        model_fractions(&peaks, &figs[i]);
    }
    for (int i = 0; i < nv; i++) {
        vision_fractions(&peaks, &vfigs[i]);
    }
    if (json) {
        print_json(&peaks, figs, nf, vfigs, nv, tok_mbs, T, steps);
    } else {
        print_table(&peaks, figs, nf, vfigs, nv, tok_mbs, T, steps);
    }
    return EXIT_OK;
}
