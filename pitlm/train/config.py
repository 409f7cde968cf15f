"""The training config: one pydantic model, loaded from a recipe (`pitlm/recipes/*.yaml`, `stage: train`) and
`--set` overrides. Cross-field rules that protect the seed's hard-won lessons live in `check_config`.

    mode: scratch | lora | full
      scratch  a model built from a transformers config (`model:` section), every parameter trained
      lora     peft LoRA on `base` (an HF id/path, or model:<run> = PITLM_HOME/models/<run>/final)
      full     every parameter of `base`, sharded with FSDP2 (torchrun; world size 1 works too)
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from pitlm.config import StageConfig
from pitlm.errors import ConfigError


class OptimConfig(StageConfig):
    name: Literal["adamw", "adamw8bit"] = "adamw"
    lr: float = Field(3e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = Field(1.0, ge=0)  # 0 disables clipping (the norm is still computed for the watchdog)
    # torch AdamW's fused kernel (one launch for all parameters, fp32 math) instead of its foreach default
    fused: bool = False
    # Update each parameter inside backward as soon as its gradient exists, then free that gradient
    # (pitlm.train.in_backward): the trainable parameters' gradients are never all alive (-3.65 GiB on the seed's
    # LoRA recipe). Needs grad_clip=0 and grad_accum_steps=1; one process (lora or scratch, not full).
    in_backward: bool = False
    # Write bf16 weights back from the fp32 update with stochastic rounding (8-bit AdamW only). An update below half
    # a bf16 ulp (the seed's full_modules_lr 2e-5 on lm_head / embed_tokens weights of ~0.02) is lost by
    # round-to-nearest: 71% of those weights never moved in 20 steps. Stochastic rounding moves them by the right
    # amount on average. full_modules: the LoRA run's lm_head / embed_tokens group; all: every bf16 parameter.
    stochastic_round: Literal["none", "full_modules", "all"] = "none"

    @model_validator(mode="after")
    def _stochastic_round_needs_adamw8bit(self) -> OptimConfig:
        if self.stochastic_round != "none" and self.name != "adamw8bit":
            raise ConfigError(f"optim.stochastic_round={self.stochastic_round} with optim.name={self.name}: only "
                              "pitlm's 8-bit AdamW rounds stochastically; set optim.name=adamw8bit or "
                              "optim.stochastic_round=none")
        return self


class LoraConfig(StageConfig):
    preset: str | None = "qwen3.5-moe"  # see pitlm.train.model.LORA_PRESETS
    target_modules: list[str] | None = None  # overrides the preset's module names
    target_parameters: list[str] | None = None  # overrides the preset's fused (3-D) parameters, e.g. MoE experts
    r: int = Field(16, ge=1)
    alpha: float = 32.0
    dropout: float = Field(0.0, ge=0, lt=1)
    # peft keeps adapters in float32 on a bf16 base (3x the memory of bf16 with AdamW: weight, grad, 2 states);
    # `base` keeps them in the base model's dtype, as Unsloth does. On Qwen3.5-35B-A3B the ~942 M adapter
    # parameters cost ~15 GB in fp32 with AdamW and ~7.5 GB in bf16.
    adapter_dtype: Literal["fp32", "base"] = "fp32"
    # LoRA on fused 3-D expert parameters: `grouped` applies (x·rhs)·lhs to each expert's routed tokens with grouped
    # GEMMs (pitlm.kernels.experts); `peft` keeps peft's parametrization, which materialises W + B·A for every expert
    # on every forward (44% of a 35B-A3B step on an H100). Same adapters, same results.
    experts_path: Literal["grouped", "peft"] = "grouped"
    # LoRA on dense (nn.Linear) layers: `fused` scales the r-column low-rank product and accumulates the
    # up-projection into the base output inside the GEMM (pitlm.kernels.lora_dense); `peft` keeps peft's forward,
    # which scales and adds the full (tokens, out) output in two more passes. Same adapters, same results.
    dense_path: Literal["fused", "peft"] = "fused"
    # With the routed experts' Triton kernels (GPU): the experts' rank-r LoRA term inside their base GEMMs' K (16
    # spare columns in the routed rows and in the expert weights' storage, pitlm.kernels.experts._LoRAInK): faster
    # (+1-5% on the 35B-A3B), +1 GB of padded weight storage. Off: separate rank-r GEMMs. Same results.
    experts_in_k: bool = True
    # Trained in full (peft modules_to_save) in their own param group at a smaller LR, as the seed did.
    full_modules: list[str] = Field(default_factory=lambda: ["lm_head", "embed_tokens"])
    full_modules_lr: float | None = None  # None -> optim.lr / 10
    # peft keeps a frozen copy of each module trained in full beside the trained one (2 GB for the seed's lm_head +
    # embed_tokens on Qwen3.5-35B-A3B). Off: the frozen original shares the trained copy's storage, so a training
    # process holds one; adapters saved, loaded and merged are unchanged, but inside that process disabling the
    # adapter no longer restores the base lm_head / embed_tokens (nothing in pitlm's training does).
    full_modules_base_copy: bool = False
    # Refuse to start when LoRA adapter parameters are below this fraction of the model (the seed's attention-only
    # list on Qwen3.5-35B-A3B gives 0.0099%), or when a hybrid model's adapted layers miss whole layer kinds.
    min_trainable_fraction: float = Field(1e-4, ge=0)
    guard: bool = True
    merge_on_exit: bool = True  # also write merged/ (adapter folded into the base) for eval


class FsdpConfig(StageConfig):
    activation_checkpointing: bool = False  # seed: off = +32% tokens/s, -9 GB headroom per GPU
    merge_on_exit: bool = True  # rank 0 writes final/ after the process group is gone; off for 35B (use pitlm merge)
    # mode scratch: shard with FSDP2 even at world size 1 (one process otherwise trains unsharded): runs a multi-GPU
    # recipe's FSDP2 path, sharded checkpoints and merge on one GPU
    force: bool = False


class ValidationConfig(StageConfig):
    """Training-time validation (the recipe's `eval:` section): the loss over `batches` fixed held-out batches,
    every `every` steps. Not the eval stage's config (`pitlm.eval.pipeline.EvalConfig`)."""

    every: int = Field(250, ge=1)
    batches: int = Field(8, ge=1)


class CheckpointConfig(StageConfig):
    every: int = Field(500, ge=1)
    keep_last: int = Field(2, ge=1)
    # what `--resume` checks of each file recorded in a checkpoint's files.json before trusting it: its size
    # (catches truncation), or also its sha256 (catches corruption; rank 0 re-reads the whole checkpoint, which for
    # a sharded 35B full-weight checkpoint of ~0.5 TB takes minutes: that recipe checks sizes)
    verify: Literal["sha256", "size"] = "sha256"


class ChronologicalConfig(StageConfig):
    """schedule=chronological (pitlm.train.schedule): one segment per crawl period of a nested corpus, a family
    member exported at each period's end."""

    # steps of each segment: one number for all, or one per period; None: `steps` split evenly. Set it (not
    # `steps`) when the runs on the corpus's slices must be step for step the family run's first segments.
    steps_per_period: int | list[int] | None = None
    # share of each batch drawn from the earlier periods (segment 1 has none): what keeps a later member knowing
    # what an earlier one learned; 0 trains every segment on its own period only
    replay: float = Field(0.5, ge=0, lt=1)

    @model_validator(mode="after")
    def _positive_steps(self) -> ChronologicalConfig:
        per = self.steps_per_period
        if per is not None and min([per] if isinstance(per, int) else per or [0]) < 1:
            raise ConfigError(f"chronological.steps_per_period={per}: every segment needs at least one step")
        return self


class DebugConfig(StageConfig):
    inject_nan_at_step: int | None = None  # multiply that step's loss by NaN (tests the watchdog)
    kill_at_step: int | None = None  # hard-exit (os._exit(137)) after that step (tests --resume)
    probe_logits: bool = False  # save logits of the first val batch from the live (sharded) model at the end


class TrainConfig(StageConfig):
    mode: Literal["scratch", "lora", "full"] = "scratch"
    run_name: str | None = None  # model dir name under PITLM_HOME/models; --name overrides; default: recipe name
    corpus: str = Field(..., min_length=1)  # PITLM_HOME/corpus/<corpus>/ (or a path)
    tokenizer: str | None = None  # HF name/path, pit:NAME, model:<run>; default: the base model's, or the corpus's
    base: str | None = None  # lora/full: HF id/path or model:<run>
    model: dict[str, Any] = Field(default_factory=dict)  # scratch: {arch: PRESET} and/or transformers config keys

    seq_len: int = Field(64, ge=2)
    batch_size: int = Field(32, ge=1)  # sequences per optimizer step, over all ranks
    grad_accum_steps: int = Field(1, ge=1)
    steps: int = Field(1000, ge=1)
    # plain: `steps` over the whole corpus; chronological: the corpus's crawl periods in date order, a family member
    # model:<run>@<cutoff> exported at the end of each (see chronological.* and pitlm.train.schedule)
    schedule: Literal["plain", "chronological"] = "plain"
    chronological: ChronologicalConfig = Field(default_factory=ChronologicalConfig)
    seed: int = 0
    nproc: int = Field(1, ge=1)  # >1: `pitlm train` relaunches itself through torchrun with this many ranks

    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "bf16", "fp32"] = "auto"  # parameter dtype; auto: fp32 on CPU and for scratch, else bf16
    attn_implementation: str | None = None  # e.g. sdpa, flash_attention_2; None: transformers' default
    gradient_checkpointing: bool = False  # lora/scratch; full mode uses fsdp.activation_checkpointing
    # with gradient_checkpointing: the last N decoder layers keep their activations (no recompute in backward):
    # faster by their share of the recompute, at the memory of their activations
    gradient_checkpointing_skip_last: int = Field(0, ge=0)
    # with gradient_checkpointing, one process: each checkpointed block's input waits in pinned host memory instead
    # of GPU memory (64 MiB per block at 8 x 2048 tokens of hidden size 2048; copied back one block ahead)
    gradient_checkpointing_offload: bool = False
    # one process: torch.compile each decoder block's MoE block (moe: inductor fuses the routing, gating and LoRA
    # elementwise chains; the grouped GEMMs stay eager); blocks: every dense decoder block and the LM-head loss
    # (mode scratch, pitlm.train.scratch); the first step compiles. none: eager
    compile: Literal["none", "moe", "blocks"] = "none"
    # one GPU (lora, single-process scratch): fla's fused causal conv1d and RMSNorms for DeltaNet hybrids
    # (pitlm.kernels); FSDP2 runs keep transformers' path until that combination is verified on GPUs
    fast_kernels: bool = True
    # lora/scratch: LM head + loss computed this many tokens at a time, logits recomputed in backward (a 248k
    # vocabulary's logits are 8 GB in fp32 at 4 x 2048 tokens). None: the plain full-logits loss.
    ce_chunk: int | None = Field(None, ge=1)

    log_every: int = Field(50, ge=1)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    fsdp: FsdpConfig = Field(default_factory=FsdpConfig)
    eval: ValidationConfig = Field(default_factory=ValidationConfig)  # the YAML key stays `eval:`
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    debug: DebugConfig = Field(default_factory=DebugConfig)


