"""SchedulerOutput -> device tensors -> model -> logits -> sampler (ModelRunner), and CUDA graphs."""

from tinyserve.runner.model_runner import ModelRunner, ModelRunnerOutput, PromptLogprobsRequest

__all__ = ["ModelRunner", "ModelRunnerOutput", "PromptLogprobsRequest"]
