/* The training pass of the Qwen2.5-VL vision tower (spec/qwen.md §3.4-§3.8): the forward of caprl_vision_encode
 * with its activations kept, and the exact backward into a flat f32 gradient buffer. The trainer
 * (src/train/trainer.c) owns the flat parameter and gradient buffers; this module owns the vision part of their
 * layout and the activations.
 *
 * Layout: the vision block of the flat buffers holds every tensor of the tower's parameter table in table order
 * (patch embedding, blocks 0.. depth-1 with norm1, qkv weight and bias, proj weight and bias, norm2, gate, up and
 * down weights and biases, then the merger's ln_q, fc1 and fc2 weights and biases), each in its stored element
 * order (the Conv3d patch embedding [Cv, in_c, kT, kH, kW] is the (Cv, patch_dim) matrix the forward multiplies
 * by, so its gradient is that matmul's weight gradient).
 *
 * Use: vision_train_bind once (the tower then runs on the flat values), vision_train_init for the activations,
 * then per micro-batch vision_train_forward followed by one vision_train_backward; after the flat values change,
 * vision_train_sync. A vision_train drives the tower's backend, so it shares the tower's one-call-at-a-time rule
 * with caprl_vision_encode. Results are bit-identical for any thread count and with or without recompute. */
#ifndef CAPRL_VISION_TRAIN_IMPL_H
#define CAPRL_VISION_TRAIN_IMPL_H

#include "caprl/train.h"
#include "caprl/vision.h"

typedef struct vision_train vision_train;

/* Elements of all vision tensors (= caprl_vision_n_params) and the number of tensors. */
int64_t vision_train_n_params(const caprl_vision *v);
int32_t vision_train_n_tensors(const caprl_vision *v);
/* Tensor i in table order: the checkpoint's own name with its prefix ("visual." or "model.visual."; "visual."
 * for random towers; the string belongs to v), offset relative to the start of the vision block, stored shape,
 * group CAPRL_GROUP_VISION. */
void vision_train_tensor(const caprl_vision *v, int32_t i, caprl_param_info *info);

/* Copies every vision parameter (as f32) into flat (vision_train_n_params elements, table order) and re-points
 * the tower's weights into it: vectors and, in f32 training (bf16_shadow NULL), matrices read flat; in mixed
 * precision the matrices are BF16 views of bf16_shadow, which mirrors flat element for element (same offsets,
 * the whole vision block; every element is written by the bind and by vision_train_sync). caprl_vision_encode
 * keeps working, on the live values, and caprl_vision_add_to_writer / caprl_vl_model_save still write each
 * tensor in the dtype it was loaded in, converted from flat. flat and bf16_shadow must outlive v (or a rebind).
 * Binding again (to new buffers) copies from the current flat values. Aborts only when out of memory. */
void vision_train_bind(caprl_vision *v, float *flat, uint16_t *bf16_shadow);
/* After flat changed (optimizer step, checkpoint restore): rounds flat into the shadow and refreshes the
 * backend's packed weight copies. flat and bf16_shadow must be the buffers of the bind. */
void vision_train_sync(caprl_vision *v, const float *flat, uint16_t *bf16_shadow);
/* vision_train_sync when the shadow already holds the rounded values (the optimizer writes the bf16 copy of each
 * element it updates): refreshes the backend's packed weight copies only. */
void vision_train_sync_packed(caprl_vision *v);

/* Plans and reserves the activations for up to max_patches patches per forward (CAPRL_ERR_OOM names the size).
 * recompute keeps only each block's input and recomputes the block in the backward. v must be bound and must
 * outlive vt. */
caprl_status vision_train_init(vision_train **out, caprl_vision *v, int64_t max_patches, bool recompute,
                               caprl_error *err);
void         vision_train_free(vision_train *vt); /* NULL-safe */
size_t       vision_train_bytes(const vision_train *vt);

/* The forward of caprl_vision_encode: pixel_values (n_patches, patch_dim) in the HF layout with patch_dim =
 * in_channels * temporal_patch_size * patch_size^2 and n_patches given by grid_thw (n_images, 3); features
 * (n_merged_tokens, out_hidden_size) in raster order, image after image; *n_features = n_merged_tokens. The
 * inputs are copied (pixel_values may change before the backward). Errors (CAPRL_ERR_INVALID_ARG, naming the
 * value): bad grids, more patches than max_patches. */
caprl_status vision_train_forward(vision_train *vt, const float *pixel_values, const int32_t *grid_thw,
                                  int32_t n_images, float *features, int64_t *n_features, caprl_error *err);
/* Backward of the last forward for dL/dfeatures (n_merged_tokens, out_hidden_size): adds (+=) the gradient of
 * every vision tensor into grad_flat (the vision block, table order). One backward per forward (it consumes
 * saved activations); a second one, or one without a forward, is CAPRL_ERR_INVALID_ARG. */
caprl_status vision_train_backward(vision_train *vt, const float *dfeatures, float *grad_flat, caprl_error *err);

#endif /* CAPRL_VISION_TRAIN_IMPL_H */
