"""SchedulerOutput -> device tensors -> model -> logits -> sampler (ModelRunner), and CUDA graphs."""

from tinyserve.runner.model_runner import (
    ForwardOutput,
    ModelRunner,
    ModelRunnerOutput,
    PendingOutput,
    PromptLogprobsRequest,
)

__all__ = ["ForwardOutput", "ModelRunner", "ModelRunnerOutput", "PendingOutput", "PromptLogprobsRequest"]
