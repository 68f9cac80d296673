"""Fine-tuning: QEFT weak-column tuning and the LoRA / QLoRA / full baselines, instruction data
and packing, and QEFT merging (the LoRA adapters themselves: qeft_jax.lora).

  train.trainer  the loop (`TrainConfig`, `train`), checkpoints/resume, export
  train.data     response masks, packing, data order (prompts: qeft_jax.tokenization; jsonl:
                 qeft_jax.data.load_instructions)
  train.merge    QEFT merging (Δ of the weak columns into a quantized or fp target)

CLIs: `python -m qeft_jax.train`, `python -m qeft_jax.merge`; benchmark: benchmarks/train_step.py.
"""
