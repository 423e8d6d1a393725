"""A lean LoRA / QLoRA training step for Llama models wrapped by PEFT.

`prepare_for_training(model, ...)` changes how an already PEFT-wrapped model computes,
never what: parameter names, the adapter on disk and the maths stay PEFT's. It does three
things, each switchable and measured in bench/train_throughput.py:

- **fused LoRA linears** (`fused_lora`): PEFT computes a LoRA layer as `base(x)` plus an
  fp32 side branch — `x` is cast to fp32 for the adapter, the result cast back, and autograd
  keeps the casts. Here one autograd function does `y = x W^T + s (x A^T) B^T` in the compute
  dtype, keeps only `x` and the rank-r `x A^T` for backward, and on 4-bit bases de-quantises
  `W` inside forward and again inside backward instead of holding a bf16 copy. Gradients
  come back in the adapter weights' own dtype (fp32, or bf16 as TRL keeps QLoRA adapters).
- **Liger kernels** (`liger`, CUDA only): fused RMSNorm, RoPE and SwiGLU. The loss never
  materialises the `tokens x vocab` logits (4 GiB in fp32 at 8k tokens on Llama 3's 128k
  vocabulary): TRL's fused LM head scores labelled positions in tiles (the `train` stage),
  or Liger's fused linear cross-entropy (`liger_cross_entropy`).
- **activation checkpointing** per decoder layer, non-reentrant (no input-grad hooks needed).

Norms, embeddings and the head stay in the compute dtype: RMSNorm and the loss already
accumulate in fp32 inside their kernels, so an fp32 copy of those weights (what
`prepare_model_for_kbit_training` makes) costs ~3 GiB on 8B and buys no accuracy.
"""

from __future__ import annotations

import logging
import types

import torch

log = logging.getLogger(__name__)


def dense_weight(base: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The base layer's weight as a dense (out, in) matrix; 4-bit weights are de-quantised."""
    weight = base.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        import bitsandbytes.functional as bnbf

        weight = bnbf.dequantize_4bit(weight.data, quant_state)
    return weight if weight.dtype == dtype else weight.to(dtype)


class LoRALinearFunction(torch.autograd.Function):
    """y = x W^T (+ bias) + scaling * (x_d A^T) B^T, with x_d = dropout(x) (or x itself).

    Saved for backward: x, x_d (the same tensor without dropout) and x_d A^T (rank r) —
    never W, which backward de-quantises again (cheap next to the matmuls it feeds)."""

    @staticmethod
    def forward(ctx, x, x_lora, lora_a, lora_b, base, scaling):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xd2 = x2 if x_lora is x else x_lora.reshape(-1, shape[-1])
        a = lora_a.to(x.dtype)
        b = lora_b.to(x.dtype)
        w = dense_weight(base, x.dtype)
        xa = xd2 @ a.t()
        y = torch.addmm(x2 @ w.t(), xa, b.t(), alpha=scaling)
        if base.bias is not None:
            y = y + base.bias.to(y.dtype)
        ctx.base, ctx.scaling, ctx.shape = base, scaling, shape
        ctx.param_dtypes = lora_a.dtype, lora_b.dtype
        ctx.same_input = x_lora is x
        ctx.save_for_backward(xd2, xa, a, b)
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        xd2, xa, a, b = ctx.saved_tensors
        dy = grad_out.reshape(-1, grad_out.shape[-1]).to(xa.dtype)
        dyb = (dy @ b).mul_(ctx.scaling)  # (T, r)
        grad_x = grad_x_lora = None
        if ctx.needs_input_grad[0]:
            grad_x = dy @ dense_weight(ctx.base, dy.dtype)
            if ctx.same_input:
                grad_x.addmm_(dyb, a)
            else:
                grad_x_lora = (dyb @ a).view(ctx.shape)
            grad_x = grad_x.view(ctx.shape)
        grad_a = grad_b = None
        if ctx.needs_input_grad[2]:
            grad_a = (dyb.t() @ xd2).to(ctx.param_dtypes[0])
        if ctx.needs_input_grad[3]:
            grad_b = (dy.t() @ xa).mul_(ctx.scaling).to(ctx.param_dtypes[1])
        return grad_x, grad_x_lora, grad_a, grad_b, None, None


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Replacement `forward` for a PEFT LoRA Linear / Linear4bit with one active adapter."""
    if self.disable_adapters or self.merged or len(self.active_adapters) != 1:
        return self._peft_forward(x, *args, **kwargs)
    name = self.active_adapters[0]
    if name not in self.lora_A:
        return self._peft_forward(x, *args, **kwargs)
    dropout = self.lora_dropout[name]
    x_lora = dropout(x) if self.training and isinstance(dropout, torch.nn.Dropout) and dropout.p > 0 else x
    lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
    dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32
    base = self.get_base_layer()
    if getattr(base.weight, "quant_state", None) is not None:
        dtype = base.weight.quant_state.dtype  # the 4-bit layer's compute dtype
    return LoRALinearFunction.apply(x.to(dtype), x_lora.to(dtype), lora_a, lora_b, base, self.scaling[name])


def fuse_lora_layers(model: torch.nn.Module) -> int:
    """Route every eligible PEFT LoRA linear through `LoRALinearFunction`; returns how many.

    Layers with DoRA, bias adapters or several adapters keep PEFT's own forward."""
    from peft.tuners.lora import LoraLayer

    fused = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer) or not hasattr(module, "lora_A"):
            continue
        if any(module.use_dora.values()) or getattr(module, "lora_bias", {}) and any(module.lora_bias.values()):
            continue
        base = module.get_base_layer()
        if not isinstance(base, torch.nn.Linear) and getattr(base.weight, "quant_state", None) is None:
            continue
        if not hasattr(module, "_peft_forward"):
            module._peft_forward = module.forward
            module.forward = types.MethodType(_fused_forward, module)
        fused += 1
    return fused


def apply_liger(model: torch.nn.Module, fused_linear_cross_entropy: bool = False) -> bool:
    """Liger's Triton kernels (RMSNorm, RoPE, SwiGLU) on a Llama model instance; False where
    they cannot run. The loss stays with TRL's fused LM head (chunked log-probs over the
    labelled positions only) unless `fused_linear_cross_entropy` asks for Liger's."""
    if not torch.cuda.is_available():
        return False
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        log.warning("train: liger-kernel is not installed; training without its fused kernels")
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    _apply_liger_kernel_to_instance(
        model=base, fused_linear_cross_entropy=fused_linear_cross_entropy, cross_entropy=False
    )
    return True


def compile_layers(model: torch.nn.Module) -> int:
    """torch.compile each decoder layer in place (measured in bench/train_throughput.py)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = base.model.layers
    for layer in layers:
        layer.compile()
    return len(layers)


def prepare_for_training(
    model: torch.nn.Module,
    *,
    fused_lora: bool = True,
    liger: bool = True,
    gradient_checkpointing: bool = True,
    liger_cross_entropy: bool = False,
    compile: bool = False,
) -> dict:
    """Make a PEFT-wrapped causal LM train fast and lean; returns what was switched on."""
    done = {
        "fused_lora_layers": fuse_lora_layers(model) if fused_lora else 0,
        "liger": apply_liger(model, liger_cross_entropy) if liger else False,
        "gradient_checkpointing": bool(gradient_checkpointing),
    }
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if compile:
        done["compiled_layers"] = compile_layers(model)
    model.config.use_cache = False
    return done
