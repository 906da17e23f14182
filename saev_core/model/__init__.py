"""The multimodal model side: the MLLM adapter (inputs, modality masks, early-stopped hook), the
activation cache, and patch geometry."""
