"""Correctness of the grouped expert-LoRA path (pitlm.kernels.experts) against peft's materialising path on the GPU,
before any timing counts: a small Qwen3.5-MoE (the 35B's expert widths: hidden 2048, moe_intermediate 512, 8 of
64 experts routed), LoRA preset qwen3.5-moe with random B, bf16. Both bf16 paths are compared with peft's path in
float32 on the same (bf16-rounded) weights, so a disagreement can be assigned: ||x - ref32|| / ||ref32|| of the
loss, the experts' LoRA gradients and all LoRA gradients, on a 2-layer attention-only model (bf16 operands: expect 1e-3 .. 1e-2; METHOD.md). Fresh
random tokens per trial; also times one forward+backward of each bf16 path (CUDA events, median of 5).

    python scripts/gpu_check_experts.py [--trials 2]
"""

from __future__ import annotations

import argparse
import copy

import torch


def run(model, tokens):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
    loss.backward()
    grads = {n: p.grad.float().flatten() for n, p in model.named_parameters() if p.grad is not None and "lora_" in n}
    return loss.detach().float(), grads


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def flat(grads, experts_only):
    return torch.cat([g for n, g in sorted(grads.items()) if not experts_only or ".mlp.experts." in n])


def timed(model, tokens, reps=5):
    times = []
    for _ in range(reps + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run(model, tokens)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times[1:])[reps // 2]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=2)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, Qwen3_5MoeTextConfig

    from pitlm.kernels.experts import install_expert_lora
    from pitlm.train.config import LoraConfig
    from pitlm.train.model import apply_lora

    # attention layers only: the check is of the experts (the DeltaNet kernels have their own, gpu_check_fla.py)
    cfg = Qwen3_5MoeTextConfig(num_hidden_layers=2, layer_types=["full_attention"] * 2, hidden_size=2048,
                               num_experts=64, num_experts_per_tok=8, moe_intermediate_size=512,
                               shared_expert_intermediate_size=512, vocab_size=8192)
    torch.manual_seed(0)
    lcfg = LoraConfig(preset="qwen3.5-moe", full_modules=[], adapter_dtype="base", experts_path="peft")
    base32 = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).cuda()
    base16 = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).cuda()
    base16.load_state_dict({k: v.to(torch.bfloat16) for k, v in base32.state_dict().items()})
    base32.load_state_dict({k: v.float() for k, v in base16.state_dict().items()})
    ref32, peft16 = apply_lora(base32, lcfg), apply_lora(base16, lcfg)
    with torch.no_grad():
        for n, p in peft16.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
        lora16 = {n: p for n, p in peft16.named_parameters() if "lora_" in n}
        for n, p in ref32.named_parameters():
            if "lora_" in n:
                p.copy_(lora16[n].float())
    grouped16 = copy.deepcopy(peft16)
    print(f"installed_experts_modules: {install_expert_lora(grouped16)}")
    for trial in range(args.trials):
        tokens = torch.randint(0, cfg.vocab_size, (2, 1024), device="cuda")
        l32, g32 = run(ref32, tokens)
        for name, model in (("peft_bf16", peft16), ("grouped_bf16", grouped16)):
            loss, g = run(model, tokens)
            ok = all(torch.isfinite(v).all() for v in g.values())
            print(f"trial{trial}_{name}: loss {rel(loss, l32):.2e} expert_grads "
                  f"{rel(flat(g, True), flat(g32, True)):.2e} all_lora_grads {rel(flat(g, False), flat(g32, False)):.2e}"
                  f" finite {ok}")
    tokens = torch.randint(0, cfg.vocab_size, (4, 2048), device="cuda")
    t_peft, t_grouped = timed(peft16, tokens), timed(grouped16, tokens)
    print(f"fwd_bwd_ms_peft: {t_peft:.1f}")
    print(f"fwd_bwd_ms_grouped: {t_grouped:.1f}")
    print(f"speedup: {t_peft / t_grouped:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
