"""Engine integrations: kvmem-backed KV caches for inference engines."""