def check_config(cfg: TrainConfig, world_size: int = 1) -> None:
    """Rules across fields and the launch; each violation is one line saying why and what to do."""
    if cfg.mode in ("lora", "full") and not cfg.base:
        raise ConfigError(f"mode {cfg.mode} continues a base model: set base=HF_ID_OR_PATH or base=model:<run>")
    if cfg.mode == "scratch" and cfg.base:
        raise ConfigError("mode scratch builds a fresh model from `model:`; base is for lora/full (remove it)")
    if cfg.mode == "scratch" and not cfg.model:
        raise ConfigError("mode scratch needs a `model:` section (arch: PRESET and/or transformers config keys)")
    if cfg.mode == "full" and cfg.grad_accum_steps != 1:
        raise ConfigError(
            f"grad_accum_steps={cfg.grad_accum_steps} with mode full: FSDP2 keeps unsharded gradients while it "
            "accumulates, which runs out of memory at 35B (the seed's lesson); use grad_accum_steps=1 and raise "
            "batch_size or the number of GPUs")
    if cfg.mode == "full" and cfg.optim.name != "adamw":
        raise ConfigError(f"optim.name={cfg.optim.name} with mode full: 8-bit optimizers fail on FSDP2's DTensor "
                          "parameters (the seed's lesson); use optim.name=adamw")
    if cfg.mode == "full" and cfg.ce_chunk:
        raise ConfigError("ce_chunk with mode full: the chunked loss calls the backbone and lm_head directly, "
                          "bypassing the FSDP2 root's gather of lm_head; remove ce_chunk")
    if cfg.compile == "blocks" and cfg.mode != "scratch":
        raise ConfigError(f"compile=blocks compiles a fresh dense model's blocks (mode scratch), not mode "
                          f"{cfg.mode}; use compile=moe or none")
    if cfg.optim.fused and cfg.optim.name != "adamw":
        raise ConfigError("optim.fused is torch AdamW's fused kernel: set optim.name=adamw or optim.fused=false")
    if cfg.mode == "lora" and world_size > 1:
        raise ConfigError(f"mode lora runs on one process (got world size {world_size}); the multi-GPU arm is "
                          "mode full (FSDP2)")
    check_activations(cfg, fsdp=uses_fsdp(cfg, world_size))
    if cfg.optim.in_backward:
        if cfg.optim.grad_clip > 0:
            raise ConfigError(f"optim.in_backward with optim.grad_clip={cfg.optim.grad_clip}: each parameter is "
                              "updated before the global gradient norm is known; set optim.grad_clip=0")
        if cfg.grad_accum_steps != 1:
            raise ConfigError(f"optim.in_backward with grad_accum_steps={cfg.grad_accum_steps}: the update would "
                              "run once per micro-batch; use grad_accum_steps=1 (a larger micro-batch fits in the "
                              "memory in_backward frees)")
        if cfg.mode == "full" or world_size > 1:
            raise ConfigError("optim.in_backward runs on one process (lora or scratch): FSDP2 already frees "
                              "gradients shard by shard; remove optim.in_backward")
    per_step = world_size * cfg.grad_accum_steps
    if cfg.batch_size % per_step:
        raise ConfigError(f"batch_size={cfg.batch_size} must be divisible by world size x grad_accum_steps "
                          f"= {world_size} x {cfg.grad_accum_steps}")


