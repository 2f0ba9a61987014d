"""Train: DeepSpeed pretraining and LoRA fine-tuning on Ray Train, registered in MLflow."""
