"""Training: the engine, data, devices, CUDA graphs, validation and one job's life on a worker."""
