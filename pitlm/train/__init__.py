"""Training: from-scratch PIT pretraining, LoRA continued pretraining (one GPU), full-weight FSDP2 (several GPUs),
and `pitlm merge`. A plain torch loop over transformers models; see loop.py for the flow.

Public entry points:
    train(cfg, vol, run_name, resume=False)     pitlm.train.loop     the whole stage
    train_step(model, batches, optimizer, ...)  pitlm.train.step     one optimizer step (the bench calls it too)
    assemble(source, cfg, env, fsdp)            pitlm.train.assembly the model train and the bench build, in one order
    bench_train(cfg, sweep)                     pitlm.train.bench    tok/s and peak memory on random weights
    merge_target(target, vol)                   pitlm.train.merge    DCP checkpoint / adapter -> HF directory
"""
