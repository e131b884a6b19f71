"""Native CPU kernels (C, built at first use) for float32 CPU weights: the second backend."""
