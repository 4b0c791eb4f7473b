"""Per-method quantization scripts. Each runs in its method's own venv (see ``bench.peer_envs``) as a plain script,
reads the shared calibration windows, and writes the dequantized weights of the quantized linears + ``meta.json``."""
