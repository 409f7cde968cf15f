"""The fused LoRA Linear (pitlm.train.lora_linear) against peft's own forward on the tiny hybrid Qwen3.5-MoE: same
loss, same gradients for every trainable parameter; peft's forward whenever the fused form does not apply."""

import pytest
import torch

from pitlm.train.lora_linear import install_fused_lora_linear
from tests.test_train_experts import lora_model, loss_and_grads


def test_fused_linear_equals_peft_in_loss_and_every_gradient():
    model = lora_model(seed=7)
    ids = torch.randint(2, 258, (2, 20), generator=torch.Generator().manual_seed(4))
    ref_loss, ref_grads = loss_and_grads(model, ids)
    n = install_fused_lora_linear(model)
    assert n >= 4 * 5  # q/k/v/o or DeltaNet projections + shared-expert projections in each of 4 layers
    assert install_fused_lora_linear(model) == 0  # once only
    loss, grads = loss_and_grads(model, ids)
    assert torch.allclose(loss, ref_loss, rtol=1e-6, atol=0)
    for name, g in grads.items():
        scale = ref_grads[name].abs().max().clamp(min=1e-12)
        assert (g - ref_grads[name]).abs().max() / scale < 1e-5, name
    assert any(g.abs().max() > 0 for name, g in grads.items() if "lora_A" in name and "experts" not in name)


def test_fused_linear_falls_back_to_peft_with_dropout_or_adapters_off():
    from pitlm.train.config import LoraConfig
    from pitlm.train.model import apply_lora, build_model_config, build_scratch_model

    torch.manual_seed(8)  # peft refuses dropout on the experts' 3-D parameters: linear projections only here
    base = build_scratch_model(build_model_config("tiny-qwen3.5-moe"), torch.float32)
    model = apply_lora(base, LoraConfig(preset="dense", alpha=48.0, dropout=0.1, linear_path="peft"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.eval()  # dropout inactive, but the module is nn.Dropout, not Identity: peft's forward
    ids = torch.randint(2, 258, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        install_fused_lora_linear(model)
        out = model(input_ids=ids).logits
        with model.disable_adapter():
            off = model(input_ids=ids).logits
    assert torch.equal(out, ref) and torch.equal(off, base) and not torch.equal(ref, base)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_linear_and_grouped_experts_match_peft_in_bf16_on_the_gpu():
    """bf16 on a GPU: pitlm's LoRA paths (fused linear, grouped experts) are no further from a float32 reference
    than peft's own bf16 paths (METHOD.md's tolerance rule)."""
    import copy

    from pitlm.train.experts import install_expert_lora

    ref32 = lora_model(seed=9).cuda()
    ids = torch.randint(2, 258, (2, 64), generator=torch.Generator().manual_seed(6)).cuda()
    loss32, g32 = loss_and_grads(ref32, ids)
    peft16 = copy.deepcopy(ref32).to(torch.bfloat16)
    ours16 = copy.deepcopy(peft16)
    install_fused_lora_linear(ours16)
    install_expert_lora(ours16)

    def errors(model):
        loss, grads = loss_and_grads(model, ids)
        g = torch.cat([grads[n].float().flatten() for n in g32])
        ref = torch.cat([g32[n].flatten() for n in g32])
        return float((loss.float() - loss32).abs() / loss32.abs()), float((g - ref).norm() / ref.norm())

    (lp, gp), (lo, go) = errors(peft16), errors(ours16)
    assert lo <= 1.5 * max(lp, 1e-3) and go <= 1.5 * max(gp, 1e-2), ((lo, go), (lp, gp))
