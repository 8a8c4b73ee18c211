/* Sampler: each logits processor against hand-computed values, HF order, and the multinomial draw against its
 * distribution. */
#include "caprl/sampler.h"
#include "caprl_test.h"

static caprl_sampler *make(int32_t V, caprl_sampling_params p) {
    caprl_sampler *s = NULL;
    caprl_error    err = {0};
    CHECK_OK(caprl_sampler_init(&s, V, &p, &err), &err);
    return s;
}

static void test_greedy_and_penalty(void) {
    caprl_sampling_params p = caprl_sampling_default_params();
    p.do_sample = false;
    p.repetition_penalty = 2.0f;
    caprl_sampler *s = make(5, p);
    /* logits: id 1 is the max (3.0); it was seen, so 3.0/2 = 1.5 < id 2's 2.0 -> argmax 2.
     * id 3 negative (-1) seen twice: penalised once to -2. */
    float   logits[5] = {0.5f, 3.0f, 2.0f, -1.0f, 1.9f};
    int32_t hist[3] = {1, 3, 3};
    CHECK_EQ_I64(caprl_sampler_sample(s, logits, hist, 3, 0, 0), 2);
    /* with id 2 also seen: 2.0/2 = 1.0 -> id 4 (1.9) wins */
    int32_t hist2[4] = {1, 3, 3, 2};
    CHECK_EQ_I64(caprl_sampler_sample(s, logits, hist2, 4, 0, 0), 4);
    /* the first maximum wins ties, as torch.argmax does */
    float tie[5] = {1.0f, 7.0f, 7.0f, 0.0f, 0.0f};
    CHECK_EQ_I64(caprl_sampler_sample(s, tie, NULL, 0, 0, 0), 1);
    caprl_sampler_free(s);
}

static void test_processed_distribution(void) {
    /* temperature 0.5, top-k 3 on logits [1, 2, 3, 2, 0]: k-th (3rd) largest value is 2, ties kept -> ids 1,2,3.
     * probs over {1,2,3} of logits/0.5 = {4, 6, 4}: e^4, e^6, e^4 normalised. */
    caprl_sampling_params p = caprl_sampling_default_params();
    p.temperature = 0.5f;
    p.top_k = 3;
    caprl_sampler *s = make(5, p);
    float          logits[5] = {1.0f, 2.0f, 3.0f, 2.0f, 0.0f};
    (void)caprl_sampler_sample(s, logits, NULL, 0, 0, 0);
    const float *pr = caprl_sampler_probs(s);
    double       z = 2 * exp(4.0) + exp(6.0);
    CHECK_NEAR(pr[0], 0.0, 0, 0);
    CHECK_NEAR(pr[1], exp(4.0) / z, 1e-6, 1e-7);
    CHECK_NEAR(pr[2], exp(6.0) / z, 1e-6, 1e-7);
    CHECK_NEAR(pr[3], exp(4.0) / z, 1e-6, 1e-7);
    CHECK_NEAR(pr[4], 0.0, 0, 0);
    caprl_sampler_free(s);

    /* top-p 0.7 on probabilities {0.5, 0.3, 0.15, 0.05}: ascending cumsum 0.05, 0.2, 0.5, 1.0; removed where
     * cumsum <= 0.3 -> ids with 0.05 and 0.15 removed; kept {0.5, 0.3} renormalised to 0.625/0.375. */
    p = caprl_sampling_default_params();
    p.top_p = 0.7f;
    s = make(4, p);
    float lg[4] = {logf(0.5f), logf(0.3f), logf(0.15f), logf(0.05f)};
    (void)caprl_sampler_sample(s, lg, NULL, 0, 0, 0);
    pr = caprl_sampler_probs(s);
    CHECK_NEAR(pr[0], 0.625, 1e-5, 1e-6);
    CHECK_NEAR(pr[1], 0.375, 1e-5, 1e-6);
    CHECK(pr[2] == 0.0f && pr[3] == 0.0f);
    caprl_sampler_free(s);

    /* top-p small keeps only the most likely token */
    p.top_p = 0.01f;
    s = make(4, p);
    for (int i = 0; i < 20; i++) {
        CHECK_EQ_I64(caprl_sampler_sample(s, lg, NULL, 0, (uint64_t)i, 0), 0);
    }
    caprl_sampler_free(s);

    /* top-p over a large vocabulary exercises the pre-filter of tiny probabilities: compare with a direct
     * computation of the kept set */
    enum { V = 5000 };
    static float big[V];
    for (int i = 0; i < V; i++) {
        big[i] = (float)((i * 7919) % 1000) / 100.0f;
    }
    p = caprl_sampling_default_params();
    p.top_p = 0.9f;
    s = make(V, p);
    (void)caprl_sampler_sample(s, big, NULL, 0, 3, 0);
    pr = caprl_sampler_probs(s);
    /* reference: sort descending, keep the smallest prefix whose mass reaches > 0.9 complement rule */
    static int   order[V];
    static double prob[V];
    double       mx = 0, tot = 0;
    for (int i = 0; i < V; i++) {
        order[i] = i;
        mx = fmax(mx, big[i]);
    }
    for (int i = 0; i < V; i++) {
        prob[i] = exp((double)big[i] - mx);
        tot += prob[i];
    }
    for (int i = 1; i < V; i++) { /* insertion sort ascending by logit, ties by id */
        int v = order[i], j = i - 1;
        while (j >= 0 && (big[order[j]] > big[v] || (big[order[j]] == big[v] && order[j] > v))) {
            order[j + 1] = order[j];
            j--;
        }
        order[j + 1] = v;
    }
    double cum = 0;
    int    n_removed = 0, n_kept_got = 0;
    for (int i = 0; i < V - 1; i++) {
        cum += prob[order[i]] / tot;
        if (cum <= 1.0 - 0.9) {
            n_removed++;
        } else {
            break;
        }
    }
    for (int i = 0; i < V; i++) {
        n_kept_got += pr[i] > 0.0f;
    }
    CHECK_EQ_I64(n_kept_got, V - n_removed);
    for (int i = 0; i < n_removed; i++) {
        CHECK(pr[order[i]] == 0.0f);
    }
    caprl_sampler_free(s);
}

