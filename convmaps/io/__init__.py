"""What lies on disk: every path (`layout`), atomic safetensors and files (`store`), manifests,
and image inputs (find, validate, decode)."""
