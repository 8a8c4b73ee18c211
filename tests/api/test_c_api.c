/* Every public header compiles on its own as strict C11 (this file is built with -std=c11 -pedantic and the
 * project's warnings), and the exported defaults are what the headers document. */
#include "caprl/bench.h"
#include "caprl/caprl.h"
#include "caprl/data.h"
#include "caprl/eval.h"
#include "caprl/generate.h"
#include "caprl/grpo.h"
#include "caprl/image.h"
#include "caprl/model.h"
#include "caprl/qa.h"
#include "caprl/reward.h"
#include "caprl/rl.h"
#include "caprl/safetensors.h"
#include "caprl/sampler.h"
#include "caprl/synth.h"
#include "caprl/tensor.h"
#include "caprl/tokenizer.h"
#include "caprl/train.h"
#include "caprl/vision.h"
#include "caprl/vlm.h"
#include "caprl_test.h"

int main(void) {
    CHECK_STR_EQ(caprl_status_str(CAPRL_OK), "ok");
    CHECK(strcmp(caprl_status_str(-1000), "unknown status") == 0);
    caprl_model_params mp = caprl_model_default_params();
    CHECK(mp.n_threads == 0 && mp.load_tokenizer);
    caprl_context_params cp = caprl_context_default_params();
    CHECK(cp.n_seq_max == 1 && cp.n_ctx == 2048 && cp.n_batch_max == 512);
    caprl_sampling_params sp = caprl_sampling_default_params();
    CHECK(sp.do_sample && sp.temperature == 1.0f && sp.top_k == 0 && sp.top_p == 1.0f);
    caprl_generate_params gp = caprl_generate_default_params();
    CHECK(gp.n_samples == 1 && gp.max_new_tokens == 256 && gp.prompt_streams == NULL);
    caprl_generation_config gc = caprl_generation_config_default();
    CHECK(!gc.do_sample && gc.top_k == 50 && gc.top_p == 1.0f && gc.repetition_penalty == 1.0f);
    CHECK(caprl_dtype_size(CAPRL_DTYPE_F32) == 4 && caprl_dtype_size(CAPRL_DTYPE_COUNT) == 0);
    caprl_image_decode_params dp = caprl_image_decode_default_params();
    CHECK(dp.alpha == CAPRL_ALPHA_WHITE && dp.max_pixels == 178956970);
    caprl_free(NULL);
    caprl_model_free(NULL);
    caprl_context_free(NULL);
    caprl_tokenizer_free(NULL);
    caprl_safetensors_free(NULL);
    caprl_sampler_free(NULL);
    caprl_vision_free(NULL);
    return test_finish("test_c_api");
}