static void test_draw_distribution_and_determinism(void) {
    caprl_sampling_params p = caprl_sampling_default_params();
    p.seed = 1234;
    caprl_sampler *s = make(4, p);
    float          lg[4] = {logf(0.1f), logf(0.2f), logf(0.3f), logf(0.4f)};
    int            counts[4] = {0};
    enum { N = 40000 };
    for (int i = 0; i < N; i++) {
        int32_t t = caprl_sampler_sample(s, lg, NULL, 0, (uint64_t)i, 7);
        CHECK(t >= 0 && t < 4);
        counts[t]++;
        /* the same (seed, stream, step) always gives the same token */
        if (i < 100) {
            CHECK_EQ_I64(caprl_sampler_sample(s, lg, NULL, 0, (uint64_t)i, 7), t);
        }
    }
    double expect[4] = {0.1, 0.2, 0.3, 0.4}, chi2 = 0;
    for (int k = 0; k < 4; k++) {
        double e = expect[k] * N;
        chi2 += (counts[k] - e) * (counts[k] - e) / e;
    }
    CHECK_MSG(chi2 < 16.27, "chi2 %.2f (3 dof, p = 0.001 critical value 16.27)", chi2);
    caprl_sampler_free(s);

    caprl_error bad = {0};
    caprl_sampler *none = NULL;
    p.top_p = -0.1f;
    CHECK(caprl_sampler_init(&none, 4, &p, &bad) == CAPRL_ERR_INVALID_ARG);
    p.top_p = 1.5f;
    CHECK(caprl_sampler_init(&none, 4, &p, &bad) == CAPRL_ERR_INVALID_ARG);
    p.top_p = 1.0f;
    p.temperature = -1.0f;
    CHECK(caprl_sampler_init(&none, 4, &p, &bad) == CAPRL_ERR_INVALID_ARG);
    CHECK(strstr(bad.msg, "temperature") != NULL);
    p.temperature = 0.0f;
    CHECK(caprl_sampler_init(&none, 4, &p, &bad) == CAPRL_ERR_INVALID_ARG);
    p.temperature = INFINITY;
    CHECK(caprl_sampler_init(&none, 4, &p, &bad) == CAPRL_ERR_INVALID_ARG);
    /* greedy decoding ignores the temperature: a generation_config with do_sample false and temperature 0 runs */
    p.do_sample = false;
    p.temperature = 0.0f;
    const float gl[4] = {0.1f, 0.7f, 0.3f, 0.7f};
    s = make(4, p);
    CHECK_EQ_I64(caprl_sampler_sample(s, gl, NULL, 0, 0, 0), 1); /* first maximum */
    caprl_sampler_free(s);
}

/* transformers' TopPLogitsWarper at the boundary: ascending cumulative probabilities (f32) <= 1 - top_p are
 * removed, 1 - top_p taken from the decimal written. Five equal logits have cumulative 0.2, 0.4, ... (0.2f each
 * step): top_p 0.8 removes the first (0.2 <= 0.2) and keeps 4, top_p 0.6 keeps 3, 0.5 keeps 3, 0.9 keeps 5, and 0
 * keeps only one (ties: the lowest ids go first in the ascending order, so the highest id stays). */
static void test_top_p_ties(void) {
    const float  eq[5] = {0.5f, 0.5f, 0.5f, 0.5f, 0.5f};
    const float  top_ps[5] = {0.8f, 0.6f, 0.5f, 0.9f, 0.0f};
    const int    kept[5] = {4, 3, 3, 5, 1};
    for (int c = 0; c < 5; c++) {
        caprl_sampling_params p = caprl_sampling_default_params();
        p.top_p = top_ps[c];
        caprl_sampler *s = make(5, p);
        (void)caprl_sampler_sample(s, eq, NULL, 0, 0, 0);
        const float *pr = caprl_sampler_probs(s);
        int          n = 0;
        for (int i = 0; i < 5; i++) {
            n += pr[i] > 0.0f;
            if (pr[i] > 0.0f) {
                CHECK_NEAR(pr[i], 1.0 / kept[c], 1e-6, 0);
            }
        }
        CHECK_MSG(n == kept[c], "top_p %g: %d ids kept, expected %d", (double)top_ps[c], n, kept[c]);
        CHECK(pr[4] > 0.0f); /* the highest id is the last to go */
        caprl_sampler_free(s);
    }
}

int main(void) {
    test_greedy_and_penalty();
    test_processed_distribution();
    test_draw_distribution_and_determinism();
    test_top_p_ties();
    return test_finish("test_sampler");
}
