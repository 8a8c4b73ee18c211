// Every public header compiles as C++ (extern "C" blocks, no C-only constructs); built, not run.
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

int caprl_cxx_api_compiles();
int caprl_cxx_api_compiles() {
    caprl_model_params p = caprl_model_default_params();
    return p.n_threads;
}
