// Trainable TorchScript heads: a RawHead owns one TorchScript module that can be shaped from a template
// (`configure`), trained by a native fit loop (torch::optim Adam/AdamW, seeded shuffled mini-batches,
// early stopping, progress events, abortable; all off the JS thread), stacked into an ensemble, called
// for inference, and saved atomically as a file Python's torch.jit.load reads.
//
// Head convention (see weights/heads/common.py): every parameter/buffer is a top-level attribute;
// `configure(cfg: Dict[str, List[int]]) -> Dict[str, List[int]]` gives their shapes and `init_rule(name)
// -> Tuple[str, float]` ('normal', std) | ('constant', value) how to fill them; the training loss is
// `loss(data: List[Tensor], idx: Tensor, noise: Tensor) -> Tensor`, optional `noise_shape(batch: int) ->
// List[int]` and `after_step(step: int, loss: float, u: Tensor)`.
#pragma once
#include <napi.h>

namespace df {

// Adds RawHead and loadHead(path, device) to `exports`.
void InitTrain(Napi::Env env, Napi::Object exports);

}  // namespace df
