"""Fixtures that tests, benchmarks and the demo share: tiny diffusers pipelines built offline from configs, and the
converter of our DiT weights to diffusers classes. Not imported by the library itself."""
