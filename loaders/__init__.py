"""SVDQuant checkpoints on ComfyUI's own model classes: layer maps, custom operations, the model
patcher that routes LoRA to the low-rank branch, and file ↔ model conversion. Needs ComfyUI."""
