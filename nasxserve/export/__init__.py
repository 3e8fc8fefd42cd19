"""Export a finished run to a bundle: ONNX, TorchScript, torch.export, safetensors, manifest."""
