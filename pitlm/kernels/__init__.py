"""GPU fast paths: pitlm's Triton kernels, fla's fused kernels installed on a built model, the grouped expert and
dense LoRA forwards, and the profiler that measures them. Speed engineering under `pitlm.train` and `pitlm.eval`,
which both build on it; every path has a torch reference that CPU tensors keep and the tests compare against.

    install.py      install_fast_kernels(model): fla's conv / norms / Gated DeltaNet + the Triton paths below
    registry.py     FastPath: every fast path's switch in one place (name, module attribute, installer)
    triton_util.py  has_triton, interpreting, available(t), on_device(t): what every kernel asks before it launches
    routed.py       the routed experts' SwiGLU, gather and gather-sum (one kernel each way)
    moe.py          the MoE router's softmax / top-k and the shared expert's gate
    conv.py         the Gated DeltaNet's causal conv1d + SiLU written into q, k, v
    rope.py         the attention layers' partial rotary embedding
    experts.py      LoRA on routed experts as grouped GEMMs (no W + B·A)
    lora_dense.py   dense LoRA with the scale on the rank side and the add inside the GEMM
    profiling.py    one call under torch.profiler, its device time by class, the H100 projection
    availability.py which of these paths this machine can use (packages, GPUs): `pitlm doctor`, fast_path_summary
"""
