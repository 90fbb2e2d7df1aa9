"""Synchronized BatchNorm for distributed training (SAFA section 5.2 trains with it).

On CUDA the trainer uses ``torch.nn.SyncBatchNorm`` (fused NCCL kernels). torch's class refuses CPU
tensors, so CPU runs on the gloo backend (tests, debugging) use ``GlooSyncBatchNorm`` below: batch
statistics are summed over all processes with a differentiable all-reduce, which gives exactly the
gradients of one process holding the whole global batch.
"""
import torch
import torch.distributed as dist
from torch import nn


def _distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class GlooSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics span every process of the default group."""

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x):
        if not (self.training and _distributed()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce
        channels = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        # float64 sums: E[x^2] - E[x]^2 loses precision in float32
        x64 = x.double()
        count = x64.new_tensor([x.numel() / channels])
        stats = all_reduce(torch.cat([x64.sum(dims), (x64 * x64).sum(dims), count]))  # over ranks
        n = stats[-1]
        mean64 = stats[:channels] / n
        var = (stats[channels:2 * channels] / n - mean64 * mean64).clamp_min(0).to(x.dtype)
        mean = mean64.to(x.dtype)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = self.momentum if self.momentum is not None else \
                    1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * n / (n - 1).clamp_min(1), momentum)
        shape = [1, channels] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def convert_sync_batchnorm(module, device):
    """Every BatchNorm of ``module`` synchronized across processes, for ``device``'s backend."""
    if torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert_to_gloo(module)


def _convert_to_gloo(module):
    converted = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not \
            isinstance(module, GlooSyncBatchNorm):
        converted = GlooSyncBatchNorm(module.num_features, module.eps, module.momentum,
                                      module.affine, module.track_running_stats)
        if module.affine:  # the same Parameter objects, so existing optimizers keep working
            converted.weight, converted.bias = module.weight, module.bias
        if module.track_running_stats:
            converted.running_mean = module.running_mean
            converted.running_var = module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
    for name, child in module.named_children():
        setattr(converted, name, _convert_to_gloo(child))
    return converted
