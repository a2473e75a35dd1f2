"""Version counters after fused optimizer steps.

The package's caches of values derived from weights (the decoder stepper's tables and packed or
bf16 copies, the encoder's layer-0 table, the fixed context's projection, AMX layouts) follow
in-place changes through the weights' version counters. PyTorch's fused optimizers
(``fused=True``: Adam, AdamW, SGD, Adagrad; :func:`seq2seq_ext.training.make_adam` picks it)
update the parameters in their own kernels and leave the counters as they were, so those
caches would go on serving the old weights. A process-wide post-step hook bumps the counters
of a fused group's parameters after each step, as any other in-place update does. It touches
only fused groups (the others bump their own), and costs one counter increment a parameter.
"""
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = ["bump_fused_versions"]


def bump_fused_versions(optimizer, args, kwargs):
    """The post-step hook: bump the version of every parameter of a fused group."""
    for group in optimizer.param_groups:
        if group.get("fused"):
            params = [p for p in group["params"] if not p.is_inference()]
            if params:
                torch.autograd.graph.increment_version(params)


register_optimizer_step_post_hook(bump_fused_versions)
