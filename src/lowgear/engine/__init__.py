"""The step: the DynamicGenerator façade, jobs, CUDA-graph decode, the sampler, stop strings, streamed text."""
