"""pitlm.kernels.lora_dense: dense LoRA with the scale on the rank side and the add inside the GEMM, against peft's
own lora.Linear forward on the tiny hybrid Qwen3.5-MoE: same loss, same gradients, peft's path whenever the layer
is not plain LoRA."""

from __future__ import annotations

import pytest
import torch

from pitlm.kernels.lora_dense import install_dense_lora
from pitlm.train.config import LoraConfig
from pitlm.train.model import apply_lora, build_model_config, build_scratch_model


def lora_model(dense_path: str, seed: int = 0, dtype=torch.float32, **lora):
    torch.manual_seed(seed)
    base = build_scratch_model(build_model_config("tiny-qwen3.5-moe"), dtype)
    model = apply_lora(base, LoraConfig(preset="qwen3.5-moe", dense_path=dense_path, full_modules=[], **lora))
    with torch.no_grad():  # peft starts B at 0; random B makes every adapter change the output
        for i, (name, p) in enumerate(model.named_parameters()):
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(i))
    return model


def dense_layers(model):
    from peft.tuners.lora.layer import Linear

    return [m for m in model.modules() if isinstance(m, Linear)]


def loss_and_grads(model, ids, seed=0, autocast=None):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}


IDS = torch.randint(2, 258, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(("dropout", "one_node"), [(0.0, True), (0.0, False), (0.1, True)])
def test_fused_equals_peft_in_loss_and_every_gradient(dropout, one_node):
    from pitlm.kernels.registry import DENSE_ONE_NODE

    extra = {"dropout": dropout, "target_parameters": []} if dropout else {}  # peft: no dropout on 3-D experts
    ref, fused = lora_model("peft", **extra).train(), lora_model("fused", **extra).train()
    assert fused.state_dict().keys() == ref.state_dict().keys()
    fused.load_state_dict(ref.state_dict())
    n = len(dense_layers(fused))
    assert n > 0 and install_dense_lora(fused) == n  # apply_lora routed every one; installing again is harmless
    for m in dense_layers(fused):
        setattr(m, DENSE_ONE_NODE.attr, one_node)
    assert all(m.forward.__func__.__module__ == "pitlm.kernels.lora_dense" for m in dense_layers(fused))
    assert all(m.forward.__func__.__module__ != "pitlm.kernels.lora_dense" for m in dense_layers(ref))
    ref_loss, ref_grads = loss_and_grads(ref, IDS)
    loss, grads = loss_and_grads(fused, IDS)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    dense_lora = [k for k in grads if "lora_" in k and ".experts." not in k]
    assert len(dense_lora) == 2 * n
    for name, g in grads.items():
        scale = ref_grads[name].abs().max().clamp(min=1e-12)
        assert (g - ref_grads[name]).abs().max() / scale < 1e-4, name
    for name in dense_lora:
        assert grads[name].abs().max() > 0, name


def test_fused_output_comes_from_the_gemm_epilogue_in_one_graph_node():
    """No dropout and a frozen base: one node (pitlm's backward, the input's two gradients in one buffer); with
    dropout the add is still the GEMM's epilogue (addmm); peft's own forward ends in its scaled add."""
    layer = dense_layers(lora_model("fused"))[0]
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)

    def last_op(out):  # under the final reshape back to (3, 5, out)
        fn = out.grad_fn
        return type(fn.next_functions[0][0] if type(fn).__name__ == "ViewBackward0" else fn).__name__

    assert last_op(layer(x)) == "_DenseLoRABackward"
    assert last_op(dense_layers(lora_model("fused", dropout=0.1, target_parameters=[]))[0](x)) == "AddmmBackward0"
    assert last_op(dense_layers(lora_model("peft"))[0](x)) == "AddBackward0"


@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16])
def test_bf16_autocast_is_as_close_to_float32_as_peft(adapter_dtype):
    """One adapted layer under bf16 autocast (a whole MoE model's routing flips under bf16 and drowns the layer's
    own error): output and the input's and adapters' gradients, fused and peft's, both against float32."""
    fused = dense_layers(lora_model("fused"))[3]
    x = torch.randn(64, fused.in_features, generator=torch.Generator().manual_seed(3))
    g = torch.randn(64, fused.out_features, generator=torch.Generator().manual_seed(4))

    def run(forward, autocast, dtype=torch.float32):
        fused.to(dtype)
        params = [fused.lora_A["default"].weight, fused.lora_B["default"].weight]
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = forward(fused, xi)
        grads = torch.autograd.grad(out, [xi, *params], g.to(out.dtype))
        fused.float()
        return out.float().detach(), torch.cat([t.float().flatten() for t in grads])

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    peft_forward = type(fused).forward
    out32, g32 = run(peft_forward, False)
    ours = run(lambda m, xi: m(xi), True, adapter_dtype)
    ref = run(peft_forward, True, adapter_dtype)
    assert rel(ours[0], out32) <= 1.5 * max(rel(ref[0], out32), 1e-3)
    assert rel(ours[1], g32) <= 1.5 * max(rel(ref[1], g32), 1e-3)
    assert rel(ours[0], out32) > 0  # bf16 really ran


def test_peft_forward_back_whenever_the_layer_is_not_plain_lora():
    model = lora_model("fused").eval()
    with torch.no_grad():
        with model.disable_adapter():
            base_logits = model(input_ids=IDS).logits
        logits = model(input_ids=IDS).logits
        assert not torch.allclose(logits, base_logits)
        model.merge_adapter()  # merged: the base layer alone already holds W + s·B·A
        torch.testing.assert_close(model(input_ids=IDS).logits, logits, rtol=1e-4, atol=1e-5)
        model.unmerge_adapter()
        layer = dense_layers(model)[0]
        x = torch.randn(2, layer.in_features)
        two = layer(x)
        model.add_adapter("other", model.peft_config["default"])
        model.base_model.set_adapter(["default", "other"])  # two active adapters: peft's loop over them
        layer.lora_B["other"].weight.normal_()
        both = layer(x)
        torch.testing.assert_close(both, type(layer).forward(layer, x))
        assert not torch.allclose(both, two, atol=1e-4)


def test_dora_layers_keep_peft_forward():
    """A DoRA layer (peft's variant; pitlm's config has no switch for it) is routed but computes peft's forward:
    plain LoRA would give a different output once B is not zero."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    torch.manual_seed(0)
    base = build_scratch_model(build_model_config("tiny-qwen3.5-moe"), torch.float32)
    model = get_peft_model(base, PeftLoraConfig(r=4, target_modules=["o_proj"], use_dora=True))
    layer = dense_layers(model)[0]
    assert install_dense_lora(model) == len(dense_layers(model))
    x = torch.randn(2, layer.in_features)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
        plain = layer.get_base_layer()(x) + layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]
        ours = layer(x)
        peft_own = type(layer).forward(layer, x)
    torch.testing.assert_close(ours, peft_own)
    assert not torch.allclose(ours, plain, atol=1e-4)
