"""Where a mask update's arithmetic runs: the torch reference (every device) and native CPU kernels."""
