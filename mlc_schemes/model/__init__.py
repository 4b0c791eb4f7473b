"""The deployed model in `tvm.relax.frontend.nn`: Llama-family decoder + scheme-driven quantized linears."""
