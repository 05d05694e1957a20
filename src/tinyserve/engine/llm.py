"""The offline API: `LLM(model).generate(prompts, SamplingParams(...))`, as in vLLM."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tinyserve.config import EngineConfig
from tinyserve.sampling_params import SamplingParams

from .engine import Engine
from .outputs import RequestOutput

PromptType = str | Mapping[str, Any]


class LLM:
    """Load a model once and generate for batches of prompts with continuous batching.

    Args mirror vLLM's `LLM`: model (folder or hub id), device ("auto"|"cpu"|"cuda"), dtype,
    max_model_len, block_size, gpu_memory_utilization, num_kv_blocks, max_num_seqs,
    max_num_batched_tokens, enable_prefix_caching, seed, enforce_eager; plus the rest of
    `EngineConfig` as keywords (load_format="dummy", kv_cache_memory_bytes, tokenizer, chat_template).
    """

    def __init__(
        self,
        model: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_model_len: int | None = None,
        block_size: int = 16,
        gpu_memory_utilization: float = 0.9,
        num_kv_blocks: int | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int | None = None,
        enable_prefix_caching: bool = True,
        seed: int = 0,
        enforce_eager: bool = False,
        **kwargs: Any,
    ) -> None:
        config = EngineConfig(
            model=str(model),
            device=device,
            dtype=dtype,
            max_model_len=max_model_len,
            block_size=block_size,
            gpu_memory_utilization=gpu_memory_utilization,
            num_kv_blocks=num_kv_blocks,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            enable_prefix_caching=enable_prefix_caching,
            seed=seed,
            enforce_eager=enforce_eager,
            **kwargs,
        )
        self._from_config(config)

    def _from_config(self, config: EngineConfig) -> None:
        self.engine = Engine(config)
        self.tokenizer = self.engine.tokenizer

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLM:
        """An LLM built from a ready EngineConfig (the CLI's path)."""
        llm = cls.__new__(cls)
        llm._from_config(config)
        return llm

    def get_tokenizer(self):
        return self.tokenizer

    # ---- generation -------------------------------------------------------------------------------
    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for each prompt; returns the outputs in the order of `prompts`.

        prompts: a string, a list of strings, or dicts {"prompt_token_ids": [...]} (or {"prompt": str}).
        sampling_params: one for all prompts, or one per prompt; default SamplingParams().
        """
        if isinstance(prompts, (str, Mapping)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"got {len(params_list)} SamplingParams for {len(prompts)} prompts; "
                    "give one, or one per prompt"
                )
        request_ids = []
        try:
            for prompt, params in zip(prompts, params_list, strict=True):
                text, ids = self._tokenize(prompt)
                request_id = self.engine.new_request_id()
                self.engine.add_request(request_id, ids, params, prompt=text)
                request_ids.append(request_id)
        except Exception:
            for request_id in request_ids:  # nothing is left queued when one prompt is rejected
                self.engine.abort_request(request_id)
            raise
        return self._run(request_ids, use_tqdm)

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        *,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (a list of {"role", "content"}) or a
        list of conversations, then generate."""
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer; this LLM runs without one (skip_tokenizer_init=True)")
        conversations = [messages] if messages and isinstance(messages[0], Mapping) else list(messages)
        prompts = []
        for conversation in conversations:
            text = self.tokenizer.apply_chat_template(
                conversation, add_generation_prompt=add_generation_prompt, chat_template=chat_template
            )
            # The template already holds BOS where the model wants one.
            prompts.append(
                {"prompt": text, "prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)}
            )
        return self.generate(prompts, sampling_params, use_tqdm)

    def _encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError(
                "this LLM runs without a tokenizer (skip_tokenizer_init=True): give prompts as "
                "{'prompt_token_ids': [...]}"
            )
        return self.tokenizer.encode(text)

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self._encode(prompt)
        if isinstance(prompt, Mapping):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) for t in ids):
                    raise TypeError("prompt_token_ids must be a list of ints")
                return prompt.get("prompt"), list(ids)
            if "prompt" in prompt and isinstance(prompt["prompt"], str):
                return prompt["prompt"], self._encode(prompt["prompt"])
        raise TypeError(
            "each prompt must be a str, {'prompt': str} or {'prompt_token_ids': [int, ...]}, "
            f"got {type(prompt).__name__}"
        )

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.engine
        results: dict[str, RequestOutput] = {}
        wanted = set(request_ids)
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(request_ids), desc="Processed prompts", dynamic_ncols=True)
        try:
            while engine.has_unfinished_requests() and len(results) < len(wanted):
                for output in engine.step():
                    if output.finished and output.request_id in wanted:
                        results[output.request_id] = output
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for request_id in request_ids:
                engine.abort_request(request_id)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [results[r] for r in request_ids]
