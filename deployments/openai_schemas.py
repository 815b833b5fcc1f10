"""OpenAI request bodies (plus vLLM's sampling extras), and how they become the engine's
`SamplingParams`, validated here, once.

Unknown fields are ignored, as OpenAI-compatible servers do (clients send newer fields freely);
fields we know but cannot honour are refused with a 400 naming them. Sampling fields take their
types and bounds from `SamplingParams` itself, so the API and the engine cannot disagree.
"""

from __future__ import annotations

import json
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deployments.config import AdapterName
from deployments.errors import OpenAIError
from deployments.protocol import ToolUse
from engine.sampling_params import SamplingParams
from engine.structured_output import StructuredOutput


def _engine_type(name: str) -> Any:
    """`SamplingParams.<name>`'s type with its bounds (Optional stripped: the API adds its own)."""
    field = SamplingParams.model_fields[name]
    base = field.annotation
    if get_origin(base) in (Union, types.UnionType):
        base = next(arg for arg in get_args(base) if arg is not type(None))
    return Annotated[(base, *field.metadata)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")  # `schema` shadows BaseModel's
    strict: bool | None = None  # the grammar enforces the schema either way


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` request object (the fields it shares with us)."""

    model_config = ConfigDict(extra="forbid")

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    n: _engine_type("n") = 1
    temperature: _engine_type("temperature") | None = None
    top_p: _engine_type("top_p") | None = None
    presence_penalty: _engine_type("presence_penalty") | None = None
    frequency_penalty: _engine_type("frequency_penalty") | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extras
    top_k: _engine_type("top_k") | None = None
    min_p: _engine_type("min_p") | None = None
    repetition_penalty: _engine_type("repetition_penalty") | None = None
    min_tokens: _engine_type("min_tokens") = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    priority: int = 0  # lower runs first on tiers whose scheduler policy is "priority"
    # Structured outputs: OpenAI's response_format, and vLLM's older guided_* and newer
    # structured_outputs forms of the same constraint (one of them per request).
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    def _structured_output(self) -> StructuredOutput | None:
        """The request's output constraint, validated (a 400 naming the parameter otherwise)."""
        given: dict[str, dict[str, Any]] = {}
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            given["response_format"] = {"json_object": True}
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None:
                raise OpenAIError(400, "response_format json_schema needs its json_schema object",
                                  param="response_format")
            given["response_format"] = {"json_schema": fmt.json_schema.json_schema}
        if self.structured_outputs is not None:
            fields = self.structured_outputs.model_dump(exclude_none=True, by_alias=True)
            if "json" in fields:
                fields["json_schema"] = _schema(fields.pop("json"), "structured_outputs")
            given["structured_outputs"] = fields
        for name, key in (("guided_json", "json_schema"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                          ("guided_grammar", "grammar")):
            value = getattr(self, name)
            if value is not None:
                given[name] = {key: _schema(value, name) if name == "guided_json" else value}
        if not given:
            return None
        if len(given) > 1:
            raise OpenAIError(400, f"give one output constraint, not {' and '.join(given)}", param=list(given)[1])
        (param, fields), = given.items()
        try:
            return StructuredOutput.model_validate(fields)
        except ValidationError as err:
            message = str(err.errors()[0]["msg"]).removeprefix("Value error, ")
            raise OpenAIError(400, f"{param}: {message}", param=param) from None

    def _sampling(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        if self.logit_bias:
            raise OpenAIError(400, "logit_bias is not supported", param="logit_bias")
        if self.stream_options is not None and not self.stream:
            raise OpenAIError(400, "stream_options is only allowed with stream=true", param="stream_options")
        fields = {
            "n": self.n,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "seed": self.seed,
            "stop": self.stop,
            "stop_token_ids": self.stop_token_ids,
            "max_tokens": max_tokens,
            "min_tokens": self.min_tokens,
            "ignore_eos": self.ignore_eos,
            "logprobs": logprobs,
            "skip_special_tokens": self.skip_special_tokens,
            "structured_output": self._structured_output(),
        }
        # Unset fields keep the engine's defaults (which are OpenAI's).
        try:
            return SamplingParams.model_validate({k: v for k, v in fields.items() if v is not None})
        except ValidationError as err:  # what spans fields (min_tokens over max_tokens, ...)
            first = err.errors()[0]
            param = str(first["loc"][0]) if first["loc"] else None
            raise OpenAIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param) from None


def _schema(value: dict[str, Any] | str, param: str) -> dict[str, Any]:
    """A JSON schema given as an object or as its JSON text (vLLM accepts both)."""
    if isinstance(value, dict):
        return value
    try:
        schema = json.loads(value)
    except json.JSONDecodeError as err:
        raise OpenAIError(400, f"{param}: not a JSON schema: {err}", param=param) from None
    if not isinstance(schema, dict):
        raise OpenAIError(400, f"{param}: a JSON schema is an object", param=param)
    return schema


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: _engine_type("max_tokens") | None = 16
    logprobs: _engine_type("logprobs") | None = None
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt of a batch (a single prompt is a batch of one)."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]  # type: ignore[list-item]
        if not p:
            raise OpenAIError(400, "prompt is empty", param="prompt")
        return list(p)  # type: ignore[arg-type]

    def sampling(self) -> SamplingParams:
        if self.echo:
            raise OpenAIError(400, "echo is not supported", param="echo")
        if self.suffix:
            raise OpenAIError(400, "suffix is not supported", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise OpenAIError(400, "best_of must equal n (no server-side best-of ranking)", param="best_of")
        return self._sampling(self.max_tokens, self.logprobs)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1)
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCall] | None = None  # assistant
    tool_call_id: str | None = None  # tool

    def engine_message(self, index: int) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            if any(part.type != "text" for part in content):
                raise OpenAIError(400, f"messages[{index}]: only text content parts are supported", param="messages")
            content = "".join(part.text or "" for part in content)
        # NOTE: OpenAI's "developer" role is its newer name for the system prompt.
        role = "system" if self.role == "developer" else self.role
        message: dict[str, Any] = {"role": role, "content": content or ""}
        if self.tool_calls:
            message |= {"content": content or None, "tool_calls": [c.model_dump() for c in self.tool_calls]}
        if role == "tool":
            if not self.tool_call_id:
                raise OpenAIError(400, f"messages[{index}]: a tool message needs its tool_call_id", param="messages")
            message["tool_call_id"] = self.tool_call_id
        return message


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: FunctionDefinition


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")

    class Function(BaseModel):
        name: str

    type: Literal["function"]
    function: Function


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: _engine_type("max_tokens") | None = None  # None: up to the context length
    max_completion_tokens: _engine_type("max_tokens") | None = None
    logprobs: bool = False
    top_logprobs: _engine_type("logprobs") | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    def engine_messages(self) -> list[dict[str, Any]]:
        return [m.engine_message(i) for i, m in enumerate(self.messages)]

    def tool_use(self) -> ToolUse | None:
        """What the replica does with `tools` (None: the prompt shows none, the output is text)."""
        choice = self.tool_choice
        if choice is not None and not self.tools:
            raise OpenAIError(400, "tool_choice needs tools", param="tool_choice")
        if not self.tools or choice == "none":
            return None
        tools = [tool.model_dump(exclude_none=True) for tool in self.tools]
        names = [tool.function.name for tool in self.tools]
        if len(set(names)) != len(names):
            raise OpenAIError(400, "tools: function names must be unique", param="tools")
        name = choice.function.name if isinstance(choice, NamedToolChoice) else None
        if name is not None and name not in names:
            raise OpenAIError(400, f"tool_choice names {name!r}, which is not among the tools {names}",
                              param="tool_choice")
        forced = choice == "required" or name is not None
        if forced and self._structured_output() is not None:
            raise OpenAIError(400, "tool_choice 'required' or a named function cannot be combined with "
                                   "response_format or another output constraint", param="tool_choice")
        return ToolUse(tools, forced, name, self.parallel_tool_calls)

    def sampling(self) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise OpenAIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling(self.max_completion_tokens or self.max_tokens, logprobs)


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize body: a prompt, or a conversation rendered with the chat template."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    tools: list[Tool] | None = None  # messages: rendered with these tools
    add_special_tokens: bool = True  # prompt: a leading bos
    add_generation_prompt: bool = True  # messages: end ready for the assistant's reply
    return_token_strs: bool = False

    def engine_messages(self) -> list[dict[str, Any]] | None:
        if (self.prompt is None) == (self.messages is None):
            raise OpenAIError(400, "give either prompt or messages", param="prompt")
        return None if self.messages is None else [m.engine_message(i) for i, m in enumerate(self.messages)]

    def engine_tools(self) -> list[dict[str, Any]] | None:
        return None if not self.tools else [tool.model_dump(exclude_none=True) for tool in self.tools]


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int]


class LoadLoRAAdapterRequest(BaseModel):
    """vLLM's body for POST /v1/load_lora_adapter."""

    model_config = ConfigDict(extra="ignore")

    lora_name: AdapterName
    lora_path: str = Field(min_length=1)


class UnloadLoRAAdapterRequest(BaseModel):
    """vLLM's body for POST /v1/unload_lora_adapter (its `lora_int_id` is not needed here)."""

    model_config = ConfigDict(extra="ignore")

    lora_name: str
