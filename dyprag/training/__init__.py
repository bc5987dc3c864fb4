"""Training: per-document LoRAs (PRAG's bank), the parameter translator and its distillation fit,
and the synthetic world's base-model pretraining."""