def check_activations(cfg: TrainConfig, fsdp: bool) -> None:
    """The rules on where activations live (checkpointing, offloading, compiled blocks), part of check_config (which
    pitlm bench train runs on each configuration it measures)."""
    if cfg.gradient_checkpointing_offload and not cfg.gradient_checkpointing:
        raise ConfigError("gradient_checkpointing_offload offloads the checkpointed blocks' inputs: set "
                          "gradient_checkpointing: true as well")
    if fsdp and (cfg.gradient_checkpointing_offload or cfg.compile == "moe"):
        raise ConfigError("gradient_checkpointing_offload and compile=moe are for one process (lora, scratch); "
                          "FSDP2 runs keep fsdp.activation_checkpointing and eager MoE blocks")
    if fsdp and cfg.compile == "blocks" and cfg.fsdp.activation_checkpointing:
        raise ConfigError("compile=blocks with fsdp.activation_checkpointing: a checkpointed block recomputes its "
                          "uncompiled forward; set one of them off (compile=none, or "
                          "fsdp.activation_checkpointing=false)")


def uses_fsdp(cfg: TrainConfig, world_size: int) -> bool:
    """Whether the run shards with FSDP2: mode full always, scratch with several ranks or fsdp.force."""
    return cfg.mode == "full" or (cfg.mode == "scratch" and (world_size > 1 or cfg.fsdp.force))


def micro_batch_size(cfg: TrainConfig, world_size: int) -> int:
    return cfg.batch_size // (world_size * cfg.grad_accum_steps)
