"""The training service: fine-tune jobs, the training runner, TorchScript export and the model registry."""
