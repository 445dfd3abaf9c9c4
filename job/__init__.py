"""qlora-job: one QLoRA fine-tuning run per container, configured by QLORA_* variables."""
