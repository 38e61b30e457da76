"""The merge core: recipe -> plan -> methods / fused kernels -> shard I/O -> engine -> child folder."""
