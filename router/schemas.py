"""Request and response bodies of the router's OpenAI-compatible HTTP API.

Requests are validated with the deployment's `Limits` passed as pydantic
validation context (`parse_body`), so a value over a configured limit fails
with a message that names the field and the limit. Every request model
forbids unknown fields: a typo like `num_inference_step` is a 400 naming the
field rather than a silently ignored option.

Sizes are resolved here too (`resolve_size`): an omitted size becomes the
configured default *before* the request goes further, so the default travels
down the pipeline exactly like an explicit size (the bug class described in
GLM_IMAGE_FACTS.md).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from common.sizes import InvalidSize, check_size, parse_size
from common.stage_config import Limits
from router.errors import InvalidRequest
from router.image_request import OutputFormat

M = TypeVar("M", bound=BaseModel)

# torch.manual_seed takes 64-bit seeds; seed + n - 1 must stay in range too.
MAX_SEED = 2**63 - 1

NEGATIVE_PROMPT_DOC = (
    "Accepted for compatibility with other image APIs and passed through unchanged. "
    "GLM-Image has no negative-prompt conditioning (its unconditional CFG pass uses empty "
    "glyph text and no prior tokens), so it does not change the image. Leave it out unless needed."
)


def _limits(info: ValidationInfo) -> Limits | None:
    """The deployment limits passed by `parse_body`; None when validating without them (docs)."""
    return (info.context or {}).get("limits")


def _over_limit(value: Any, limit: Any, what: str = "") -> PydanticCustomError:
    # Messages leave out the field name: validation_error_message puts it in front.
    return PydanticCustomError("over_limit", "{value} exceeds the limit of {limit}{what}",
                               {"value": value, "limit": limit, "what": what})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageOptions(_Strict):
    """Generation options shared by all endpoints (GLM-Image extras on top of OpenAI's `n`)."""

    n: int = Field(1, ge=1, description="Number of images; image i uses seed + i.")
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED,
        description="Seed of the first image; image i uses seed + i. Default: the stage config's seed.")
    num_inference_steps: int | None = Field(
        None, ge=1, description="DiT denoising steps. Default: the stage config's value.")
    guidance_scale: float | None = Field(
        None, ge=0, allow_inf_nan=False, description="DiT classifier-free guidance scale.")
    negative_prompt: str | None = Field(None, description=NEGATIVE_PROMPT_DOC)
    output_format: OutputFormat = Field("png", description="Encoding of the returned images.")

    @field_validator("output_format", mode="before")
    @classmethod
    def _jpg_alias(cls, value: Any) -> Any:
        # "jpg" is what people type; the encoder calls it jpeg.
        return "jpeg" if isinstance(value, str) and value.lower() == "jpg" else value

    @field_validator("n")
    @classmethod
    def _n_within_limit(cls, value: int, info: ValidationInfo) -> int:
        limits = _limits(info)
        if limits is not None and value > limits.max_n:
            raise _over_limit(value, limits.max_n, " images per request")
        return value

    @field_validator("num_inference_steps")
    @classmethod
    def _steps_within_limit(cls, value: int | None, info: ValidationInfo) -> int | None:
        limits = _limits(info)
        if value is not None and limits is not None and value > limits.max_inference_steps:
            raise _over_limit(value, limits.max_inference_steps)
        return value

    @field_validator("guidance_scale")
    @classmethod
    def _guidance_within_limit(cls, value: float | None, info: ValidationInfo) -> float | None:
        limits = _limits(info)
        if value is not None and limits is not None and value > limits.max_guidance_scale:
            raise _over_limit(value, limits.max_guidance_scale)
        return value

    @field_validator("negative_prompt")
    @classmethod
    def _blank_is_none(cls, value: str | None) -> str | None:
        # An empty negative prompt means "none"; passing "" on once doubled latency in a peer.
        return value if value is not None and value.strip() else None

    @model_validator(mode="after")
    def _seed_range_fits(self) -> "ImageOptions":
        if self.seed is not None and self.seed + self.n - 1 > MAX_SEED:
            raise PydanticCustomError("seed_range", "seed + n - 1 must be at most {max}", {"max": MAX_SEED})
        return self


def _check_prompt(value: str, info: ValidationInfo) -> str:
    if not value.strip():
        raise PydanticCustomError("empty_prompt", "must not be empty")
    limits = _limits(info)
    if limits is not None and len(value) > limits.max_prompt_chars:
        raise PydanticCustomError(
            "prompt_too_long", "{n} characters is too long; at most {limit} are allowed",
            {"n": len(value), "limit": limits.max_prompt_chars})
    return value


