"""OmniQuant (LWC + LET) for HF causal LMs, and MLC-style deployment on TVM. See README.md."""


def __getattr__(name):
    # lazy: `import omniquant` stays light (no torch / transformers) for the CLI's --help
    if name == "load_quantized":
        from omniquant.load import load_quantized

        return load_quantized
    raise AttributeError(f"module 'omniquant' has no attribute {name!r}")
