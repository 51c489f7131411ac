"""Scheduling and sampling: DynamicGenerator, jobs, the sampler, stop strings, streamed text."""