class _ImagesEndpointFields(ImageOptions):
    prompt: str = Field(..., description="What to draw. Text in quotes is rendered by the glyph encoder.")
    model: str | None = Field(None, description="Must be one of /v1/models when given.")
    response_format: Literal["b64_json"] | None = Field(
        "b64_json", description='Only "b64_json": images are returned inline.')
    user: str | None = Field(None, description="Accepted for OpenAI compatibility; unused.")

    _prompt_ok = field_validator("prompt")(_check_prompt)

    @field_validator("response_format", mode="before")
    @classmethod
    def _only_b64(cls, value: Any) -> Any:
        if value == "url":
            raise PydanticCustomError(
                "url_unsupported",
                '"url" is not supported: this server returns images inline; use "b64_json"')
        return value


class ImageGenerationRequest(_ImagesEndpointFields):
    """Body of `POST /v1/images/generations` (OpenAI shape plus GLM-Image extras)."""

    size: str | None = Field(
        None, description='"WIDTHxHEIGHT", both multiples of 32 within the limits. '
                          'Default (and "auto"): the configured default size.',
        examples=["1024x1024"])


class ImageEditForm(_ImagesEndpointFields):
    """Non-file fields of `POST /v1/images/edits` (multipart/form-data)."""

    size: str | None = Field(
        "auto", description='"WIDTHxHEIGHT" or "auto" (default): the first image\'s size, '
                            "moved to the nearest valid size.")


# ---------------------------------------------------------------------------
# Chat completions: text-to-image and image-to-image through the chat API.


class ChatTextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatImageURL(_Strict):
    url: str = Field(..., description="A data URL: data:image/png;base64,...")
    detail: str | None = None


class ChatImageURLPart(_Strict):
    type: Literal["image_url"]
    image_url: ChatImageURL


ChatContentPart = Annotated[Union[ChatTextPart, ChatImageURLPart], Field(discriminator="type")]


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ChatContentPart] | None = None
    name: str | None = None


class ChatImageOptions(ImageOptions):
    """Image options of a chat request, at the top level or inside `extra_body`."""

    size: str | None = Field(None, description='"WIDTHxHEIGHT" or "auto"; or give height and width.')
    height: int | None = Field(None, ge=1)
    width: int | None = Field(None, ge=1)


class ChatCompletionRequest(ChatImageOptions):
    """Body of `POST /v1/chat/completions`.

    The prompt is the text of the user messages; `image_url` parts (data URLs) in
    user messages make it image-to-image. Image options may sit at the top level
    or in an `extra_body` object (as vLLM-Omni's example client sends them); the
    same option in both places must have the same value.
    """

    messages: list[ChatMessage] = Field(..., min_length=1)
    model: str | None = None
    stream: bool = Field(False, description="Must be false: images are returned whole.")
    user: str | None = None
    extra_body: ChatImageOptions | None = None

    @field_validator("stream")
    @classmethod
    def _no_streaming(cls, value: bool) -> bool:
        if value:
            raise PydanticCustomError("stream_unsupported", "streaming is not supported for image generation; send false")
        return value

    @model_validator(mode="after")
    def _merge_extra_body(self) -> "ChatCompletionRequest":
        if self.extra_body is None:
            return self
        for name in self.extra_body.model_fields_set:
            value = getattr(self.extra_body, name)
            if name in self.model_fields_set and getattr(self, name) != value:
                raise PydanticCustomError(
                    "conflict", "{name} is given both at the top level ({top}) and in extra_body ({extra}) "
                    "with different values", {"name": name, "top": repr(getattr(self, name)), "extra": repr(value)})
            setattr(self, name, value)
            self.model_fields_set.add(name)
        # Re-check cross-field rules on the merged values (n from one place, seed from the other).
        if self.seed is not None and self.seed + self.n - 1 > MAX_SEED:
            raise PydanticCustomError("seed_range", "seed + n - 1 must be at most {max}", {"max": MAX_SEED})
        return self

    def prompt_text(self) -> str:
        """The text of all user messages, in order, joined by newlines."""
        texts: list[str] = []
        for message in self.messages:
            if message.role != "user" or message.content is None:
                continue
            if isinstance(message.content, str):
                texts.append(message.content)
            else:
                texts.extend(p.text for p in message.content if isinstance(p, ChatTextPart))
        return "\n".join(t for t in texts if t.strip())

    def image_urls(self) -> list[str]:
        """The URLs of the `image_url` parts of the user messages, in order."""
        return [
            part.image_url.url
            for message in self.messages
            if message.role == "user" and isinstance(message.content, list)
            for part in message.content
            if isinstance(part, ChatImageURLPart)
        ]

    def size_text(self) -> str | None:
        """The requested size as "WxH" (from `size` or `height`/`width`), or None when not given."""
        if (self.height is None) != (self.width is None):
            given = "height" if self.height is not None else "width"
            raise InvalidRequest(f"only {given} was given: give both height and width, or size")
        if self.height is None:
            return self.size
        from_sides = f"{self.width}x{self.height}"
        if self.size is not None and self.size.strip().lower() != from_sides:
            raise InvalidRequest(f"size {self.size!r} disagrees with width {self.width} and height {self.height}")
        return from_sides


