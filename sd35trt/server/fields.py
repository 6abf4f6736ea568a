"""How a refused request names its field: FieldError, and the runtime's own refusals (which name
the Pipeline's argument) mapped to the request field that carried the value."""

from __future__ import annotations

from ..runtime.errors import InvalidInputError


class FieldError(InvalidInputError):
    """A request field is out of the server's limits; `field` names it, `code` says how (OpenAI's
    codes: invalid_value, unsupported_value, model_not_found, ...)."""

    def __init__(self, field: str | None, message: str, code: str = "invalid_value", prefix: bool = True) -> None:
        super().__init__(f"{field}: {message}" if prefix and field else message)
        self.field, self.code = field, code


# Pipeline argument (how the runtime's messages start) -> the request field; longest names first.
RUNTIME_FIELDS = (
    ("skip_layer_guidance_scale", "skip_layer_guidance_scale"),
    ("skip_layer_guidance_start", "skip_layer_guidance_start"),
    ("skip_layer_guidance_stop", "skip_layer_guidance_stop"),
    ("skip_guidance_layers", "skip_guidance_layers"),
    ("num_inference_steps", "steps"),
    ("negative_prompt", "negative_prompt"),
    ("guidance_scale", "guidance"),
    ("mask_image", "mask"),
    ("strength", "strength"),
    ("sampler", "sampler"),
    ("height", "size"),
    ("width", "size"),
    ("prompt", "prompt"),
    ("image", "image"),
    ("loras", "loras"),
)


def field_error(exc: InvalidInputError) -> InvalidInputError:
    """The runtime's refusal as a FieldError naming the request field its message starts with
    (`strength=1e-17 leaves 0 of 4 steps...` -> strength); other errors as they are."""
    if isinstance(exc, FieldError):
        return exc
    text = str(exc)
    for name, field in RUNTIME_FIELDS:
        if text.startswith(name) and not text[len(name):len(name) + 1].isalnum() and text[len(name):][:1] != "_":
            return FieldError(field, text)
    return exc
