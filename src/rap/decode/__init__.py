"""rap's fast decoder: prefill, KV compression, one captured CUDA graph per plan, and sampling."""