# ---------------------------------------------------------------------------
# Responses.


class ImageData(BaseModel):
    b64_json: str
    seed: int
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    """OpenAI images response plus what GLM-Image actually did."""

    created: int
    data: list[ImageData]
    size: str = Field(..., description="WIDTHxHEIGHT of the generated images.")
    output_format: str
    seeds: list[int]
    timings: list[dict[str, float]] = Field(..., description="Per image: seconds per stage and in total.")
    stage_sizes: list[dict[str, list[int]]] = Field(
        ..., description="Per image: the [height, width] each stage reported using.")


class ChatResponseImageURL(BaseModel):
    url: str


class ChatResponseImagePart(BaseModel):
    type: Literal["image_url"] = "image_url"
    image_url: ChatResponseImageURL


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: list[ChatResponseImagePart]


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    finish_reason: Literal["stop"] = "stop"


class ChatCompletionResponse(BaseModel):
    """OpenAI chat.completion; one choice per image, the image as a data URL."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    size: str
    output_format: str
    seeds: list[int]
    timings: list[dict[str, float]]
    stage_sizes: list[dict[str, list[int]]]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "glm-image-serve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: int


class ErrorResponse(BaseModel):
    error: ErrorDetail


# ---------------------------------------------------------------------------
# Parsing helpers.


def validation_error_message(exc: ValidationError, max_errors: int = 3) -> str:
    """One line per problem, naming the field (dotted path) and what is wrong with it."""
    errors = exc.errors()
    # Union branches show up in loc as type names ("str", "list[...]"); they say nothing to a user.
    locs = [tuple(str(p) for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in _UNION_TAGS)))
            for err in errors]
    lines: list[str] = []
    for err, loc in zip(errors, locs):
        # A union reports every branch; keep the deepest, most specific complaints.
        if any(len(other) > len(loc) and other[: len(loc)] == loc for other in locs):
            continue
        where = ".".join(loc)
        if err["type"] == "extra_forbidden":
            line = f"unknown field {where!r}"
        elif err["type"] == "missing":
            line = f"field {where!r} is required"
        else:
            msg = err["msg"]
            if err["type"] == "value_error":
                msg = msg.removeprefix("Value error, ")
            line = f"{where}: {msg}" if where else msg
        if line not in lines:
            lines.append(line)
    extra = len(lines) - max_errors
    text = "; ".join(lines[:max_errors])
    return text + (f" (and {extra} more)" if extra > 0 else "")


_UNION_TAGS = {"str", "int", "float", "bool", "none", "function-after", "function-before"}


def parse_body(model: type[M], data: Any, limits: Limits) -> M:
    """Validate `data` as `model` against the deployment limits; InvalidRequest (400) on failure."""
    if not isinstance(data, dict):
        raise InvalidRequest(f"request body must be a JSON object, not {type(data).__name__}")
    try:
        return model.model_validate(data, context={"limits": limits})
    except ValidationError as exc:
        raise InvalidRequest(validation_error_message(exc)) from None


def resolve_size(size: str | None, limits: Limits, auto_size: tuple[int, int] | None = None) -> tuple[int, int]:
    """The (width, height) to generate.

    `None` means the endpoint default: "auto" where there is a condition image
    (`auto_size`, already a valid size), else `limits.default_size`. "auto"
    without a condition image is the default size too. Anything else must be a
    valid "WxH"; otherwise InvalidRequest names the rule and the nearest valid size.
    """
    text = size.strip() if size is not None else ("auto" if auto_size else limits.default_size)
    if text.lower() == "auto":
        if auto_size is not None:
            return auto_size
        text = limits.default_size
    try:
        width, height = parse_size(text)
        check_size(width, height, limits.size_limits)
    except InvalidSize as exc:
        raise InvalidRequest(str(exc)) from None
    return width, height
