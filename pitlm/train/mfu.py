"""Model FLOPs utilisation (MFU) of a dense decoder-only transformer: the FLOPs a training step must do, by formula,
over the time it took and the GPU's dense bf16 peak.

    flops_per_token = 6 * N + 6 * n_layers * seq_len * d_attn        (the attention term halved: causal)
    mfu = tokens_per_second * flops_per_token / peak

N: every parameter that takes part in a matmul per token -- the decoder blocks, the final norm and the LM head (its
weight counted even when it is tied to the input embedding); the input embedding table is a lookup and is left out
(torchtitan's and nanoGPT's convention; Kaplan et al.'s N also leaves out the LM head). 6 N: forward 2 N, backward
4 N. Attention scores and the weighted sum are 4 * seq * d_attn FLOPs per token and layer in the forward without a
mask (d_attn = heads x head_dim), 12 * seq * d_attn with the backward (PaLM's appendix B, torchtitan); a causal mask
skips half of them, so the headline `mfu` counts 6 * seq * d_attn and `mfu_attn_unhalved` the 12 that PaLM and
torchtitan report. Activation recomputation is not counted (it is not useful work).

Peak: dense (no sparsity) bf16 tensor-core TFLOP/s from NVIDIA's spec sheets; H200 SXM = H100 SXM = 989.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# Dense bf16 TFLOP/s by a substring of torch.cuda.get_device_name(); the first match wins (PCIe before the SXM
# default of the same chip). Unknown devices get no MFU unless the caller passes a peak.
PEAK_BF16_DENSE_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200 NVL", 835.0),
    ("H200", 989.0),  # SXM: the same tensor cores and clocks as the H100 SXM
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # "NVIDIA H100 80GB HBM3" is the SXM part
    ("A100", 312.0),
)


def peak_bf16_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU named as torch names it, or None when the table does not know it."""
    for key, tflops in PEAK_BF16_DENSE_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


@dataclass(frozen=True)
class FlopCount:
    matmul_params: int  # N above
    n_layers: int
    d_attn: int  # attention heads x head dim
    seq_len: int

    @property
    def attention_flops_per_token(self) -> float:
        """Causal: half of the 12 * n_layers * seq * d_attn of an unmasked attention."""
        return 6.0 * self.n_layers * self.seq_len * self.d_attn

    @property
    def flops_per_token(self) -> float:
        return 6.0 * self.matmul_params + self.attention_flops_per_token

    @property
    def flops_per_token_attn_unhalved(self) -> float:
        return 6.0 * self.matmul_params + 2 * self.attention_flops_per_token


def matmul_params(model: nn.Module) -> int:
    """N: the parameters of everything but the input embedding, plus the LM head's weight when it is tied to it."""
    emb = model.get_input_embeddings()
    emb_ids = {id(p) for p in emb.parameters()}
    n = sum(p.numel() for p in model.parameters() if id(p) not in emb_ids)  # parameters() lists a tied one once
    head = model.get_output_embeddings()
    if head is not None and id(head.weight) in emb_ids:
        n += head.weight.numel()
    return n


def count_flops(model: nn.Module, seq_len: int) -> FlopCount:
    """The FLOP count of a transformers causal LM (dense attention in every layer) at `seq_len` tokens."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return FlopCount(matmul_params(model), cfg.num_hidden_layers, cfg.num_attention_heads * head_dim, seq_len)


def mfu_fields(flops: FlopCount, tokens_per_second: float, peak_tflops: float | None) -> dict:
    """The bench's MFU columns for one measurement (None where the peak is unknown, e.g. on a CPU)."""
    out = {"flop_params": flops.matmul_params, "flops_per_token": round(flops.flops_per_token),
           "achieved_tflops": round(tokens_per_second * flops.flops_per_token / 1e12, 1),
           "peak_tflops": peak_tflops, "mfu": None, "mfu_attn_unhalved": None}
    if peak_tflops:
        out["mfu"] = round(tokens_per_second * flops.flops_per_token / (peak_tflops * 1e12), 4)
        out["mfu_attn_unhalved"] = round(tokens_per_second * flops.flops_per_token_attn_unhalved
                                         / (peak_tflops * 1e12), 4)
    return out
