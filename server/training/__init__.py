"""Training on the coordinator: pretraining the base model, and one local fine-tune."""
